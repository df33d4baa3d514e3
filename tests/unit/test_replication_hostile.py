"""Hostile input: every bad datagram is rejected and counted by reason, nothing of it is
applied, and no exception leaves the endpoint. Includes validly signed mutated bodies."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbsync.replication.auth import KeyRing
from lbsync.replication.endpoint import ReplicationEndpoint
from lbsync.replication.events import RecordsApplied
from lbsync.replication.params import ProtocolParams
from lbsync.replication.wire import (
    HEADER,
    HEADER_LEN,
    MAC_LEN,
    TYPE_CONTROL,
    TYPE_DATA,
    Limits,
    RemoteProtocolError,
    decode_body,
)
from tests.unit.test_replication_wire import GOLDEN_CONTROL, GOLDEN_DATA, GOLDEN_HEARTBEAT

KR = KeyRing({1: bytes(range(32))}, 1)
P = ProtocolParams(buckets=16)
LIMITS = Limits(buckets=16)


def receiver() -> ReplicationEndpoint:
    return ReplicationEndpoint(node_id=9, incarnation=1, keyring=KR, params=P, now=0.0,
                               rng=random.Random(0))


def resign(data: bytes, ring: KeyRing = KR) -> bytes:
    signed = data[:-MAC_LEN]
    return signed + ring.sign(signed)


def with_header(data: bytes, **fields: int) -> bytes:
    names = ["magic", "version", "type", "sender", "key_id", "flags", "incarnation", "seq",
             "oldest"]
    values = dict(zip(names, HEADER.unpack_from(data), strict=True))
    values.update(fields)
    return resign(HEADER.pack(*values.values()) + data[HEADER_LEN:])


def assert_rejected(ep: ReplicationEndpoint, data: bytes, reason: str) -> None:
    while ep.next_event() is not None:
        pass
    before = ep.statistics()
    ep.datagram_received(data, 1.0)
    after = ep.statistics()
    assert after.rejected.get(reason, 0) == before.rejected.get(reason, 0) + 1, after.rejected
    assert after.store.applied == before.store.applied
    while (e := ep.next_event()) is not None:
        assert not isinstance(e, RecordsApplied)


def test_golden_vectors_are_accepted() -> None:
    ep = receiver()
    ep.datagram_received(GOLDEN_DATA, 0.0)
    ep.datagram_received(GOLDEN_CONTROL, 0.0)
    ep.datagram_received(GOLDEN_HEARTBEAT, 0.0)
    assert not ep.statistics().rejected


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: resign(GOLDEN_DATA, KeyRing({1: b"w" * 32}, 1)), "bad_mac"),
    (lambda: GOLDEN_DATA[:-1] + bytes([GOLDEN_DATA[-1] ^ 1]), "bad_mac"),
    (lambda: with_header(GOLDEN_DATA, key_id=2), "unknown_key"),
    (lambda: GOLDEN_DATA[:60], "bad_mac"),
    (lambda: GOLDEN_DATA[:HEADER_LEN + MAC_LEN], "size"),
    (lambda: GOLDEN_DATA[:10], "size"),
    (lambda: b"", "size"),
    (lambda: GOLDEN_DATA + b"\x00" * 1500, "size"),
    (lambda: with_header(GOLDEN_DATA, sender=9), "own_node"),
    (lambda: b"XY" + GOLDEN_DATA[2:], "bad_magic"),
    (lambda: with_header(GOLDEN_DATA, version=9), "bad_version"),
    (lambda: with_header(GOLDEN_DATA, flags=1), "bad_flags"),
])
def test_bad_datagrams_rejected_by_reason(make: object, reason: str) -> None:
    assert_rejected(receiver(), make(), reason)  # type: ignore[operator]


def test_replays_and_old_incarnations() -> None:
    ep = receiver()
    ep.datagram_received(GOLDEN_DATA, 0.0)
    ep.datagram_received(GOLDEN_CONTROL, 0.0)
    assert_rejected(ep, GOLDEN_DATA, "duplicate")
    assert_rejected(ep, GOLDEN_CONTROL, "replayed")
    ep.datagram_received(with_header(GOLDEN_DATA, incarnation=8, seq=1), 0.5)
    assert_rejected(ep, with_header(GOLDEN_DATA, seq=43), "old_incarnation")
    # Below the control replay window: rejected even if never seen.
    for seq in range(6, 6 + P.control_window + 1):
        ep.datagram_received(with_header(GOLDEN_CONTROL, seq=seq), 0.6)
    assert_rejected(ep, with_header(GOLDEN_CONTROL, seq=4), "replayed")


@given(st.integers(0, len(GOLDEN_DATA) * 8 - 1))
def test_any_bit_flip_is_rejected(bit: int) -> None:
    data = bytearray(GOLDEN_DATA)
    data[bit // 8] ^= 1 << (bit % 8)
    ep = receiver()
    ep.datagram_received(bytes(data), 0.0)
    assert sum(ep.statistics().rejected.values()) == 1
    assert len(ep.store) == 0


@given(st.binary(max_size=1600))
def test_random_datagrams_are_rejected(data: bytes) -> None:
    ep = receiver()
    ep.datagram_received(data, 0.0)
    assert sum(ep.statistics().rejected.values()) == 1 and len(ep.store) == 0


@given(st.binary(max_size=1200))
def test_random_prefix_with_valid_header_and_mac(body: bytes) -> None:
    ep = receiver()
    ep.datagram_received(resign(GOLDEN_DATA[:HEADER_LEN] + body + b"\x00" * MAC_LEN), 0.0)
    stats = ep.statistics()
    if stats.rejected:
        assert len(ep.store) == 0


def mutate(rng: random.Random, body: bytes) -> bytes:
    b = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randrange(len(b) + 1) if b else 0
        if op < 0.5 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op < 0.7:
            b[pos:pos] = bytes([rng.randrange(256)])
        elif op < 0.9 and b:
            del b[min(pos, len(b) - 1)]
        else:
            b[pos:pos] = rng.choice([b"\xcf" + b"\xff" * 8, b"\xdd\xff\xff\xff\xff",
                                     b"\xc6\x7f\xff\xff\xff", b"\xde\xff\xff", b"\xc0",
                                     b"\x91" * 200])
    return bytes(b)


def check_signed_mutation(ep: ReplicationEndpoint, golden: bytes, body: bytes,
                          seq: int) -> None:
    """Feed a validly signed datagram with ``body``: if the body does not decode it must be
    rejected as malformed with nothing applied; no exception may escape either way."""
    dtype = golden[3]
    data = with_header(golden[:HEADER_LEN] + body + b"\x00" * MAC_LEN, seq=seq)
    try:
        decode_body(body, dtype, LIMITS)
        valid = True
    except RemoteProtocolError:
        valid = False
    while ep.next_event() is not None:
        pass
    before = ep.statistics()
    ep.datagram_received(data, 0.0)
    after = ep.statistics()
    if valid or len(data) > P.max_datagram:
        return
    assert after.rejected.get("malformed", 0) == before.rejected.get("malformed", 0) + 1
    assert after.store.applied == before.store.applied
    while (e := ep.next_event()) is not None:
        assert not isinstance(e, RecordsApplied)


@given(st.integers(0, 2**32 - 1),
       st.sampled_from([GOLDEN_DATA, GOLDEN_CONTROL, GOLDEN_HEARTBEAT]))
def test_validly_signed_mutated_bodies(seed: int, golden: bytes) -> None:
    rng = random.Random(seed)
    ep = receiver()
    body = mutate(rng, golden[HEADER_LEN:-MAC_LEN])
    check_signed_mutation(ep, golden, body, 42 if golden[3] == TYPE_DATA else 5)


@pytest.mark.soak
def test_one_million_signed_mutations_of_the_golden_vectors() -> None:
    rng = random.Random(20261125)
    ep = receiver()
    data_seq, ctl_seq = 42, 5
    for i in range(1_000_000):
        golden = GOLDEN_DATA if i % 2 == 0 else GOLDEN_CONTROL if i % 4 == 1 \
            else GOLDEN_HEARTBEAT
        body = mutate(rng, golden[HEADER_LEN:-MAC_LEN])
        if golden[3] == TYPE_DATA:
            seq, data_seq = data_seq, data_seq + 1
        else:
            seq, ctl_seq = ctl_seq, ctl_seq + 1
        check_signed_mutation(ep, golden, body, seq)
    assert ep.statistics().rejected["malformed"] > 100_000
    assert GOLDEN_CONTROL[3] == TYPE_CONTROL
