"""The incumbent lab (``lbsync lab up --mode vrrp``, :mod:`lbsync.lab.incumbent`): keepalived +
conntrackd FTFW active-backup on two nodes, the same client, server and traffic tool as the
active-active lab.

One drill, outcomes only (the timings belong to ``tests/benchmarks/failover.py``): node 1 holds
the VIPs, conntrackd replicates the SNATed flows into node 2's external cache, node 1 crashes
(keepalived's VRRP child SIGKILLed first, then keepalived and conntrackd, links down), node 2
takes the VIPs, commits, and every flow keeps answering with the same NAT peer and no reset.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lbsync.lab import farm
from lbsync.lab.incumbent import IncumbentLab, render_incumbent_ruleset, up
from lbsync.lab.traffic import TrafficRun
from tests.kernel.conftest import assert_lab_gone, lab_prefix

pytestmark = pytest.mark.kernel

TCP, UDP = 40, 20
DEADLINE = 20.0
SETTLE = 3.0   # after the takeover: TCP's retransmission timer (0.2, 0.6, 1.4 s...)


@pytest.fixture
def incumbent() -> Iterator[IncumbentLab]:
    prefix = lab_prefix()
    lab = None
    try:
        lab = up(prefix, advert_int=0.1)
        yield lab
    finally:
        farm.destroy(prefix)
        assert_lab_gone(prefix)


def wait(pred: object, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_incumbent_failover_flows_survive(incumbent: IncumbentLab) -> None:
    lab = incumbent
    assert lab.master() == 1
    assert not lab.holds_vip(2)
    # the daemons run at lbsync's policy (conntrackd defaults to SCHED_RR 99)
    assert lab.equalise_scheduling() == []
    assert farm.Lab.load(lab.prefix).nodes == 2      # what the traffic tool loads
    assert IncumbentLab.load(lab.prefix).advert_int == 0.1

    with TrafficRun.start(lab, tcp=TCP, udp=UDP, rate=5.0, mode="snat", lookup=True,
                          drain=2.0) as traffic:
        ready = traffic.wait_ready(timeout=60)
        assert ready["connected"] == TCP + UDP
        wait(lambda: lab.external_cache_size(2) >= TCP + UDP, "replication to node 2")
        before = traffic.snapshot()
        assert before["alive"] == TCP + UDP, before["states"]
        assert before["forwarders"] == {"1": TCP + UDP}          # active-backup: node 1 only
        assert {tuple(f["peer"]) for f in before["per_flow"]} \
            <= {(farm.ADDR4.inside_vip, p) for p in range(1, 65536)}  # SNAT to the inside VIP

        t0 = lab.kill_node(1)
        lab.wait_takeover(2)
        wait(lambda: "done primary" in lab.notify_log(2), "node 2's primary script")
        time.sleep(SETTLE)
        rep = traffic.stop()

    log2 = lab.notify_log(2)
    assert "failed" not in log2, log2
    assert lab.holds_vip(2)   # (node 1 still carries them: SIGKILLed, links down)
    assert rep["connected"] == TCP + UDP
    bad = [f for f in rep["per_flow"] if not f["alive"] or f["state"] != "open"
           or f["peer_changes"]]
    assert not bad, (len(bad), bad[:3])
    assert rep["resets"] == 0 and rep["errors"] == 0 and rep["nat_peer_changes"] == 0
    # every flow answered after the crash, through node 2
    kill = t0 - rep["t0_monotonic"]
    assert all(f["last_reply"] > kill for f in rep["per_flow"])
    assert all(2 in f["nodes"] for f in rep["per_flow"]), rep["forwarders"]


def test_incumbent_ruleset_renders_notrack_and_nat() -> None:
    cfg_lab = farm.Lab(prefix="x", nodes=2, ipv6=False, buckets=1,
                       directory=farm.LAB_ROOT / "x",
                       cluster_config=farm.parse_cluster(
                           farm.cluster_dict("x", 2, ipv6=False, buckets=1), "x"),
                       split={}, created=0.0)
    text = render_incumbent_ruleset(cfg_lab)
    assert 'iifname "repl0" udp dport 3780 notrack' in text
    assert "ip protocol 112 notrack" in text
    assert 'iifname { "outside0", "inside0" } ct state invalid drop' in text
    assert "snat ip to 198.18.1.1" in text and "dnat ip to 198.18.1.10:5003" in text
