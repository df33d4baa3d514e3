"""Real keepalived (2.2.7) on three node namespaces with lbsync's rendered configuration, read
through lbsync's FIFO reader: steady state, a node's death, a node's own link failing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lbsync.config import ClusterConfig, load_cluster, parse_cluster
from lbsync.control import ControlServer
from lbsync.keepalived import (
    VrrpEvent,
    VrrpInterpreter,
    VrrpOwnLinkFailed,
    VrrpOwnLinkRecovered,
    VrrpPeerDeclaredDead,
    instance_name,
    keepalived_argv,
    render_keepalived_conf,
)
from lbsync.vrrp_adapter import notify_handler
from tests.netns import NetnsSet

pytestmark = pytest.mark.kernel

NODES = (1, 2, 3)
DEADLINE = 5.0  # generous: the expected detection time at advert_int 0.1 is ~0.2-0.3 s


def cluster(v6: bool = False) -> ClusterConfig:
    return parse_cluster({
        "cluster": {"name": "kat"},
        "nodes": [{"id": i, "name": f"fw{i}", "replication_address": f"198.18.2.{i}",
                   "management_address": f"2001:db8:3::{i}" if v6 else f"198.18.3.{i}"}
                  for i in NODES],
    }, "<test>")


class EventLog:
    """JSON lines printed by one ``python -m lbsync.vrrp_adapter`` process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            rec = json.loads(raw)
            with self._cond:
                self.records.append(rec)
                self._cond.notify_all()

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = DEADLINE,
             since: int = 0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for rec in self.records[since:]:
                    if pred(rec):
                        return rec
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching event within {timeout} s; "
                                         f"got {self.records[since:]}")
                self._cond.wait(left)

    def state(self, node_id: int) -> str | None:
        """Last state this node's keepalived reported for ``lbsync-<node_id>``."""
        with self._cond:
            for rec in reversed(self.records):
                if rec["event"] == "VrrpInstanceChanged" and rec["node_id"] == node_id:
                    return str(rec["state"])
        return None

    def matching(self, pred: Callable[[dict[str, Any]], bool], since: int = 0
                 ) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.records[since:] if pred(r)]

    def mark(self) -> int:
        with self._cond:
            return len(self.records)


