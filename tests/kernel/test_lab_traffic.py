"""The traffic tool under failure, as drills will use it: a background run that is queried while
it runs, a node that stops forwarding and comes back, connections that are reset."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lbsync import nft
from lbsync.lab import farm, traffic
from lbsync.lab.farm import Lab
from lbsync.lab.traffic import TrafficRun, alive_over_time

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    return lab_factory(2, buckets=32)


def by_node(rep: dict[str, Any], node: int) -> set[int]:
    return {f["id"] for f in rep["per_flow"] if f["nodes"] == [node]}


def test_stalled_node_shows_as_gaps_of_its_flows_only(lab: Lab) -> None:
    # Gaps are silences > 0.6 s: far above scheduling jitter on a busy 2-core machine, far
    # below the 1.5 s stall.
    run = TrafficRun.start(lab, tcp=30, udp=30, rate=10.0, mode="mixed", gap=0.6)
    try:
        ready = run.wait_ready()
        assert ready["connected"] == 60 and ready["failed"] == 0
        time.sleep(0.5)
        first = run.snapshot()
        assert not first["final"] and first["alive"] == 60, first["states"]
        stalled = by_node(first, 1)
        assert stalled and by_node(first, 2)
        # Node 1 stops forwarding (its buckets leave @owned; its conntrack stays).
        owned1 = lab.owned(1)
        nft.owned_transaction((), owned1, lab.node_ns(1))
        time.sleep(1.5)
        mid = run.snapshot()
        assert mid["generation"] > first["generation"]
        dead = {f["id"] for f in mid["per_flow"] if not f["alive"]}
        assert dead == stalled, (sorted(dead), sorted(stalled))
        # Node 1 forwards again: its flows resume (TCP retransmits, UDP's next datagram).
        nft.owned_transaction(owned1, (), lab.node_ns(1))
        time.sleep(3.0)
        rep = run.stop()
    finally:
        run.kill()
    assert rep["final"] and rep["alive"] == 60 and rep["resets"] == 0, rep["states"]
    gapped = {f["id"] for f in rep["per_flow"] if f["gaps"]}
    assert gapped == stalled
    for f in rep["per_flow"]:
        if f["id"] in stalled:
            assert f["longest_silence"] >= 1.4, f
        else:
            assert f["longest_silence"] < 0.6, f
    assert rep["longest_silence"]["max"] >= 1.4
    assert 0.9 <= rep["achieved_rate_per_flow"] <= 10.5
    # Flows alive over time: everyone, then only node 2's share, then everyone again.
    curve = [n for _t, n in alive_over_time(rep, step=0.1)]
    assert max(curve) == 60
    assert min(curve) == 60 - len(stalled)


def test_reset_connections_are_counted(lab: Lab) -> None:
    run = TrafficRun.start(lab, tcp=10, rate=10.0, mode="plain")
    try:
        run.wait_ready()
        time.sleep(0.3)
        # Abort the server side of every plain connection: each client sees an RST.
        cp = lab.exec(lab.server_ns, ["ss", "-K", "-t", "state", "established",
                                      f"( sport = :{farm.PLAIN_PORT} )"])
        assert cp.returncode == 0, cp.stderr
        time.sleep(0.5)
        rep = run.stop()
    finally:
        run.kill()
    assert rep["resets"] == 10 and rep["alive"] == 0, rep["states"]
    assert all(f["state"] == "reset" for f in rep["per_flow"])


def test_unplugged_node_stalls_its_flows_until_replugged(lab: Lab) -> None:
    run = TrafficRun.start(lab, tcp=20, udp=20, rate=10.0, mode="mixed", gap=0.6)
    try:
        run.wait_ready()
        time.sleep(0.4)
        first = run.snapshot()
        assert first["alive"] == 40, first["states"]
        on2 = by_node(first, 2)
        lab.set_node_links(2, up=False)
        out = lab.exec(lab.node_ns(2), ["ip", "-br", "link", "show", "outside0"]).stdout
        assert "LOWER_UP" not in out and "DOWN" in out.upper(), out
        time.sleep(1.5)
        mid = run.snapshot()
        assert {f["id"] for f in mid["per_flow"] if not f["alive"]} == on2
        lab.set_node_links(2, up=True)
        time.sleep(3.0)
        rep = run.stop()
    finally:
        run.kill()
        lab.set_node_links(2, up=True)
    assert rep["alive"] == 40 and rep["resets"] == 0, rep["states"]
    assert {f["id"] for f in rep["per_flow"] if f["gaps"]} == on2
    with pytest.raises(farm.LabError, match="segment"):
        lab.set_node_links(1, up=False, segments=("sideways",))


def _servers(lab: Lab) -> list[int]:
    out = []
    for pid in farm.netns_pids([lab.server_ns])[lab.server_ns]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lbsync.lab.traffic" in argv and b"serve" in argv:
            out.append(pid)
    return out


def test_concurrent_starts_share_one_server_and_runs_do_not_mix(lab: Lab) -> None:
    farm.kill_pids(_servers(lab))
    assert traffic.server_running(lab) is None
    with ThreadPoolExecutor(4) as ex:
        pids = list(ex.map(lambda _: traffic.ensure_server(lab), range(4)))
    assert len(set(pids)) == 1 and _servers(lab) == pids[:1]
    a = TrafficRun.start(lab, udp=10, rate=10.0, duration=1.0, mode="plain")
    b = TrafficRun.start(lab, tcp=5, udp=10, rate=10.0, duration=1.0, mode="plain")
    try:
        a.wait_ready()
        b.wait_ready()
        ra, rb = a.wait(), b.wait()
    finally:
        a.kill()
        b.kill()
    assert ra["run"] != rb["run"]
    for rep, n in ((ra, 10), (rb, 15)):
        assert rep["alive"] == n and rep["lost_replies"] == 0, rep["states"]
        assert rep["server_duplicates"] == 0 and rep["bad_replies"] == 0
        assert all(f["server_received"] == f["sent"] for f in rep["per_flow"])
