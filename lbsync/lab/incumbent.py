"""The incumbent in the lab (``lbsync lab up --mode vrrp``): what operators run today.

Two firewall nodes in active-backup: keepalived moves the VIPs (one VRRP sync group over an
outside and an inside instance, multicast adverts on those segments), conntrackd FTFW replicates
the conntrack table over the replication link, and keepalived's notify script runs the
primary-backup choreography (the new primary commits the external cache into its kernel before
anything else). The same client, server, hubs and traffic tool as the active-active lab
(:mod:`lbsync.lab.farm`, :mod:`lbsync.lab.traffic`), so a drill is the same drill on both.

What differs from the active-active lab, node by node:

- each node has its own MAC and its own address on ``outside0`` / ``inside0`` (``.11``, ``.12``);
  the VIPs (``198.18.0.1``, ``198.18.1.1``) are not configured: keepalived adds them on the
  master, with gratuitous ARPs, and removes them on a graceful stop;
- ``table inet incumbent`` instead of lbsync's datapath: the sync and VRRP traffic ``notrack``ed,
  ``ct state invalid drop`` on the outside and inside links in prerouting, as lbsync's datapath
  has it (with ``nf_conntrack_tcp_loose=0`` a TCP segment of a connection the kernel does not
  know is invalid: the new master receives such segments between taking the VIPs and its
  commit; dropped, TCP retransmits them; let through, a server's segment to the inside VIP meets
  no socket there and the node answers with a reset, measured: 151 of 500 connections reset
  with the drop in forward only), and the lab's NAT rules (ingress SNAT to the inside VIP, DNAT,
  egress SNAT) as plain nftables NAT, no buckets;
- per node, under ``<lab dir>/n<i>/``: ``conntrackd.conf`` (:func:`lbsync.conntrackd.
  render_conntrackd_conf`: own lock, socket and log; UDP accepted; the nodes' own addresses
  ignored), ``keepalived.conf`` (:func:`lbsync.keepalived.render_incumbent_keepalived_conf`:
  VRRPv2 at whole-second ``advert_int``, v3 below; ``nopreempt``, node 1 preferred),
  ``primary-backup.sh`` (:func:`lbsync.keepalived.render_incumbent_notify_script`) and its log
  ``notify.log``, keepalived's pid files, the daemons' output.

Start-up (:meth:`IncumbentLab.start`): both conntrackds, then keepalived on node 1 until it holds
the VIPs and its primary script is done, then node 2 until its backup script is done. conntrackd
runs SCHED_RR 99 by default: ``equalise=True`` puts it (and keepalived, if it runs realtime) at
SCHED_RR 50, lbsync's default policy, for side-by-side comparisons.

A crash (:meth:`IncumbentLab.kill_node`): SIGKILL of keepalived's VRRP child first (killing the
parent first makes the child send a priority-0 advert: a graceful handover, not a crash), then
the parent and conntrackd, and the node's links down in the same step, as
:func:`lbsync.lab.daemons.kill_daemon` does for lbsync.

Every process runs in a lab namespace: :meth:`Lab.destroy` finds and kills them by namespace
(also a conntrackd the notify script started) and removes the directory with the pid and lock
files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lbsync.config import load_cluster
from lbsync.conntrackd import (
    DEFAULT_PORT,
    conntrackd_argv,
    conntrackd_paths,
    equalise_scheduling_argv,
    render_conntrackd_conf,
)
from lbsync.keepalived import (
    keepalived_argv,
    render_incumbent_keepalived_conf,
    render_incumbent_notify_script,
)
from lbsync.lab import farm
from lbsync.lab.farm import (
    ADDR4,
    CONFIG_FILE,
    HUBS,
    LAB_FILE,
    LAB_ROOT,
    OBSERVE_RULESET,
    Lab,
    LabError,
    _host,
    check_prefix,
    cluster_dict,
    exists,
    netns_pids,
    ns_argv,
    run,
)

log = logging.getLogger(__name__)

MODE = "vrrp"
NODES = 2
PRIMARY = 1               # the preferred master (lowest id: priority 150 vs 100)
TABLE = "incumbent"
VRRP_PROTO = 112
HOST_OFFSET = 10          # node i's own address on outside/inside: .10+i (.11, .12)
START_TIMEOUT = 30.0
_RT_POLICIES = ("SCHED_RR", "SCHED_FIFO")


def own_address(side: str, node_id: int) -> str:
    """Node ``node_id``'s own (non-VIP) address on ``outside`` or ``inside``."""
    net = {"outside": ADDR4.outside_net, "inside": ADDR4.inside_net}[side]
    return _host(net, HOST_OFFSET + node_id)


