"""Sender and receiver cores wired by hand: grouping, history, NACK, gone, tail loss,
reordering, incarnations, epochs, silence, suppression, digests."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

import pytest

from lbsync.replication.auth import KeyRing
from lbsync.replication.endpoint import ReplicationEndpoint
from lbsync.replication.events import (
    BucketResynced,
    DatagramsGone,
    DigestCompared,
    Event,
    MembershipReceived,
    RecordsApplied,
    SenderRestarted,
    SenderResumed,
    SenderSilent,
)
from lbsync.replication.params import ProtocolParams
from lbsync.replication.sender import REPAIR_ROOM
from lbsync.replication.store import FLOW, BucketStore
from lbsync.replication.wire import (
    HEADER_LEN,
    MAC_LEN,
    TYPE_CONTROL,
    FlowUpdate,
    Gone,
    Limits,
    LocalProtocolError,
    Membership,
    Nack,
    Parity,
    RepairState,
    decode_body,
    parse_header,
)

KR = KeyRing({1: b"k" * 32}, 1)
P = ProtocolParams(buckets=8)
P_LIMITS = Limits(buckets=8)


def ep(node: int, params: ProtocolParams = P, incarnation: int = 1, now: float = 0.0,
       store: BucketStore | None = None) -> ReplicationEndpoint:
    return ReplicationEndpoint(node_id=node, incarnation=incarnation, keyring=KR,
                               params=params, now=now, rng=random.Random(node), store=store)


def events(e: ReplicationEndpoint) -> list[Event]:
    out = []
    while (x := e.next_event()) is not None:
        out.append(x)
    return out


def control_messages(datagrams: Iterable[bytes]) -> list[object]:
    out: list[object] = []
    for d in datagrams:
        if parse_header(d).type == TYPE_CONTROL:
            out.extend(decode_body(d[HEADER_LEN:-MAC_LEN], TYPE_CONTROL, P_LIMITS))
    return out



def run(nodes: list[ReplicationEndpoint], until: float, now: float,
        drop: object = None) -> float:
    """Deliver everything instantly between ``nodes`` and fire timers until ``until``."""
    drop_fn = drop if callable(drop) else (lambda src, dst, d: False)
    while True:
        moved = True
        while moved:
            moved = False
            for src in nodes:
                for d in src.datagrams_to_send():
                    moved = True
                    for dst in nodes:
                        if dst is not src and not drop_fn(src, dst, d):
                            dst.datagram_received(d, now)
        deadlines = [t for t in (n.get_timer() for n in nodes) if t is not None]
        nxt = min(deadlines)
        if nxt > until:
            return until
        now = max(now, nxt)
        for n in nodes:
            t = n.get_timer()
            if t is not None and t <= now:
                n.handle_timer(now)


def test_grouping_by_size_and_by_delay() -> None:
    a = ep(1)
    a.claim(0, 1, 0.0, announce=False)
    for i in range(30):
        a.update_flow(0, b"k%d" % i, b"r" * 100, 0.0)
    full = a.datagrams_to_send()
    assert len(full) >= 2 and all(len(d) <= P.max_datagram for d in full)
    # Full ones are really full (up to the room kept for a parity's framing).
    assert all(len(d) > P.max_datagram - REPAIR_ROOM - 150 for d in full)
    assert a.get_timer() == pytest.approx(P.flush_delay)
    a.handle_timer(P.flush_delay)
    rest = a.datagrams_to_send()
    assert len(rest) == 1
    sent = sum(len(decode_body(d[HEADER_LEN:-MAC_LEN], 1, P_LIMITS)) for d in full + rest)
    assert sent == 30


def test_history_bounded_in_datagrams_and_bytes() -> None:
    a = ep(1, ProtocolParams(buckets=8, history_datagrams=5, history_bytes=10**9))
    a.claim(0, 1, 0.0, announce=False)
    for i in range(20):
        a.update_flow(0, b"k%d" % i, b"r" * 1000, 0.0)
    a.flush(0.0)
    s = a.statistics().sender
    assert s.history_datagrams == 5 and s.oldest == s.next_seq - 5 and s.history_evicted == 15
    b = ep(1, ProtocolParams(buckets=8, history_datagrams=1000, history_bytes=3000))
    b.claim(0, 1, 0.0, announce=False)
    for i in range(20):
        b.update_flow(0, b"k%d" % i, b"r" * 1000, 0.0)
    b.flush(0.0)
    assert b.statistics().sender.history_bytes <= 3000


def test_lost_datagram_nacked_and_retransmitted_byte_for_byte() -> None:
    a, b = ep(1), ep(2)
    a.claim(3, 1, 0.0, announce=False)
    for i in range(40):
        a.update_flow(3, b"k%d" % i, b"x" * 90, 0.0)
    a.flush(0.0)
    ds = a.datagrams_to_send()
    for i, d in enumerate(ds):
        if i != 1:
            b.datagram_received(d, 0.0)
    assert b.statistics().receiver.gaps_open == 1
    assert not b.datagrams_to_send()  # the NACK waits a random delay (suppression)
    nacks: list[Nack] = []
    while not nacks:  # a block still filling: the rest of it gets nack_block_wait to come
        t = b.get_timer()
        assert t is not None and 0 < t <= P.nack_delay + P.nack_block_wait
        b.handle_timer(t)
        ctl = b.datagrams_to_send()
        nacks = [m for m in control_messages(ctl) if isinstance(m, Nack)]
    assert nacks[0].target == 1
    for d in ctl:
        a.datagram_received(d, t)
    # Answered with parities of the repair block: one for the datagram named plus one of
    # redundancy (either alone rebuilds it), each in its own CONTROL datagram.
    repair = a.datagrams_to_send()
    parities = [m for m in control_messages(repair) if isinstance(m, Parity)]
    assert len(repair) == len(parities) == 1 + P.parity_min_extra
    assert {p.row for p in parities} == {0, 1} and parities[0].count == len(ds)
    b.datagram_received(repair[1], t)  # the first one lost
    assert b.statistics().receiver.datagrams_rebuilt == 1
    assert b.store.snapshot(3) == a.store.snapshot(3)
    b.datagram_received(repair[0], t)  # the late one is of no use any more, and harmless
    b.datagram_received(ds[1], t)
    assert b.statistics().rejected == {"duplicate": 1}
    assert b.statistics().receiver.datagrams_rebuilt == 1


def test_rebuilt_datagram_is_authenticated_like_any_other() -> None:
    a, b = ep(1), ep(2)
    a.claim(3, 1, 0.0, announce=False)
    for i in range(40):
        a.update_flow(3, b"k%d" % i, b"x" * 90, 0.0)
    a.flush(0.0)
    ds = a.datagrams_to_send()
    for d in ds[1:]:
        b.datagram_received(d, 0.0)
    a.sender.on_nack(1, ((1, 1),), 0.01)
    forged = bytearray(a.datagrams_to_send()[0])
    # Corrupt the parity's payload, then re-sign the CONTROL datagram: a buggy (but keyed)
    # peer. The rebuilt DATA datagram fails its own MAC and nothing is applied.
    forged[80] ^= 0xFF  # inside the coded datagram (past the framing and its length)
    forged[-MAC_LEN:] = KR.sign(bytes(forged[:-MAC_LEN]))
    b.datagram_received(bytes(forged), 0.01)
    assert b.statistics().rejected.get("bad_mac") == 1
    assert b.statistics().receiver.gaps_open == 1


def test_block_partly_out_of_history_is_repaired_by_plain_retransmission() -> None:
    params = ProtocolParams(buckets=8, history_datagrams=4)
    a, b = ep(1, params), ep(2, params)
    a.claim(0, 1, 0.0, announce=False)
    for i in range(60):
        a.update_flow(0, b"k%d" % i, b"x" * 100, 0.0)
    a.flush(0.0)
    ds = a.datagrams_to_send()
    assert len(ds) > 4 and a.sender.oldest > 1
    last = a.sender.last_seq
    for d in ds[:-1]:
        b.datagram_received(d, 0.0)
    a.sender.on_nack(1, ((last, 1),), 0.01)
    assert a.datagrams_to_send() == [ds[-1]]
    assert a.statistics().sender.parities_sent == 0


def test_out_of_order_is_kept_and_applied_in_order() -> None:
    a, b = ep(1), ep(2)
    a.claim(1, 1, 0.0, announce=False)
    a.update_flow(1, b"k", b"v1", 0.0)
    a.flush(0.0)
    a.update_flow(1, b"k", b"v2", 0.001)
    a.flush(0.001)
    d1, d2 = a.datagrams_to_send()
    b.datagram_received(d2, 0.002)
    assert b.store.get(FLOW, 1, b"k") is None  # held in the reorder buffer, not applied
    b.datagram_received(d1, 0.003)
    assert b.store.get(FLOW, 1, b"k") == b"v2"
    assert b.statistics().receiver.nacked_seqs == 0
    b.datagram_received(d1, 0.004)
    assert b.statistics().rejected["duplicate"] == 1


def test_gone_falls_back_to_resync_of_the_affected_buckets_only() -> None:
    params = ProtocolParams(buckets=8, history_datagrams=3)
    a, b = ep(1, params), ep(2, params)
    for bucket in range(8):
        a.claim(bucket, 1, 0.0, announce=False)
    for bucket in range(8):  # one populated bucket per datagram
        for i in range(12):
            a.update_flow(bucket, b"b%dk%d" % (bucket, i), b"r" * 100, 0.0)
        a.flush(0.0)
    ds = a.datagrams_to_send()
    seq_of_bucket2 = [i for i, d in enumerate(ds) if b"b2k" in d]
    for i, d in enumerate(ds):
        if i not in seq_of_bucket2:
            b.datagram_received(d, 0.0)
    run([a, b], 2.0, 0.0)
    ev = events(b)
    gone = [e for e in ev if isinstance(e, DatagramsGone)]
    assert gone and gone[0].buckets == (2,)
    resynced = [e for e in ev if isinstance(e, BucketResynced)]
    assert [e.bucket for e in resynced] == [2] and resynced[0].agreed
    assert a.statistics().sender.resync_buckets == 1
    for bucket in range(8):
        assert b.store.snapshot(bucket) == a.store.snapshot(bucket)


def test_tail_loss_high_water_mark_with_backoff() -> None:
    a, b = ep(1), ep(2)
    a.claim(0, 1, 0.0, announce=False)
    a.update_flow(0, b"k", b"v", 0.0)
    a.flush(0.0)
    a.datagrams_to_send()  # the last (and only) datagram is lost
    times = []
    now = 0.0
    for _ in range(7):
        now = a.get_timer()  # type: ignore[assignment]
        a.handle_timer(now)
        times.append(round(now, 6))
        a.datagrams_to_send()
    gaps = [round(y - x, 6) for x, y in itertools.pairwise(times)]
    assert times[0] == pytest.approx(P.idle)
    assert gaps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]  # doubles up to idle_max
    # A receiver that hears only a high-water mark still notices and repairs the loss.
    a.handle_timer(a.get_timer())  # type: ignore[arg-type]
    for d in a.datagrams_to_send():
        b.datagram_received(d, now)
    run([a, b], now + 1.0, now)
    assert b.store.get(FLOW, 0, b"k") == b"v"


def test_owner_epoch_rule_over_the_wire() -> None:
    old, new, c = ep(1), ep(2), ep(3)
    old.claim(4, 1, 0.0, announce=False)
    old.update_flow(4, b"k", b"old", 0.0)
    old.flush(0.0)
    late = old.datagrams_to_send()
    new.claim(4, 2, 0.0, announce=False)
    new.update_flow(4, b"k", b"new", 0.0)
    new.flush(0.0)
    for d in new.datagrams_to_send():
        c.datagram_received(d, 0.0)
    for d in late:  # the former owner's datagram arrives after the new owner's
        c.datagram_received(d, 0.01)
    assert c.store.get(FLOW, 4, b"k") == b"new"
    assert c.statistics().receiver.records_stale == 1


def test_new_incarnation_resyncs_and_drops_what_the_sender_no_longer_has() -> None:
    a, b = ep(1), ep(2)
    a.claim(0, 1, 0.0, announce=False)
    a.update_flow(0, b"gone-while-down", b"v", 0.0)
    a.update_flow(0, b"kept", b"v", 0.0)
    now = run([a, b], 0.5, 0.0)
    assert len(b.store) == 2
    # Restart: the kernel still has "kept", "gone-while-down" expired meanwhile.
    store = BucketStore(8)
    a2 = ep(1, incarnation=2, now=now, store=store)
    a2.claim(0, 1, now)
    store.put(FLOW, 0, 1, b"kept", b"v")
    a2.send_membership(1, b"hello", now)
    now = run([a2, b], now + 2.0, now)
    ev = events(b)
    assert any(isinstance(e, SenderRestarted) and e.incarnation == 2 for e in ev)
    assert b.store.snapshot(0) == ({b"kept": b"v"}, {})
    # The old incarnation is now rejected.
    a.update_flow(0, b"zombie", b"v", now)
    a.flush(now)
    for d in a.datagrams_to_send():
        b.datagram_received(d, now)
    assert b.statistics().rejected["old_incarnation"] >= 1
    assert b.store.get(FLOW, 0, b"zombie") is None


def test_silent_sender_is_reported_and_its_records_stay() -> None:
    a, b = ep(1), ep(2)
    a.claim(0, 1, 0.0, announce=False)
    a.update_flow(0, b"k", b"v", 0.0)
    now = run([a, b], 0.2, 0.0)
    now = run([b], now + P.silent_after + 0.5, now)  # a is gone
    ev = events(b)
    silent = [e for e in ev if isinstance(e, SenderSilent)]
    assert len(silent) == 1 and silent[0].sender == 1
    assert b.store.get(FLOW, 0, b"k") == b"v"
    assert b.statistics().receiver.silent_peers == 1
    run([a, b], now + 0.1, now)
    assert any(isinstance(e, SenderResumed) for e in events(b))


def test_overheard_nack_suppresses_our_own() -> None:
    a, b, c = ep(1), ep(2), ep(3)
    a.claim(0, 1, 0.0, announce=False)
    for i in range(30):
        a.update_flow(0, b"k%d" % i, b"x" * 100, 0.0)
    a.flush(0.0)
    ds = a.datagrams_to_send()
    for r in (b, c):
        for i, d in enumerate(ds):
            if i != 0:
                r.datagram_received(d, 0.0)
    tb, tc = b.get_timer(), c.get_timer()
    assert tb is not None and tc is not None and tb != tc
    first, second = (b, c) if tb < tc else (c, b)
    first.handle_timer(min(tb, tc))
    ctl = first.datagrams_to_send()
    for d in ctl:
        second.datagram_received(d, min(tb, tc))
        a.datagram_received(d, min(tb, tc))
    second.handle_timer(max(tb, tc))
    assert not [m for m in control_messages(second.datagrams_to_send()) if isinstance(m, Nack)]
    assert second.statistics().receiver.nacks_suppressed == 1
    repair = a.datagrams_to_send()
    assert len(repair) == 1 + P.parity_min_extra
    for d in repair:
        second.datagram_received(d, max(tb, tc))
    assert second.store.snapshot(0) == a.store.snapshot(0)


def _one_block(a: ReplicationEndpoint, now: float = 0.0) -> list[bytes]:
    """A whole repair block (16 datagrams) and one more from ``a``."""
    a.claim(0, 1, now, announce=False)
    for i in range(17):
        a.update_flow(0, b"k%d" % i, b"x" * 100, now)
        a.flush(now)
    return a.datagrams_to_send()


def test_receiver_missing_more_of_a_block_asks_first() -> None:
    """The NACK delay of a whole block shrinks with what a receiver misses of it: the one
    missing most asks first, its burst is sized for it and serves the others."""
    a, b, c = ep(1), ep(2), ep(3)
    ds = _one_block(a)
    for i, d in enumerate(ds):
        if i != 3:
            b.datagram_received(d, 0.0)
        if i not in (1, 3, 5, 7, 9):
            c.datagram_received(d, 0.0)
    tb, tc = b.get_timer(), c.get_timer()
    assert tb is not None and tc is not None and tc < tb <= P.nack_delay
    c.handle_timer(tc)
    nack = c.datagrams_to_send()
    assert [m for m in control_messages(nack) if isinstance(m, Nack)]
    for d in nack:
        b.datagram_received(d, tc)
        a.datagram_received(d, tc)
    assert b.statistics().receiver.nacks_suppressed == 1
    burst = a.datagrams_to_send()
    assert len(burst) == P.parity_burst(5)
    for d in burst:
        b.datagram_received(d, tc)
        c.datagram_received(d, tc)
    assert b.store.snapshot(0) == c.store.snapshot(0) == a.store.snapshot(0)
    assert b.statistics().receiver.nack_messages == 0


def test_suppressed_receiver_asks_when_the_heard_nack_brings_no_burst() -> None:
    """Another receiver's NACK lost on its way to the sender: no parity follows. The receiver
    that heard it sends no NACK datagram for the block (it was asked for): its next CONTROL
    datagram sent anyway (a heartbeat) carries a RepairState naming the gap, which the sender
    answers as a NACK."""
    a, b, c = ep(1), ep(2), ep(3)
    ds = _one_block(a)
    for r in (b, c):
        for i, d in enumerate(ds):
            if i != 2:
                r.datagram_received(d, 0.0)
    tb, tc = b.get_timer(), c.get_timer()
    assert tb is not None and tc is not None
    first, second = (b, c) if tb < tc else (c, b)
    t0 = min(tb, tc)
    first.handle_timer(t0)
    for d in first.datagrams_to_send():
        second.datagram_received(d, t0)  # the sender never hears it
    t1 = second.get_timer()
    assert t1 is not None and t0 + P.repair_wait <= t1 <= t0 + P.repair_wait + P.nack_delay
    second.handle_timer(t1)
    assert not [m for m in control_messages(second.datagrams_to_send()) if isinstance(m, Nack)]
    second.send_membership(1, b"heartbeat", t1 + 0.001)
    beat = second.datagrams_to_send()
    assert len(beat) == 1
    states = [m for m in control_messages(beat) if isinstance(m, RepairState)]
    assert states == [RepairState(1, 1, ((1, 1 << 2),))]
    assert any(isinstance(m, Membership) for m in control_messages(beat))
    a.datagram_received(beat[0], t1 + 0.001)
    burst = a.datagrams_to_send()
    assert len(burst) == P.parity_burst(1)
    assert a.statistics().sender.repair_states_received == 1
    for d in burst:
        second.datagram_received(d, t1 + 0.002)
    assert second.store.snapshot(0) == a.store.snapshot(0)
    assert second.statistics().receiver.nack_messages == 0


def test_without_carriers_a_gap_is_nacked_again_after_the_fallback() -> None:
    """A node without heartbeats still repairs: its tail probes carry the repair state, and a
    gap that no datagram carried for ``nack_fallback`` (the probes back off to 1 s) is
    NACKed again; never sooner."""
    a, b = ep(1), ep(2)
    ds = _one_block(a)
    for i, d in enumerate(ds):
        if i != 4:
            b.datagram_received(d, 0.0)
    asked: list[tuple[float, str]] = []  # every request for the gap; all of them are lost
    now = 0.0
    while now < 2.0:
        t = b.get_timer()
        assert t is not None
        now = t
        b.handle_timer(now)
        for m in control_messages(b.datagrams_to_send()):
            if isinstance(m, Nack):
                assert m.ranges == ((5, 1),)
                asked.append((now, "nack"))
            elif isinstance(m, RepairState):
                assert m.blocks == ((1, 1 << 4),)
                asked.append((now, "state"))
    kinds = [k for _t, k in asked]
    assert kinds[0] == "nack" and "state" in kinds and kinds.count("nack") >= 2
    for (t0, _k), (t1, k) in itertools.pairwise(asked):
        assert t1 - t0 >= (P.nack_fallback if k == "nack" else P.repair_quiet) - 1e-9
    assert b.statistics().receiver.nack_fallbacks == kinds.count("nack") - 1


def test_repair_state_rides_only_on_datagrams_sent_anyway() -> None:
    """Piggybacking never makes a datagram: with gaps open the node sends exactly the CONTROL
    datagrams it sends without them, and a NACK datagram carries no repair state."""
    a = ep(1)
    ds = _one_block(a)
    counts = []
    for missing in (False, True):
        b = ep(2)
        for i, d in enumerate(ds):
            if not (missing and i in (3, 6)):
                b.datagram_received(d, 0.0)
        sent: list[bytes] = []
        now, beat = 0.0, 0.04
        while now < 1.0:
            t = b.get_timer()
            assert t is not None
            now = min(t, beat)
            if now == beat:  # a heartbeat every 40 ms
                b.send_membership(1, b"hb", now)
                beat += 0.04
            else:
                b.handle_timer(now)
            sent.extend(b.datagrams_to_send())
        states = [d for d in sent if any(isinstance(m, RepairState)
                                          for m in control_messages([d]))]
        nacks = [d for d in sent if any(isinstance(m, Nack) for m in control_messages([d]))]
        assert not set(states) & set(nacks)
        assert bool(states) == missing
        counts.append(len(sent) - len(nacks))
    assert counts[0] == counts[1]


def test_sender_answers_a_seq_once_per_holdoff() -> None:
    a, b, c = ep(1), ep(2), ep(3)
    a.claim(0, 1, 0.0, announce=False)
    a.update_flow(0, b"k", b"v", 0.0)
    a.flush(0.0)
    a.datagrams_to_send()
    a.handle_timer(P.idle)
    hwm = a.datagrams_to_send()
    for r in (b, c):
        for d in hwm:
            r.datagram_received(d, P.idle)
    for r in (b, c):  # neither hears the other: both NACK
        sent: list[bytes] = []
        while not [m for m in control_messages(sent) if isinstance(m, Nack)]:
            r.handle_timer(r.get_timer())  # type: ignore[arg-type]
            sent = r.datagrams_to_send()
        for d in sent:
            a.datagram_received(d, P.idle + 0.01)
    assert len(a.datagrams_to_send()) == 1 + P.parity_min_extra  # one burst of parities
    assert a.statistics().sender.retransmit_held == 1


def test_digest_mismatch_repairs_only_that_bucket() -> None:
    a, b = ep(1), ep(2)
    for bucket in (0, 1):
        a.claim(bucket, 1, 0.0, announce=False)
        for i in range(5):
            a.update_flow(bucket, b"b%dk%d" % (bucket, i), b"v", 0.0)
    now = run([a, b], 0.5, 0.0)
    b.store.clear_bucket(1)  # corrupted behind the protocol's back
    a.send_digests([0, 1], now)
    now = run([a, b], now + 2.0, now)
    ev = events(b)
    compared = {e.bucket: e.agreed for e in ev if isinstance(e, DigestCompared)}
    assert compared == {0: True, 1: False}
    assert [e.bucket for e in ev if isinstance(e, BucketResynced)] == [1]
    assert b.store.snapshot(1) == a.store.snapshot(1)
    assert b.statistics().receiver.buckets_disagreeing == ()  # repaired
    b.store.clear_bucket(0)
    a.send_digests([0], now)
    for d in a.datagrams_to_send():
        b.datagram_received(d, now)
    a.flush(now)
    for d in a.datagrams_to_send():
        b.datagram_received(d, now)
    assert b.statistics().receiver.buckets_disagreeing == (0,)


def test_reorder_buffer_is_bounded_and_overflow_refetched() -> None:
    params = ProtocolParams(buckets=8, reorder_datagrams=4)
    a, b = ep(1, params), ep(2, params)
    a.claim(0, 1, 0.0, announce=False)
    for i in range(10):
        a.update_flow(0, b"k%d" % i, b"v", 0.0)
        a.flush(0.0)
    ds = a.datagrams_to_send()
    for d in ds[1:]:
        b.datagram_received(d, 0.0)
    s = b.statistics().receiver
    assert s.reorder_buffered <= 4 and s.reorder_overflow == 6
    run([a, b], 1.0, 0.0)
    assert b.store.snapshot(0) == a.store.snapshot(0)


def test_full_store_refuses_and_counts() -> None:
    a = ep(1)
    b = ep(2, store=BucketStore(8, max_entries=3))
    a.claim(0, 1, 0.0, announce=False)
    for i in range(5):
        a.update_flow(0, b"k%d" % i, b"v", 0.0)
    run([a, b], 0.5, 0.0)
    assert b.statistics().store.refused_full == 2 and len(b.store) == 3
    assert b.statistics().receiver.records_refused == 2


def test_records_applied_events_carry_the_changes() -> None:
    a, b = ep(1), ep(2)
    a.claim(0, 1, 0.0, announce=False)
    a.update_flow(0, b"k", b"v", 0.0)
    a.delete_flow(0, b"k", 0.0)
    a.update_expectation(0, b"e", b"x", 0.0)
    run([a, b], 0.1, 0.0)
    applied = [e for e in events(b) if isinstance(e, RecordsApplied)]
    assert len(applied) == 1 and applied[0].sender == 1
    assert applied[0].changes[0] == FlowUpdate(0, 1, b"k", b"v")
    assert len(applied[0].changes) == 3


def test_membership_messages_pass_through() -> None:
    a, b = ep(1), ep(2)
    a.send_membership(3, b"view=1", 0.0)
    for d in a.datagrams_to_send():
        b.datagram_received(d, 0.0)
    assert [e for e in events(b) if isinstance(e, MembershipReceived)] == [
        MembershipReceived(1, 1, 3, b"view=1")]


def test_local_misuse_is_a_local_error() -> None:
    a = ep(1)
    with pytest.raises(LocalProtocolError):
        a.update_flow(0, b"k", b"v", 0.0)  # not owned
    a.claim(0, 1, 0.0, announce=False)
    with pytest.raises(LocalProtocolError):
        a.update_flow(0, b"k", b"v" * 2000, 0.0)
    with pytest.raises(LocalProtocolError):
        a.update_flow(0, b"", b"v", 0.0)
    with pytest.raises(LocalProtocolError):
        ep(0)


def test_resync_is_paced_and_never_delays_live_updates() -> None:
    params = ProtocolParams(buckets=8, resync_rate=10_000.0, resync_burst=100)
    a, b = ep(1, params), ep(2, params)
    a.claim(0, 1, 0.0, announce=False)
    a.claim(1, 1, 0.0, announce=False)
    for i in range(5000):
        a.store.put(FLOW, 0, 1, b"big%d" % i, b"r" * 60)  # state the peers never saw
    b.request_resync(1, [0], 0.0)
    now, next_live, n_live = 0.0, 0.001, 0
    sent_at: dict[bytes, float] = {}
    latency: list[float] = []
    while now < 0.2:  # 200 ms with a live update every millisecond
        timers = [t for t in (a.get_timer(), b.get_timer()) if t is not None]
        now = min([*timers, next_live])
        for n in (a, b):
            t = n.get_timer()
            if t is not None and t <= now:
                n.handle_timer(now)
        if now >= next_live:
            n_live += 1
            key = b"live%d" % n_live
            a.update_flow(1, key, b"x", now)
            sent_at[key] = now
            next_live += 0.001
        for src, dst in ((a, b), (b, a)):
            for d in src.datagrams_to_send():
                dst.datagram_received(d, now)
        for key, t0 in list(sent_at.items()):
            if b.store.get(FLOW, 1, key) is not None:
                latency.append(now - t0)
                del sent_at[key]
    # Every live update arrived within the flush delay, whatever the resync backlog.
    assert len(latency) >= 195 and max(latency) <= params.flush_delay + 1e-9
    # The resync went at its configured rate (10k records/s), not as fast as possible.
    done = a.statistics().sender.resync_records
    assert 1500 <= done <= 10_000 * 0.2 + params.resync_burst
    assert done - 50 <= b.store.count(0) <= done  # the last few are in the open datagram


def _nackers(receivers: list[ReplicationEndpoint], ds: list[bytes], t0: float = 0.0,
             *, probes: bool = True) -> list[int]:
    """The receivers that send a NACK datagram for the block ``ds`` (its seventh datagram
    lost to all of them, no NACK heard from each other), over 0.1 s from ``t0``."""
    nackers = []
    for r in receivers:
        for i, d in enumerate(ds):
            if i != 6:
                r.datagram_received(d, t0)
        sent: list[object] = []
        now = t0
        while now < t0 + 0.1:
            t = r.get_timer()
            assert t is not None
            now = t
            r.handle_timer(now)
            sent.extend(control_messages(r.datagrams_to_send()))
        if [m for m in sent if isinstance(m, Nack)]:
            nackers.append(r.node_id)
        # on its tail probes (a receiver idle since long probes at T_max: none within 0.1 s)
        assert not probes or [m for m in sent if isinstance(m, RepairState)]
    return nackers


def test_only_the_designated_receivers_nack_a_block() -> None:
    """Six receivers miss the same datagram and hear none of each other's NACKs: only
    ``nack_designated`` of them (the same ones on every node, by a per-block rank) send a NACK
    datagram for the block; the others ask in their heartbeats. So no gap is named by more
    than that many NACK datagrams, however the timers fall."""
    a = ep(1)
    receivers = [ep(n) for n in range(2, 8)]
    for r in receivers:  # everybody has heard everybody (heartbeats)
        for other in receivers:
            if other is not r:
                other.send_membership(1, b"hb", 0.0)
                for d in other.datagrams_to_send():
                    r.datagram_received(d, 0.0)
    assert len(_nackers(receivers, _one_block(a))) == P.nack_designated


def _configured(node: int, nodes: Iterable[int]) -> ReplicationEndpoint:
    return ReplicationEndpoint(node_id=node, incarnation=1, keyring=KR, params=P, now=0.0,
                               rng=random.Random(node), nodes=nodes)


def test_at_a_streams_start_the_configured_nodes_not_heard_yet_count_too() -> None:
    """The same loss at the very start, before any receiver has heard another: with the
    farm's node list, unheard nodes count in the rank, so still only ``nack_designated``
    receivers NACK (without it each counted itself in: found in the sim, a gap named three
    times 20 ms into a stream). After ``silent_after`` a node never heard no longer counts:
    a farm with dead nodes is not left without NACKers."""
    farm = range(1, 8)
    assert len(_nackers([ep(n) for n in range(2, 8)], _one_block(ep(1)))) \
        > P.nack_designated  # the case: nobody heard anybody
    assert len(_nackers([_configured(n, farm) for n in range(2, 8)], _one_block(ep(1)))) \
        == P.nack_designated
    late = P.silent_after + 1.0
    alone = _configured(2, farm)  # nodes 3..7 never heard, past the start-up window
    owner = ep(1, now=late)
    assert _nackers([alone], _one_block(owner, late), late, probes=False) == [2]


def test_gone_is_counted_from_its_own_start_not_from_where_the_receiver_is() -> None:
    """A receiver already past the start of a ``Gone`` range skips only the rest of the range:
    counted from its own position, it skipped datagrams that were not gone (found by the
    stateful test: a resync answer skipped, records lost)."""
    a, b = ep(1), ep(2)
    a.claim(0, 1, 0.0, announce=False)
    for i in range(6):
        a.update_flow(0, b"k%d" % i, b"v", 0.0)
        a.flush(0.0)
    ds = a.datagrams_to_send()
    for d in ds[:4]:  # seqs 1..4 delivered; 5 and 6 only buffered behind a gap
        b.datagram_received(d, 0.0)
    b.datagram_received(ds[5], 0.0)
    assert b.receiver.peer_position(1) == (1, 5, 1)
    a.sender.queue_control(Gone(((3, 3),), (0,)))  # seqs 3..5: b lacks only 5
    a.sender.flush_control(0.0)
    for d in a.datagrams_to_send():
        b.datagram_received(d, 0.0)
    assert b.receiver.peer_position(1) == (1, 7, 0)  # 5 skipped, 6 delivered, not skipped
    assert b.store.get(FLOW, 0, b"k5") == b"v"
    assert b.statistics().receiver.gone_seqs == 1


def test_nack_from_a_receiver_a_window_behind_the_history_skips_it_to_the_present() -> None:
    """Older than the history and more than a reorder window behind: one ``Gone`` up to the
    sender's position, with the buckets of all of it; within a window: only the range named."""
    params = ProtocolParams(buckets=8, history_datagrams=3, reorder_datagrams=4)

    def sent_eight() -> ReplicationEndpoint:
        e = ep(1, params)
        for bucket in range(8):
            e.claim(bucket, 1, 0.0, announce=False)
        for bucket in range(8):
            e.update_flow(bucket, b"k", b"v", 0.0)
            e.flush(0.0)
        e.datagrams_to_send()  # seqs 1..8, one bucket each; the history holds 6..8
        return e

    a = sent_eight()
    a.sender.on_nack(1, ((5, 1),), 0.0)  # next seq 9 - 5 <= 4: the range named
    a.sender.flush_control(0.0)
    gone = [m for m in control_messages(a.datagrams_to_send()) if isinstance(m, Gone)]
    assert gone == [Gone(((5, 1),), (4,))]
    a2 = sent_eight()
    a2.sender.on_nack(1, ((2, 2),), 0.0)  # 9 - 2 > 4: everything up to seq 8
    a2.sender.flush_control(0.0)
    gone = [m for m in control_messages(a2.datagrams_to_send()) if isinstance(m, Gone)]
    assert gone == [Gone(((2, 7),), (1, 2, 3, 4, 5, 6, 7))]
