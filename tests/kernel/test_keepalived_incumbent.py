"""The incumbent as the lab will run it: conntrackd FTFW with lbsync's rendered conntrackd.conf,
keepalived with the rendered active-backup configuration and primary-backup notify script.
Real daemons in two node namespaces; the primary is crashed and the backup commits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from lbsync.config import ClusterConfig, parse_cluster
from lbsync.conntrackd import (
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
from tests.netns import NetnsSet

pytestmark = pytest.mark.kernel

DEADLINE = 10.0


def cluster() -> ClusterConfig:
    return parse_cluster({
        "cluster": {"name": "inc"},
        "vips": {"outside": ["198.18.0.1/24"], "inside": ["198.18.1.1/24"]},
        "nodes": [{"id": i, "name": f"fw{i}", "replication_address": f"198.18.2.{i}",
                   "management_address": f"198.18.3.{i}"} for i in (1, 2)],
    }, "<test>")


def wait_for(pred: Callable[[], bool], what: str, timeout: float = DEADLINE) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic()


def pid_of(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def kill_pidfiles(*paths: Path) -> None:
    for p in paths:
        pid = pid_of(p)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


FLOWS = (  # (conntrack -I arguments, replicated?)
    ("-p udp -s 198.18.0.10 -d 198.18.1.10 --sport 40000 --dport 5001 -t 120", True),
    ("-p tcp -s 198.18.0.10 -d 198.18.1.10 --sport 40001 --dport 5002 --state ESTABLISHED "
     "-u ASSURED -t 600", True),
    # a connection of the firewall itself (its replication address): Address Ignore
    ("-p udp -s 198.18.2.1 -d 198.18.1.10 --sport 40002 --dport 5001 -t 120", False),
)


@pytest.mark.parametrize("channel", ["udp", "multicast"])
def test_incumbent_conntrackd_and_keepalived_failover(netns: NetnsSet, tmp_path: Path,
                                                      channel: Literal["udp", "multicast"]
                                                      ) -> None:
    cfg = cluster()
    hub = netns.add("hub")
    for br in ("obr", "ibr"):
        netns.ns(hub, f"ip link add {br} type bridge stp_state 0")
        netns.ns(hub, f"ip link set {br} up")
    names = {i: netns.add(f"n{i}") for i in (1, 2)}
    netns.ns(names[1], ["ip", "link", "add", "repl0", "type", "veth", "peer", "name", "repl0",
                        "netns", names[2]])
    for i, n in names.items():
        netns.veth(n, "outside0", hub, f"o{i}")
        netns.veth(n, "inside0", hub, f"i{i}")
        netns.ns(hub, f"ip link set o{i} master obr")
        netns.ns(hub, f"ip link set i{i} master ibr")
        netns.ns(n, "ip link set repl0 up")
        netns.ns(n, f"ip addr add 198.18.2.{i}/24 dev repl0")
        netns.ns(n, f"ip addr add 198.18.0.1{i}/24 dev outside0")
        netns.ns(n, f"ip addr add 198.18.1.1{i}/24 dev inside0")

    dirs, confs, scripts = {}, {}, {}
    for i in (1, 2):
        d = tmp_path / f"n{i}"
        d.mkdir()
        dirs[i] = d
        confs[i] = d / "conntrackd.conf"
        confs[i].write_text(render_conntrackd_conf(cfg, i, run_dir=str(d), channel=channel))
        scripts[i] = d / "primary-backup.sh"
        scripts[i].write_text(render_incumbent_notify_script(
            conntrackd_conf=str(confs[i]), lock_file=conntrackd_paths(str(d), i)["lock"],
            log_file=str(d / "notify.log")))
        scripts[i].chmod(0o755)
        (d / "keepalived.conf").write_text(render_incumbent_keepalived_conf(
            cfg, i, notify_script=str(scripts[i]), advert_int=0.1))
        cp = netns.ns(names[i], ["keepalived", "--config-test", "--use-file",
                                 str(d / "keepalived.conf")], check=False)
        assert cp.returncode == 0, cp.stderr

    ctd: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for i in (1, 2):
            with open(dirs[i] / "conntrackd.out", "wb") as out:
                ctd[i] = netns.popen(names[i], conntrackd_argv(str(confs[i])), stdout=out,
                                     stderr=subprocess.STDOUT)
        def answers(i: int) -> Callable[[], bool]:
            return lambda: netns.ns(names[i], ["conntrackd", "-C", str(confs[i]), "-s"],
                                    check=False).returncode == 0

        for i in (1, 2):
            wait_for(answers(i), f"conntrackd {i}")
            assert Path(conntrackd_paths(str(dirs[i]), i)["lock"]).exists()

        # conntrackd runs SCHED_RR 99 by default; the lab puts it at lbsync's RR 50 to compare
        pid = int(netns.ns(hub, ["ip", "netns", "pids", names[1]]).stdout.split()[0])
        assert "SCHED_RR" in subprocess.run(["chrt", "-p", str(pid)], capture_output=True,
                                            text=True, check=True).stdout
        subprocess.run(equalise_scheduling_argv(pid), check=True)
        shown = subprocess.run(["chrt", "-p", str(pid)], capture_output=True, text=True,
                               check=True).stdout
        assert "SCHED_RR" in shown and "priority: 50" in shown, shown

        def holds_vip(i: int) -> bool:
            return "198.18.0.1/24" in netns.ns(names[i], "ip -4 -o addr show dev outside0").stdout

        # node 1 first (nopreempt: whoever is MASTER stays), then node 2
        for i in (1, 2):
            with open(dirs[i] / "keepalived.log", "wb") as out:
                netns.popen(names[i], keepalived_argv(str(dirs[i] / "keepalived.conf"),
                                                      str(dirs[i])),
                            stdout=out, stderr=subprocess.STDOUT)
            if i == 1:
                wait_for(lambda: holds_vip(1), "node 1 holds the VIP")
        wait_for(lambda: "done backup" in _read(dirs[2] / "notify.log"), "node 2 backup script")
        assert not holds_vip(2)

        for args, _ in FLOWS:
            netns.ns(names[1], f"conntrack -I {args}")

        def external(i: int) -> str:
            return netns.ns(names[i], ["conntrackd", "-C", str(confs[i]), "-e"]).stdout

        wait_for(lambda: "sport=40001" in external(2) and "sport=40000" in external(2),
                 "replication to node 2's external cache")
        time.sleep(0.3)
        assert "sport=40002" not in external(2)  # ignored address: not replicated
        assert "sport=4000" not in netns.ns(names[2], "conntrack -L", check=False).stdout

        # crash the primary: keepalived (VRRP child first) and conntrackd, SIGKILL
        t0 = time.monotonic()
        kill_pidfiles(dirs[1] / "keepalived-vrrp.pid", dirs[1] / "keepalived.pid")
        ctd[1].kill()
        t_vip = wait_for(lambda: holds_vip(2), "node 2 takes the VIP")
        t_commit = wait_for(
            lambda: all(f"sport={p}" in netns.ns(names[2], "conntrack -L", check=False).stdout
                        for p in (40000, 40001)), "node 2's commit into its kernel")
        wait_for(lambda: "done primary" in _read(dirs[2] / "notify.log"), "primary script")
        log = _read(dirs[2] / "notify.log")
        assert "transition primary" in log and "failed" not in log, log
        assert "sport=40002" not in netns.ns(names[2], "conntrack -L", check=False).stdout
        print(f"\nincumbent ({channel}) advert_int 0.1: VIP on the backup "
              f"{t_vip - t0:.3f} s after the crash; replicated entries in its kernel "
              f"{t_commit - t0:.3f} s")
    finally:
        for i in (1, 2):
            kill_pidfiles(dirs[i] / "keepalived-vrrp.pid", dirs[i] / "keepalived.pid")
        for p in ctd.values():
            if p.poll() is None:
                p.kill()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


@pytest.mark.parametrize("advert_int", [1.0, 0.1])
def test_incumbent_keepalived_config_test(netns: NetnsSet, tmp_path: Path,
                                          advert_int: float) -> None:
    """keepalived accepts the incumbent file (VRRPv2 at 1 s, v3 at 0.1 s) for both nodes."""
    cfg = cluster()
    n = netns.add("kt")
    for k, link in enumerate(("outside0", "inside0")):
        netns.ns(n, ["ip", "link", "add", link, "type", "veth", "peer", "name", f"p{k}"])
    script = tmp_path / "pb.sh"
    script.write_text(render_incumbent_notify_script(
        conntrackd_conf="/nonexistent.conf", lock_file="/nonexistent.lock",
        log_file=str(tmp_path / "log")))
    script.chmod(0o755)
    for i in (1, 2):
        conf = tmp_path / f"k{i}.conf"
        conf.write_text(render_incumbent_keepalived_conf(cfg, i, notify_script=str(script),
                                                         advert_int=advert_int))
        cp = netns.ns(n, ["keepalived", "--config-test", "--use-file", str(conf)], check=False)
        assert cp.returncode == 0, cp.stderr
