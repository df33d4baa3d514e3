"""Wire format: golden byte vectors, round trips, serial arithmetic, strict decoding."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbsync.replication.auth import KeyRing
from lbsync.replication.wire import (
    HEADER_LEN,
    MAC_LEN,
    TYPE_CONTROL,
    TYPE_DATA,
    BucketDigest,
    ExpectationDelete,
    ExpectationUpdate,
    FlowDelete,
    FlowUpdate,
    Gone,
    Header,
    HighWater,
    Limits,
    Membership,
    Message,
    Nack,
    Parity,
    RemoteProtocolError,
    RepairState,
    ResyncBegin,
    ResyncDone,
    ResyncEnd,
    ResyncRequest,
    decode_body,
    encode_body,
    encode_message,
    pack_header,
    parse_header,
    unwrap,
)

KEYRING = KeyRing({1: bytes(range(32))}, 1)
LIMITS = Limits(buckets=16)

DATA_MESSAGES: list[Message] = [
    FlowUpdate(5, 3, b"key", b"rec"), FlowDelete(6, 3, b"k2"), ResyncBegin(9, 3),
    ResyncEnd(9, 3, 2, 0x0123456789ABCDEF), BucketDigest(9, 3, 2, 0xFEDCBA9876543210),
    ResyncDone(2, 77), ExpectationUpdate(1, 3, b"e", b"x"), ExpectationDelete(1, 3, b"e")]
CONTROL_MESSAGES: list[Message] = [
    HighWater(41), Nack(1, 7, ((100, 3), (110, 1))), Gone(((1, 30),), (5, 6)),
    Gone(((1, 2),), None), ResyncRequest(1, 12, ()), Membership(1, b"hb")]

GOLDEN_DATA = bytes.fromhex(
    "4c53010101010000000000070000002a000000289895010503c4036b6579c40372656394020603c4026b329305"
    "09039506090302cf0123456789abcdef9507090302cffedcba98765432109308024d95030103c40165c4017894"
    "040103c401655afc62d5d5214caea63db6b9fe8f59de")
GOLDEN_CONTROL = bytes.fromhex(
    "4c5301020201000000000009000000050000000196921029941101079464036e01931292011e9205069312920102"
    "c09413010c90932001c402686233ff49fcbf597c24caf019dae7d5c94d")


def build(h: Header, messages: list[Message]) -> bytes:
    signed = pack_header(h) + encode_body([encode_message(m) for m in messages])
    return signed + KEYRING.sign(signed)


def test_golden_data_datagram_bytes() -> None:
    assert build(Header(TYPE_DATA, 1, 1, 7, 42, 40), DATA_MESSAGES) == GOLDEN_DATA


def test_golden_control_datagram_bytes() -> None:
    assert build(Header(TYPE_CONTROL, 2, 1, 9, 5, 1), CONTROL_MESSAGES) == GOLDEN_CONTROL


@pytest.mark.parametrize(("golden", "header", "messages"), [
    (GOLDEN_DATA, Header(TYPE_DATA, 1, 1, 7, 42, 40), DATA_MESSAGES),
    (GOLDEN_CONTROL, Header(TYPE_CONTROL, 2, 1, 9, 5, 1), CONTROL_MESSAGES),
])
def test_golden_vectors_decode(golden: bytes, header: Header, messages: list[Message]) -> None:
    assert parse_header(golden) == header
    assert KEYRING.verify(1, golden[:-MAC_LEN], golden[-MAC_LEN:])
    assert decode_body(golden[HEADER_LEN:-MAC_LEN], header.type, LIMITS) == messages


# A repair datagram: parity row 3 of the block of seqs 33..48 (payload opaque here).
PARITY_MESSAGES: list[Message] = [HighWater(41), Parity(33, 16, 3, b"\x00\x05parit")]
GOLDEN_PARITY = bytes.fromhex(
    "4c53010202010000000000090000000600000001929210299514211003c40700057061726974ac660d0c206f"
    "7bd17135c3af6b69d458")


def test_golden_parity_datagram() -> None:
    h = Header(TYPE_CONTROL, 2, 1, 9, 6, 1)
    assert build(h, PARITY_MESSAGES) == GOLDEN_PARITY
    assert decode_body(GOLDEN_PARITY[HEADER_LEN:-MAC_LEN], TYPE_CONTROL, LIMITS) \
        == PARITY_MESSAGES


# A heartbeat carrying two piggybacked repair states: node 2 misses seqs 33 and 35 and 80 of
# node 1's stream (incarnation 7), and all of 1..16 of node 3's (incarnation 2).
HEARTBEAT_MESSAGES: list[Message] = [
    HighWater(41), Membership(1, b"hb"), RepairState(1, 7, ((33, 0x0005), (65, 0x8000))),
    RepairState(3, 2, ((1, 0xFFFF),))]
GOLDEN_HEARTBEAT = bytes.fromhex(
    "4c5301020201000000000009000000070000000194921029932001c40268629415010794210541cd80009415"
    "03029201cdffffb24d7724a78c2eb0ec41bb461c4f6720")


def test_golden_heartbeat_with_repair_states() -> None:
    h = Header(TYPE_CONTROL, 2, 1, 9, 7, 1)
    assert build(h, HEARTBEAT_MESSAGES) == GOLDEN_HEARTBEAT
    assert decode_body(GOLDEN_HEARTBEAT[HEADER_LEN:-MAC_LEN], TYPE_CONTROL, LIMITS) \
        == HEARTBEAT_MESSAGES


@pytest.mark.parametrize("fields", [
    [21, 1, 7, []],  # no block
    [21, 1, 7, [33]],  # a mask short
    [21, 1, 7, [34, 1]],  # not a block boundary
    [21, 1, 7, [33, 0]],  # empty mask
    [21, 1, 7, [33, 0x10000]],  # a mask beyond the block
    [21, 0, 7, [33, 1]],  # node 0
    [21, 1, 7, [33, 1] * 65],  # more blocks than ranges allowed
    [21, 1, 7, [33, b"\x01"]],  # mask not an integer
    [21, 1, [33, 1]],  # a field short
])
def test_malformed_repair_state_rejected(fields: list[object]) -> None:
    body = msgpack.packb([fields], use_bin_type=True)
    with pytest.raises(RemoteProtocolError) as exc:
        decode_body(body, TYPE_CONTROL, LIMITS)
    assert exc.value.reason == "malformed"


@pytest.mark.parametrize("fields", [
    [20, 33, 0, 3, b"\x00\x01x"],  # count 0
    [20, 33, 17, 3, b"\x00\x01x"],  # count beyond a block
    [20, 33, 16, 240, b"\x00\x01x"],  # row beyond the Cauchy matrix
    [20, 33, 16, 3, b"x"],  # no room for the length
    [20, 33, 16, 3],  # a field short
])
def test_malformed_parity_rejected(fields: list[object]) -> None:
    body = msgpack.packb([fields], use_bin_type=True)
    with pytest.raises(RemoteProtocolError) as exc:
        decode_body(body, TYPE_CONTROL, LIMITS)
    assert exc.value.reason == "malformed"


def test_header_layout_is_twenty_bytes_network_order() -> None:
    raw = pack_header(Header(TYPE_DATA, 3, 4, 0x01020304, 0x0A0B0C0D, 0x11121314))
    assert raw == b"LS\x01\x01\x03\x04\x00\x00\x01\x02\x03\x04\x0a\x0b\x0c\x0d\x11\x12\x13\x14"


@pytest.mark.parametrize(("mutation", "reason"), [
    (lambda b: b"XX" + b[2:], "bad_magic"),
    (lambda b: b[:2] + b"\x02" + b[3:], "bad_version"),
    (lambda b: b[:3] + b"\x07" + b[4:], "bad_type"),
    (lambda b: b[:4] + b"\x00" + b[5:], "bad_sender"),
    (lambda b: b[:6] + b"\x00\x01" + b[8:], "bad_flags"),
])
def test_header_checks(mutation: object, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        parse_header(mutation(GOLDEN_DATA))  # type: ignore[operator]
    assert exc.value.reason == reason


def test_kinds_are_confined_to_their_datagram_type() -> None:
    body = encode_body([encode_message(HighWater(1))])
    with pytest.raises(RemoteProtocolError):
        decode_body(body, TYPE_DATA, LIMITS)
    body = encode_body([encode_message(FlowDelete(1, 1, b"k"))])
    with pytest.raises(RemoteProtocolError):
        decode_body(body, TYPE_CONTROL, LIMITS)


@pytest.mark.parametrize("obj", [
    [], {}, "str", 5, [[1, 99, 1, b"k", b"r"]], [[1, 1, -1, b"k", b"r"]],
    [[1, 1, 1, "k", b"r"]], [[1, 1, 1, b"", b"r"]], [[1, 1, 1, b"k"]], [[2, 1, 1, b"k", b"x"]],
    [[1, 1, 1 << 32, b"k", b"r"]], [[6, 1, 1, 1, -1]], [[99]], [[True, 1, 1, b"k"]],
    [[1, 1.0, 1, b"k", b"r"]], [[1, 1, 1, b"k" * 300, b"r"]], [1],
])
def test_mutated_bodies_are_rejected(obj: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_body(msgpack.packb(obj), TYPE_DATA, LIMITS)


@pytest.mark.parametrize("obj", [
    [[17, 0, 1, [1, 1]]], [[17, 1, 1, [1]]], [[17, 1, 1, []]], [[17, 1, 1, [1, 0]]],
    [[18, [1, 1], [99]]], [[19, 1, 1, [1, 1, 1] * 10]], [[32, 300, b""]], [[32, 1, "x"]],
    [[17, 1, 1, [1, 1] * 65]],
])
def test_mutated_control_bodies_are_rejected(obj: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_body(msgpack.packb(obj), TYPE_CONTROL, LIMITS)


def test_msgpack_limits_apply_before_building_objects() -> None:
    huge = msgpack.packb([[1, 1, 1, b"k", b"x" * 5000]])
    with pytest.raises(RemoteProtocolError):
        decode_body(huge, TYPE_DATA, LIMITS)
    with pytest.raises(RemoteProtocolError):
        decode_body(msgpack.packb([{"a": 1}]), TYPE_DATA, LIMITS)
    with pytest.raises(RemoteProtocolError):
        decode_body(msgpack.packb([[1, 1, 1, b"k", b"r"]]) + b"\x00", TYPE_DATA, LIMITS)


@given(st.binary(max_size=300), st.sampled_from([TYPE_DATA, TYPE_CONTROL]))
def test_random_bodies_raise_only_remote_protocol_error(body: bytes, dtype: int) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_body(body, dtype, LIMITS)


@given(st.integers(0, (1 << 32) - 1), st.integers(0, 1 << 40), st.integers(-(1 << 31) + 1,
                                                                          (1 << 31) - 1))
def test_unwrap_is_serial_arithmetic(_wire: int, near: int, delta: int) -> None:
    value = near + delta
    assert unwrap(value & 0xFFFFFFFF, near) == value


@given(st.sampled_from(DATA_MESSAGES + CONTROL_MESSAGES + HEARTBEAT_MESSAGES))
def test_every_message_round_trips(m: Message) -> None:
    dtype = TYPE_DATA if m in DATA_MESSAGES else TYPE_CONTROL
    assert decode_body(encode_body([encode_message(m)]), dtype, LIMITS) == [m]