def is_event(name: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r["event"] == name and all(r.get(k) == v for k, v in fields.items())


Lab = tuple[NetnsSet, dict[int, str], dict[int, Path], dict[int, EventLog], float]


def build_lab(netns: NetnsSet) -> dict[int, str]:
    """A management bridge in its own namespace; each node has mgmt0 on it and outside0/inside0
    veths whose peers sit (up, unbridged) in that namespace, so the links have carrier."""
    hub = netns.add("hub")
    netns.ns(hub, "ip link add mgmtbr type bridge stp_state 0")
    netns.ns(hub, "ip link set mgmtbr up")
    names = {}
    for i in NODES:
        n = netns.add(f"n{i}")
        names[i] = n
        netns.veth(n, "mgmt0", hub, f"m{i}")
        netns.ns(hub, f"ip link set m{i} master mgmtbr")
        netns.veth(n, "outside0", hub, f"o{i}")
        netns.veth(n, "inside0", hub, f"i{i}")
        netns.ns(n, f"ip addr add 198.18.3.{i}/24 dev mgmt0")
    return names


def kill_keepalived(run_dir: Path) -> None:
    """SIGKILL the VRRP child first (a parent killed first lets the child send a priority-0
    advert: a graceful handover, not a crash), then the parent."""
    for name in ("keepalived-vrrp.pid", "keepalived.pid"):
        try:
            pid = int((run_dir / name).read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(params=[0.1, 1.0], ids=["advert0.1", "advert1"])
def lab(request: pytest.FixtureRequest, netns: NetnsSet, tmp_path: Path) -> Iterator[Lab]:
    names = build_lab(netns)
    cfg = cluster()
    dirs: dict[int, Path] = {}
    logs: dict[int, EventLog] = {}
    try:
        for i in NODES:
            d = tmp_path / f"n{i}"
            d.mkdir()
            dirs[i] = d
            conf = d / "keepalived.conf"
            conf.write_text(render_keepalived_conf(cfg, i, advert_int=request.param,
                                                   fifo_path=str(d / "vrrp.fifo"),
                                                   run_dir=str(d)))
            # keepalived itself validates the rendered file (it checks the interfaces exist)
            cp = netns.ns(names[i], ["keepalived", "--config-test", "--use-file", str(conf)],
                          check=False)
            assert cp.returncode == 0, cp.stderr
            proc = netns.popen(names[i], [sys.executable, "-m", "lbsync.vrrp_adapter",
                                          "--fifo", str(d / "vrrp.fifo"), "--self-id", str(i),
                                          "--nodes", ",".join(map(str, NODES))],
                               stdout=subprocess.PIPE)
            logs[i] = EventLog(proc)
            logs[i].wait(is_event("ready"), timeout=10)
            assert (os.stat(d / "vrrp.fifo").st_mode & 0o777) == 0o600
        for i in NODES:
            with open(dirs[i] / "keepalived.log", "wb") as out:
                netns.popen(names[i], keepalived_argv(str(dirs[i] / "keepalived.conf"),
                                                      str(dirs[i])),
                            stdout=out, stderr=subprocess.STDOUT)
        yield netns, names, dirs, logs, request.param
    finally:
        for d in dirs.values():
            kill_keepalived(d)


def wait_steady(logs: dict[int, EventLog], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(logs[i].state(j) == ("MASTER" if i == j else "BACKUP")
               for i in NODES for j in NODES):
            return
        time.sleep(0.05)
    raise AssertionError({i: {j: logs[i].state(j) for j in NODES} for i in NODES})


def test_keepalived_signals_peer_death_and_own_link_failure(lab: Any) -> None:
    """advert_int 0.1 (VRRPv3) and 1: the sub-second profile and the incumbent's default."""
    netns, names, dirs, logs, advert = lab
    deadline = DEADLINE * max(1.0, advert * 2)
    wait_steady(logs, timeout=10 * max(1.0, advert * 2))
    # Steady state: each node MASTER of its own instance only.
    for i in NODES:
        assert [j for j in NODES if logs[i].state(j) == "MASTER"] == [i]
    # The token address of its own instance sits on each node's lo, nobody else's.
    for i in NODES:
        lo = netns.ns(names[i], "ip -4 -o addr show dev lo").stdout
        assert f"169.254.77.{i}/32" in lo
        assert all(f"169.254.77.{j}/32" not in lo for j in NODES if j != i)

    # --- node 2 dies (keepalived SIGKILLed, VRRP child first)
    marks = {i: logs[i].mark() for i in NODES}
    t0 = time.monotonic()
    kill_keepalived(dirs[2])
    dead = logs[3].wait(is_event("VrrpPeerDeclaredDead", node_id=2), since=marks[3],
                        timeout=deadline)
    detect_dead = dead["t"] - t0
    # node 2's reader sees its keepalived go away (the FIFO's writers are gone)
    logs[2].wait(is_event("VrrpSignalLost", reason="fifo_closed"), since=marks[2])
    time.sleep(5 * advert)  # let any competing takeover show itself
    # exactly one survivor is MASTER of lbsync-2: node 3, node 2's first successor
    assert logs[3].state(2) == "MASTER"
    assert logs[1].state(2) == "BACKUP"
    assert logs[1].matching(is_event("VrrpPeerDeclaredDead", node_id=2), since=marks[1]) == []
    assert len(logs[3].matching(is_event("VrrpPeerDeclaredDead"), since=marks[3])) == 1
    assert "169.254.77.2/32" in netns.ns(names[3], "ip -4 -o addr show dev lo").stdout

    # --- node 1's outside link goes down: its own instance FAULT; node 3 (the only other
    # survivor) takes lbsync-1
    marks = {i: logs[i].mark() for i in NODES}
    t1 = time.monotonic()
    netns.ns(names[1], "ip link set outside0 down")
    failed = logs[1].wait(is_event("VrrpOwnLinkFailed"), since=marks[1])
    detect_fault = failed["t"] - t1
    taken = logs[3].wait(is_event("VrrpPeerDeclaredDead", node_id=1), since=marks[3])
    detect_takeover = taken["t"] - t1
    assert logs[1].state(1) == "FAULT"
    # the instances node 1 backs up do not track its links
    assert logs[1].state(3) == "BACKUP"

    # --- link back up: node 1 recovers and preempts its instance back from node 3
    marks = {i: logs[i].mark() for i in NODES}
    t2 = time.monotonic()
    netns.ns(names[1], "ip link set outside0 up")
    recovered = logs[1].wait(is_event("VrrpOwnLinkRecovered"), since=marks[1])
    returned = logs[3].wait(is_event("VrrpPeerReturned", node_id=1), since=marks[3],
                            timeout=deadline)
    logs[1].wait(lambda r: r["event"] == "VrrpInstanceChanged" and r["node_id"] == 1
                 and r["state"] == "MASTER", since=marks[1], timeout=deadline)
    print(f"\nkeepalived advert_int {advert}: peer death -> VrrpPeerDeclaredDead "
          f"{detect_dead:.3f} s; link down -> VrrpOwnLinkFailed {detect_fault:.3f} s, "
          f"peer takes the instance "
          f"{detect_takeover:.3f} s; link up -> VrrpOwnLinkRecovered "
          f"{recovered['t'] - t2:.3f} s, VrrpPeerReturned {returned['t'] - t2:.3f} s")
    assert detect_dead < deadline


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_keepalived_accepts_rendered_config_and_rejects_missing_interface(
        netns: NetnsSet, tmp_path: Path, v6: bool) -> None:
    """``keepalived --config-test`` (which also fails on warnings) on every node's rendered
    file, IPv4 and IPv6 management; the same file is refused in a namespace that lacks the
    tracked outside link (so the test can fail)."""
    cfg = cluster(v6)
    good = netns.add("good")
    bad = netns.add("bad")
    for n, links in ((good, ("mgmt0", "outside0", "inside0")), (bad, ("mgmt0", "inside0"))):
        for k, link in enumerate(links):
            netns.ns(n, ["ip", "link", "add", link, "type", "veth", "peer", "name", f"p{k}"])
            netns.ns(n, ["ip", "link", "set", link, "up"])
    for i in NODES:
        conf = tmp_path / f"k{i}.conf"
        conf.write_text(render_keepalived_conf(cfg, i, fifo_path=str(tmp_path / "f"),
                                               run_dir=str(tmp_path)))
        cp = netns.ns(good, ["keepalived", "--config-test", "--use-file", str(conf)],
                      check=False)
        assert cp.returncode == 0, cp.stderr
        assert instance_name(i) in conf.read_text()
    cp = netns.ns(bad, ["keepalived", "--config-test", "--use-file", str(tmp_path / "k1.conf")],
                  check=False)
    assert cp.returncode != 0
    assert "outside0" in cp.stderr


class ControlThread:
    """A ControlServer with lbsync's ``notify`` handler, on its own loop in a thread."""

    def __init__(self, path: Path, self_id: int, nodes: tuple[int, ...]) -> None:
        self.path = path
        self.events: list[VrrpEvent] = []
        self._interp = VrrpInterpreter(self_id, nodes)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = ControlServer(self.path, {"notify": notify_handler(self._interp,
                                                                    self.events.append)})
        await server.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.close()

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def wait(self, event: VrrpEvent, timeout: float = DEADLINE) -> None:
        end = time.monotonic() + timeout
        while event not in list(self.events):
            if time.monotonic() > end:
                raise AssertionError(f"{event} not among {self.events}")
            time.sleep(0.02)


def test_keepalived_notify_script_reaches_the_control_socket(netns: NetnsSet,
                                                             tmp_path: Path) -> None:
    """keepalived's generic ``notify`` script is ``lbsync notify``: its state changes reach the
    daemon's control socket (a ControlServer with the real handler stands in for the daemon).
    Node 2 of the 2-node cluster never starts, so node 1 takes its instance."""
    lbsync_bin = Path(sys.executable).parent / "lbsync"
    assert lbsync_bin.exists(), "the lbsync console script is installed next to python"
    name = f"kn{uuid.uuid4().hex[:8]}"
    cfg_path = tmp_path / "cluster.toml"
    cfg_path.write_text(
        f'[cluster]\nname = "{name}"\n' + "".join(
            f'[[nodes]]\nid = {i}\nreplication_address = "198.18.2.{i}"\n'
            f'management_address = "198.18.3.{i}"\n' for i in (1, 2)))
    cfg = load_cluster(cfg_path)
    n = netns.add("n1")
    for k, link in enumerate(("mgmt0", "outside0", "inside0")):
        netns.ns(n, ["ip", "link", "add", link, "type", "veth", "peer", "name", f"p{k}"])
        netns.ns(n, ["ip", "link", "set", link, "up"])
        netns.ns(n, ["ip", "link", "set", f"p{k}", "up"])
    netns.ns(n, "ip addr add 198.18.3.1/24 dev mgmt0")
    conf = tmp_path / "keepalived.conf"
    conf.write_text(render_keepalived_conf(
        cfg, 1, fifo_path=str(tmp_path / "vrrp.fifo"), run_dir=str(tmp_path),
        notify_command=f"{lbsync_bin} notify --config {cfg_path} --node-id 1"))
    server = ControlThread(cfg.runtime_path(1, "sock"), 1, cfg.node_ids)
    try:
        with open(tmp_path / "keepalived.log", "wb") as out:
            netns.popen(n, keepalived_argv(str(conf), str(tmp_path)), stdout=out,
                        stderr=subprocess.STDOUT)
        server.wait(VrrpPeerDeclaredDead(node_id=2))
        time.sleep(0.5)  # notify scripts run concurrently: let the start-up ones finish
        netns.ns(n, "ip link set outside0 down")
        server.wait(VrrpOwnLinkFailed())
        netns.ns(n, "ip link set outside0 up")
        server.wait(VrrpOwnLinkRecovered())
    finally:
        kill_keepalived(tmp_path)
        server.close()
    assert not cfg.runtime_path(1, "sock").exists()
