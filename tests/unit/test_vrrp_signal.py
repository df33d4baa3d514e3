"""keepalived's events in the daemon without a daemon: :class:`VrrpSignal` dispatch to a sink,
and :class:`Ops`' link-failure decision (keepalived's FAULT first, the poll as a fallback)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lbsync import ops as ops_mod
from lbsync.control import ControlError
from lbsync.ops import Ops
from lbsync.vrrp_adapter import RECENT_EVENTS, VrrpSignal


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = False

    def vrrp_peer_verdict(self, peer: int, dead: bool) -> None:
        if self.fail:
            raise RuntimeError("consumer broke")
        self.calls.append(("verdict", peer, dead))

    def vrrp_own_link(self, failed: bool) -> None:
        self.calls.append(("link", failed))

    def vrrp_signal_lost(self, reason: str) -> None:
        self.calls.append(("lost", reason))


def signal(tmp_path: Path) -> tuple[VrrpSignal, Sink]:
    sink = Sink()
    return VrrpSignal(self_id=1, node_ids=(1, 2, 3), fifo=tmp_path / "f", sink=sink), sink


def notify(sig: VrrpSignal, instance: str, state: str) -> Any:
    async def go() -> Any:
        return await sig.handler()({"instance": instance, "state": state})

    return asyncio.run(go())


def test_events_reach_the_sink(tmp_path: Path) -> None:
    sig, sink = signal(tmp_path)
    assert not sig.reporting
    for inst, state in [("lbsync-1", "MASTER"), ("lbsync-2", "BACKUP"), ("lbsync-2", "MASTER"),
                        ("lbsync-2", "BACKUP"), ("lbsync-1", "FAULT"), ("lbsync-1", "BACKUP"),
                        ("lbsync-1", "STOP")]:
        notify(sig, inst, state)
    assert sink.calls == [("verdict", 2, True), ("verdict", 2, False), ("link", True),
                          ("link", False), ("lost", "stopped")]
    st = sig.statistics()
    assert st["events"]["VrrpPeerDeclaredDead"] == 1 and st["events"]["VrrpSignalLost"] == 1
    assert st["interpreter"]["states"]["lbsync-1"] == "STOP"
    assert not st["reporting"]
    assert [e["event"] for e in st["recent"]][:2] == ["VrrpPeerDeclaredDead",
                                                      "VrrpPeerReturned"]


def test_reporting_follows_the_own_instance(tmp_path: Path) -> None:
    sig, _ = signal(tmp_path)
    notify(sig, "lbsync-2", "BACKUP")
    assert sig.reporting
    notify(sig, "lbsync-2", "STOP")      # a peer instance stopping says nothing of ours
    assert sig.reporting
    notify(sig, "lbsync-1", "STOP")
    assert not sig.reporting
    notify(sig, "lbsync-1", "BACKUP")
    assert sig.reporting


def test_a_failing_consumer_is_counted_not_raised(tmp_path: Path) -> None:
    sig, sink = signal(tmp_path)
    sink.fail = True
    notify(sig, "lbsync-3", "MASTER")
    assert sig.statistics()["events"]["sink_errors"] == 1


def test_recent_events_are_bounded_and_bad_requests_refused(tmp_path: Path) -> None:
    sig, _ = signal(tmp_path)
    for _ in range(RECENT_EVENTS):
        notify(sig, "lbsync-2", "MASTER")
        notify(sig, "lbsync-2", "BACKUP")
    assert len(sig.statistics()["recent"]) == RECENT_EVENTS
    with pytest.raises(ControlError):
        notify(sig, "lbsync-2", "SLEEPING")


def test_a_fifo_that_cannot_be_opened_is_reported(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a regular file")
    sig, _ = signal(tmp_path)

    async def go() -> bool:
        return sig.start()

    assert asyncio.run(go()) is False
    assert "not a FIFO" in sig.statistics()["fifo_error"]


# ------------------------------------------------------------------ Ops: link failure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


class FakeMs:
    drained = False

    def __init__(self) -> None:
        self.verdicts: list[tuple[int, bool]] = []
        self.vrrp_dead: set[int] = set()

    def vrrp_verdict(self, peer: int, dead: bool, now: float) -> None:
        self.verdicts.append((peer, dead))
        (self.vrrp_dead.add if dead else self.vrrp_dead.discard)(peer)


class FakeNode:
    def __init__(self) -> None:
        self.ms = FakeMs()
        self.loop: Any = None
        self.owned = {1, 2}
        self.changed = 0

    def _membership_changed(self) -> None:
        self.changed += 1


class FakeSignal:
    reporting = True


def make_ops(reporting: bool | None) -> tuple[Ops, FakeNode, list[str], Clock]:
    node = FakeNode()
    ops = Ops(node)  # no loop yet: no poll scheduled, no FIFO opened
    clock = Clock()
    node.loop = clock
    calls: list[str] = []
    ops._hand_off_everything = lambda: calls.append("handoff")  # type: ignore[method-assign]
    ops._refresh_kernel_copies = lambda: calls.append("refresh") or True  # type: ignore
    if reporting is not None:
        ops.vrrp = FakeSignal()
        ops.vrrp.reporting = reporting
    return ops, node, calls, clock


def poll(ops: Ops, down: frozenset[str], clock: Clock) -> None:
    if down != ops.link_down:
        ops._poll_down_since = clock.now if down else None
    ops.link_down = down
    ops._apply_link_state("poll")


def test_fault_hands_off_at_once_and_the_poll_waits_as_a_fallback() -> None:
    ops, _node, calls, clock = make_ops(reporting=True)
    ops.vrrp_own_link(True)
    assert calls == ["handoff"] and ops.link_failed
    poll(ops, frozenset({"outside0"}), clock)
    assert calls == ["handoff"]                 # already handed off: nothing twice
    ops.vrrp_own_link(False)
    assert calls == ["handoff"]                 # the poll still sees the link down
    clock.now += 0.1
    poll(ops, frozenset(), clock)
    assert calls == ["handoff", "refresh"] and not ops.link_failed
    st = ops.statistics()
    assert st["link_handoffs_vrrp"] == 1 and st["link_handoffs_poll"] == 0
    assert st["link_recoveries"] == 1
    assert [e["event"] for e in st["link_events"]] == ["handoff", "recovered"]


def test_the_poll_acts_after_the_fallback_delay_when_keepalived_says_nothing() -> None:
    ops, _node, calls, clock = make_ops(reporting=True)
    poll(ops, frozenset({"inside0"}), clock)
    assert calls == []
    clock.now += ops_mod.LINK_POLL_FALLBACK
    poll(ops, frozenset({"inside0"}), clock)
    assert calls == ["handoff"] and ops.statistics()["link_handoffs_poll"] == 1


@pytest.mark.parametrize("reporting", [None, False])
def test_without_keepalived_reporting_the_poll_acts_at_once(reporting: bool | None) -> None:
    ops, _node, calls, clock = make_ops(reporting=reporting)
    poll(ops, frozenset({"outside0"}), clock)
    assert calls == ["handoff"]
    poll(ops, frozenset(), clock)
    assert calls == ["handoff", "refresh"]


def test_verdicts_go_to_membership_and_a_lost_signal_withdraws_them() -> None:
    ops, node, calls, _clock = make_ops(reporting=True)
    ops.vrrp_peer_verdict(2, True)
    ops.vrrp_peer_verdict(3, True)
    ops.vrrp_own_link(True)
    ops.vrrp_signal_lost("fifo_closed")
    assert node.ms.vrrp_dead == set()
    assert sorted(node.ms.verdicts[2:]) == [(2, False), (3, False)]
    # FAULT no longer holds; no link seen down by the poll: the failure is over
    assert calls == ["handoff", "refresh"] and not ops.vrrp_fault
    assert ops.statistics()["vrrp_signal_losses"] == 1
