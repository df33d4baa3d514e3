"""Commit, then claim (issue 7, "never the other order"), with the kernel copies missing.

``[membership] preinject = false``: the survivors keep the standby copies in their stores only,
so their kernels hold nothing of the dead node's flows when it dies (checked through conntrack
before the kill). The takeover must then commit the inherited entries (the safety pass) before
the buckets enter ``@owned``: the takeover records show the safety pass injecting every entry
of the inherited buckets, then the claim; the survivors' kernels hold the flows after it; and
every flow survives with its NAT peer. Claiming first would have sent the flows' packets to a
node without their state: TCP (``nf_conntrack_tcp_loose=0``) dropped as invalid, new UDP and NAT
entries created from the wrong state.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from lbsync.lab import daemons
from lbsync.lab.farm import Lab
from tests.kernel.test_failover_takeover import (
    DEADLINE,
    SETTLE,
    brief,
    check_survived,
    daemon_lab,
    flow_counts,
    initial_map,
    owned_once_as,
    replies_after,
    start_traffic,
    takeovers_of,
)

pytestmark = pytest.mark.kernel


def marked(lab: Lab, node: int, buckets: set[int]) -> int:
    """Conntrack entries in ``node``'s kernel whose mark is one of ``buckets``."""
    return sum(1 for e in lab.conntrack(lab.node_ns(node)) if e.mark in buckets)


def test_without_kernel_copies_the_takeover_commits_then_claims(
        lab_factory: Callable[..., Lab]) -> None:
    tcp, udp = flow_counts()
    with daemon_lab(lab_factory, preinject=False) as lab:
        om = initial_map(lab)
        victim = 3
        after = om.successor_map(victim)
        inherited = set(om.buckets_of(victim))
        survivors = [i for i in lab.node_ids if i != victim]
        with start_traffic(lab, tcp, udp) as run:
            def stored() -> bool:
                return all(daemons.status(lab, i)["store_entries"] >= tcp + udp
                           for i in lab.node_ids)

            daemons.wait_for(stored, DEADLINE, what="stores filled")
            time.sleep(1.0)
            victim_flows = marked(lab, victim, inherited)
            assert victim_flows > 0
            for i in survivors:
                assert marked(lab, i, inherited) == 0, i
            before = run.snapshot()
            t0 = daemons.kill_daemon(lab, victim, links_down=True)
            daemons.wait_for(lambda: owned_once_as(lab, survivors, after.owners), DEADLINE,
                             what="successors own the dead node's buckets")
            time.sleep(SETTLE)
            rep = run.stop()
        records = [r for i in survivors for r in takeovers_of(lab, i, victim)]
        assert sorted(b for r in records for b in r["buckets"]) == sorted(inherited)
        # the safety pass committed the inherited entries, then the claim followed
        injected = sum(r["injected"] for r in records)
        assert injected >= victim_flows - 2, (injected, victim_flows)  # a flow may just end
        for r in records:
            assert r["safety_pass_s"] > 0 and r["claimed"] == len(r["buckets"]), r
            assert r["claimed_monotonic"] > t0
        for i in survivors:
            assert marked(lab, i, inherited & set(after.buckets_of(i))) > 0, i
        check_survived(rep, flows=tcp + udp)
        silent = replies_after(rep, before, t0 + 1.0)
        assert not silent, (len(silent), [brief(f) for f in silent[:4]])