def render_incumbent_ruleset(lab: Lab) -> str:
    """``table inet incumbent`` for a node of the incumbent lab (pure)."""
    ifs = lab.ifaces
    outside, inside, repl = (f'"{ifs[k]}"' for k in ("outside", "inside", "replication"))
    a = ADDR4
    raw_pre = [f"iifname {repl} udp {d}port {DEFAULT_PORT} notrack" for d in ("d", "s")]
    raw_out = [f"oifname {repl} udp {d}port {DEFAULT_PORT} notrack" for d in ("d", "s")]
    raw_pre.append(f"ip protocol {VRRP_PROTO} notrack")
    raw_out.append(f"ip protocol {VRRP_PROTO} notrack")
    dnat = [f"iifname {outside} ip daddr {a.outside_vip} meta l4proto {p} th dport "
            f"{farm.DNAT_PORT} dnat ip to {a.server}:{farm.SERVICE_PORT}" for p in ("tcp", "udp")]
    snat = [f"iifname {outside} oifname {inside} ip daddr {a.server} meta l4proto {p} "
            f"th dport {farm.SNAT_PORT} snat ip to {a.inside_vip}" for p in ("tcp", "udp")]
    snat.append(f"iifname {inside} oifname {outside} ip saddr {a.inside_net} "
                f"snat ip to {a.outside_vip}")

    def chain(name: str, hook: str | None, rules: Sequence[str]) -> list[str]:
        head = [f"\tchain {name} {{"]
        if hook:
            head.append(f"\t\t{hook}; policy accept;")
        return head + [f"\t\t{r}" for r in rules] + ["\t}"]

    lines = [
        f"# the incumbent's firewall: lab {lab.prefix!r} (lbsync.lab.incumbent)",
        f"table inet {TABLE} {{",
        *chain("raw_prerouting", "type filter hook prerouting priority raw", raw_pre),
        *chain("raw_output", "type filter hook output priority raw", raw_out),
        *chain("prerouting", "type filter hook prerouting priority mangle",
               [f"iifname {{ {outside}, {inside} }} ct state invalid drop"]),
        *chain("dstnat", "type nat hook prerouting priority dstnat", dnat),
        *chain("srcnat", "type nat hook postrouting priority srcnat", snat),
        "}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class IncumbentLab(Lab):
    """The active-backup lab: a :class:`~lbsync.lab.farm.Lab` of two nodes whose VIPs move by
    VRRP. :meth:`Lab.load` of its prefix gives the plain lab (what the traffic tool needs);
    :meth:`load` gives this class back."""

    advert_int: float = 1.0
    channel: str = "udp"

    # ---- lifecycle

    @classmethod
    def create_incumbent(cls, prefix: str, *, advert_int: float = 1.0, channel: str = "udp",
                         root: Path = LAB_ROOT) -> IncumbentLab:
        """Build the namespaces, addresses, rulesets and daemon files (no daemon runs yet:
        :meth:`start`); on any failure everything built so far is removed again."""
        check_prefix(prefix)
        if exists(prefix, root):
            raise LabError(f"lab {prefix!r} already exists (lbsync lab down --name {prefix})")
        directory = root / prefix
        data = cluster_dict(prefix, NODES, ipv6=False, buckets=1, directory=directory)
        directory.mkdir(parents=True, exist_ok=False)
        try:
            (directory / CONFIG_FILE).write_text(farm.to_toml(data))
            cfg = load_cluster(directory / CONFIG_FILE)
            lab = cls(prefix=prefix, nodes=NODES, ipv6=False, buckets=1, directory=directory,
                      cluster_config=cfg, split={1: (0,), 2: ()}, created=time.time(),
                      split_method="none (active-backup)", advert_int=advert_int,
                      channel=channel)
            t0 = time.monotonic()
            lab._build()
        except BaseException:
            farm.destroy(prefix, root=root)
            raise
        log.info("lab.up mode=vrrp prefix=%s advert_int=%s seconds=%.2f", prefix, advert_int,
                 time.monotonic() - t0)
        return lab

    @classmethod
    def load(cls, prefix: str = farm.DEFAULT_PREFIX, *, root: Path = LAB_ROOT) -> IncumbentLab:
        base = Lab.load(prefix, root=root)
        state = json.loads((base.directory / LAB_FILE).read_text())
        if state.get("mode") != MODE:
            raise LabError(f"lab {prefix!r} is not an incumbent (--mode {MODE}) lab")
        return cls(prefix=base.prefix, nodes=base.nodes, ipv6=False, buckets=base.buckets,
                   directory=base.directory, cluster_config=base.cluster_config,
                   split=base.split, created=base.created, split_method=base.split_method,
                   advert_int=float(state["advert_int"]), channel=str(state["channel"]))

    def state(self) -> dict[str, Any]:
        st = super().state()
        st.update({
            "mode": MODE, "advert_int": self.advert_int, "channel": self.channel,
            "own_addresses": {str(i): {s: own_address(s, i) for s in ("outside", "inside")}
                              for i in self.node_ids},
            "run_dirs": {str(i): str(self.run_dir(i)) for i in self.node_ids},
        })
        return st

    def status(self) -> dict[str, Any]:
        present = set(farm.lab_namespaces(self.prefix))
        nodes = []
        for i in self.node_ids:
            row: dict[str, Any] = {"id": i, "namespace": self.node_ns(i),
                                   "present": self.node_ns(i) in present}
            if row["present"]:
                row["holds_vips"] = self.holds_vip(i)
                row["conntrackd"] = bool(self.conntrackd_pids(i))
                row["keepalived"] = bool(self.keepalived_pids(i))
            nodes.append(row)
        return {"prefix": self.prefix, "mode": MODE, "advert_int": self.advert_int,
                "directory": str(self.directory), "nodes": nodes,
                "complete": all(ns in present for ns in self.namespaces)}

    # ---- files

    def run_dir(self, node_id: int) -> Path:
        return self.directory / f"n{node_id}"

    def conntrackd_conf(self, node_id: int) -> Path:
        return self.run_dir(node_id) / "conntrackd.conf"

    def keepalived_conf(self, node_id: int) -> Path:
        return self.run_dir(node_id) / "keepalived.conf"

    def _script_done(self, node_id: int, transition: str) -> bool:
        return f"done {transition}" in self.notify_log(node_id)

    def notify_log(self, node_id: int) -> str:
        """What node ``node_id``'s notify script has logged so far."""
        try:
            return (self.run_dir(node_id) / "notify.log").read_text()
        except FileNotFoundError:
            return ""

    # ---- building

    def _build(self) -> None:
        from pyroute2 import netns as pnetns

        for ns in self.namespaces:
            pnetns.create(ns)
        hubs = {self.hub_ns(h) for h in HUBS}
        for ns in self.namespaces:
            sysctls = (farm._HUB_SYSCTLS if ns in hubs else
                       farm._ENDPOINT_SYSCTLS if ns in (self.client_ns, self.server_ns)
                       else farm._NODE_SYSCTLS)
            run(ns_argv(ns, ["sysctl", "-q", "-w", *sysctls]))
        ifs = self.ifaces
        ports: list[tuple[str, str, str, str]] = [
            ("hubo", "cli", self.client_ns, farm.ENDPOINT_IF),
            ("hubi", "srv", self.server_ns, farm.ENDPOINT_IF),
        ]
        for i in self.node_ids:
            for hub, role in zip(HUBS, ("outside", "inside", "replication", "management"),
                                 strict=True):
                ports.append((hub, f"n{i}", self.node_ns(i), ifs[role]))
        for hub in HUBS:
            self._build_hub(hub, [(p, ens, eif) for h, p, ens, eif in ports if h == hub])
        self._build_endpoint(self.client_ns, "outside")
        self._build_endpoint(self.server_ns, "inside")
        ruleset = render_incumbent_ruleset(self)
        for i in self.node_ids:
            self._build_incumbent_node(i)
            run(ns_argv(self.node_ns(i), ["nft", "-f", "-"]), input=ruleset)
            self._write_daemon_files(i)
        for ns in (self.client_ns, self.server_ns):
            run(ns_argv(ns, ["nft", "-f", "-"]), input=OBSERVE_RULESET)
        (self.directory / LAB_FILE).write_text(json.dumps(self.state(), indent=1) + "\n")

    def _build_incumbent_node(self, node_id: int) -> None:
        from pyroute2 import IPRoute

        ifs = self.ifaces
        a = ADDR4
        with IPRoute(netns=self.node_ns(node_id)) as ip:
            ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
            for role in ("outside", "inside", "replication", "management"):
                idx = ip.link_lookup(ifname=ifs[role])[0]
                ip.link("set", index=idx, state="up")
                host = (own_address(role, node_id) if role in ("outside", "inside") else
                        a.replication(node_id) if role == "replication" else
                        a.management(node_id))
                ip.addr("add", index=idx, address=host, prefixlen=a.prefixlen)

    def _write_daemon_files(self, node_id: int) -> None:
        d = self.run_dir(node_id)
        d.mkdir(mode=0o755)
        cfg = self.cluster_config
        ignore = [own_address(s, i) for i in self.node_ids for s in ("outside", "inside")]
        self.conntrackd_conf(node_id).write_text(render_conntrackd_conf(
            cfg, node_id, run_dir=str(d), channel="multicast" if self.channel == "multicast"
            else "udp", ignore=ignore))
        script = d / "primary-backup.sh"
        script.write_text(render_incumbent_notify_script(
            conntrackd_conf=str(self.conntrackd_conf(node_id)),
            lock_file=conntrackd_paths(str(d), node_id)["lock"],
            log_file=str(d / "notify.log")))
        script.chmod(0o755)
        self.keepalived_conf(node_id).write_text(render_incumbent_keepalived_conf(
            cfg, node_id, notify_script=str(script), advert_int=self.advert_int))

    # ---- daemons

    def start(self, *, equalise: bool = True, timeout: float = START_TIMEOUT) -> None:
        """Start conntrackd on both nodes, keepalived on node 1 until it is the primary (VIPs
        held, primary script done), then on node 2 until its backup script is done."""
        for i in self.node_ids:
            self.start_conntrackd(i)
        for i in self.node_ids:
            _wait(partial(self.conntrackd_answers, i), timeout, f"conntrackd on node {i}")
        if equalise:
            self.equalise_scheduling()
        self.start_keepalived(PRIMARY)
        _wait(lambda: self.holds_vip(PRIMARY) and "done primary" in self.notify_log(PRIMARY),
              timeout, f"node {PRIMARY} to become the primary")
        for i in self.node_ids:
            if i != PRIMARY:
                self.start_keepalived(i)
                _wait(partial(self._script_done, i, "backup"), timeout,
                      f"node {i}'s backup script")
        if equalise:
            self.equalise_scheduling()

    def start_conntrackd(self, node_id: int) -> subprocess.Popen[bytes]:
        # a SIGKILLed conntrackd leaves its lock behind (as a reboot would clear it)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(conntrackd_paths(str(self.run_dir(node_id)), node_id)["lock"])
        with open(self.run_dir(node_id) / "conntrackd.out", "ab") as out:
            return self.popen(self.node_ns(node_id),
                              conntrackd_argv(str(self.conntrackd_conf(node_id))),
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)

    def start_keepalived(self, node_id: int) -> subprocess.Popen[bytes]:
        d = self.run_dir(node_id)
        for name in ("keepalived.pid", "keepalived-vrrp.pid", "keepalived-checkers.pid"):
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()
        with open(d / "keepalived.log", "ab") as out:
            return self.popen(self.node_ns(node_id),
                              keepalived_argv(str(self.keepalived_conf(node_id)), str(d)),
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)

    def ctl(self, node_id: int, *args: str) -> subprocess.CompletedProcess[str]:
        """``conntrackd -C <node's conf> ARGS`` in the node's namespace."""
        return self.exec(self.node_ns(node_id),
                         ["conntrackd", "-C", str(self.conntrackd_conf(node_id)), *args])

    def conntrackd_answers(self, node_id: int) -> bool:
        return self.ctl(node_id, "-s").returncode == 0

    def external_cache_size(self, node_id: int) -> int:
        """Entries in node ``node_id``'s external cache (what the peer replicated to it)."""
        cp = self.ctl(node_id, "-e")
        return sum(1 for line in cp.stdout.splitlines() if line.startswith(("tcp", "udp")))

    def holds_vip(self, node_id: int) -> bool:
        """Whether the node carries the outside VIP right now (it is the VRRP master)."""
        cp = self.exec(self.node_ns(node_id),
                       ["ip", "-4", "-o", "addr", "show", "dev", self.ifaces["outside"]])
        return f" {ADDR4.outside_vip}/" in cp.stdout

    def master(self) -> int | None:
        holders = [i for i in self.node_ids if self.holds_vip(i)]
        return holders[0] if len(holders) == 1 else None

    def _pids_named(self, node_id: int, comm: str) -> list[int]:
        ns = self.node_ns(node_id)
        out = []
        for pid in netns_pids([ns]).get(ns, []):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    out.append(pid)
            except OSError:
                continue
        return out

    def conntrackd_pids(self, node_id: int) -> list[int]:
        return self._pids_named(node_id, "conntrackd")

    def keepalived_pids(self, node_id: int) -> list[int]:
        return self._pids_named(node_id, "keepalived")

    def vrrp_child_pid(self, node_id: int) -> int | None:
        return _pid_file(self.run_dir(node_id) / "keepalived-vrrp.pid")

    def equalise_scheduling(self) -> list[int]:
        """Put every conntrackd and keepalived thread running realtime at lbsync's default
        policy (SCHED_RR 50); the pids changed."""
        done = []
        for i in self.node_ids:
            for pid in self.conntrackd_pids(i) + self.keepalived_pids(i):
                cp = subprocess.run(["chrt", "-p", str(pid)], capture_output=True, text=True,
                                    check=False)
                already = "SCHED_RR" in cp.stdout and "priority: 50" in cp.stdout
                if any(p in cp.stdout for p in _RT_POLICIES) and not already:
                    subprocess.run(equalise_scheduling_argv(pid), capture_output=True,
                                   check=False)
                    done.append(pid)
        return done

    def kill_node(self, node_id: int, *, links_down: bool = True) -> float:
        """Crash node ``node_id``: SIGKILL keepalived's VRRP child, then keepalived and
        conntrackd, and (``links_down``) its links down in the same step. Returns t0
        (``time.monotonic()`` just before the first kill)."""
        child = self.vrrp_child_pid(node_id)
        parents = [p for p in self.keepalived_pids(node_id) if p != child]
        ctds = self.conntrackd_pids(node_id)
        batch = "".join(f"link set {self.ifaces[r]} down\n"
                        for r in ("outside", "inside", "replication", "management"))
        t0 = time.monotonic()
        for pid in ([child] if child else []) + parents + ctds:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if links_down:
            subprocess.run(ns_argv(self.node_ns(node_id), ["ip", "-batch", "-"]), input=batch,
                           text=True, check=True, capture_output=True)
        return t0

    def wait_takeover(self, node_id: int, timeout: float = START_TIMEOUT,
                      interval: float = 0.01) -> float:
        """Poll until node ``node_id`` holds the VIPs; the monotonic instant it was seen."""
        return _wait(lambda: self.holds_vip(node_id), timeout, f"node {node_id} to take the "
                     "VIPs", interval=interval)


def up(prefix: str = farm.DEFAULT_PREFIX, *, advert_int: float = 1.0, channel: str = "udp",
       equalise: bool = True, root: Path = LAB_ROOT) -> IncumbentLab:
    """``lbsync lab up --mode vrrp``: build the incumbent lab and start its daemons; on failure
    everything is torn down again."""
    lab = IncumbentLab.create_incumbent(prefix, advert_int=advert_int, channel=channel,
                                        root=root)
    try:
        lab.start(equalise=equalise)
    except BaseException:
        lab.destroy()
        raise
    return lab


def _pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lbsync.lab.incumbent up|down|status`` until ``lbsync lab up --mode vrrp``
    is wired into the lab CLI."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m lbsync.lab.incumbent")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--name", default="lbinc", help="lab prefix (default %(default)s)")
    p.add_argument("--advert-int", type=float, default=1.0, help="VRRP advert_int, seconds")
    p.add_argument("--channel", choices=("udp", "multicast"), default="udp")
    args = p.parse_args(argv)
    try:
        if args.action == "up":
            lab = up(args.name, advert_int=args.advert_int, channel=args.channel)
            print(f"lab {lab.prefix} (incumbent, advert_int {lab.advert_int}): node "
                  f"{lab.master()} holds the VIPs; lbsync lab traffic --name {lab.prefix} "
                  f"--mode snat --tcp 10 --udp 10 --duration 3")
        elif args.action == "down":
            if not farm.destroy(args.name):
                print(f"no lab named {args.name!r}")
                return 1
        else:
            print(json.dumps(IncumbentLab.load(args.name).status(), indent=1))
    except LabError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
