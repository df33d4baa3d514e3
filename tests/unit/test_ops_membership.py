"""The membership core's planned-handoff API used by lbsync.ops: release, claim (only while
backed) and the peers' reported buckets."""

from __future__ import annotations

import random

from lbsync.membership import Membership, Timing


def core(nodes: tuple[int, ...], resume: tuple[int, ...] = ()) -> Membership:
    return Membership(node_id=1, nodes=nodes, buckets=8, timing=Timing(heartbeat=0.04,
                      miss_count=7), rng=random.Random(1), now=0.0, incarnation=1,
                      resume_owned=resume, ready=True)


def test_release_returns_only_owned_buckets() -> None:
    ms = core((1, 2, 3), resume=(0, 1, 2))
    assert ms.handoff_release([1, 2, 5], 0.1) == frozenset({1, 2})
    assert ms.owned == frozenset({0})


def test_claim_is_refused_while_fenced() -> None:
    ms = core((1, 2, 3))
    assert ms.fenced  # no majority has echoed anything yet
    assert ms.handoff_claimed([3, 4], 0.1) == frozenset()
    assert ms.owned == frozenset()


def test_claim_accepted_when_backed() -> None:
    ms = core((1,))  # a one-voter farm is always backed
    ms.handle_timer(0.0)
    assert not ms.fenced
    assert ms.handoff_claimed([3, 4, 99], 0.1) == frozenset({3, 4})
    assert ms.owned == frozenset({3, 4}) and ms.forwarding(0.2) == frozenset({3, 4})


def test_reported_owned_is_empty_before_any_heartbeat() -> None:
    assert core((1, 2, 3)).reported_owned() == {}
