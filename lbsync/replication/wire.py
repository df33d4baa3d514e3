"""Replication wire format, version 1: one fixed header, a msgpack body, a MAC trailer.

Layout of every datagram (all integers network byte order)::

    offset size field
    0      2    magic        b"LS"
    2      1    version      1
    3      1    type         1 = DATA (sequenced, reliable), 2 = CONTROL (unsequenced)
    4      1    sender       node id 1..255
    5      1    key_id       key ring id of the MAC key
    6      2    flags        0 (reserved; non-zero is rejected)
    8      4    incarnation  sender's persisted restart counter (never a clock)
    12     4    seq          DATA: data sequence number; CONTROL: control counter
    16     4    oldest       oldest data sequence number still retransmittable
    20     n    body         msgpack array of messages, each ``[kind, field, ...]``
    20+n   16   mac          keyed BLAKE2b-128 over bytes 0 .. 20+n

Rules:
- Sequence numbers are 32-bit on the wire and unwrapped to integers against a reference with
  serial-number arithmetic (RFC 1982) in exactly one place, :func:`unwrap`.
- DATA datagrams carry only data kinds (1..15), CONTROL datagrams only control kinds (16..31)
  and the opaque membership kind (32). Anything else is a :class:`RemoteProtocolError`.
- Decoding never raises anything but :class:`RemoteProtocolError`; msgpack runs with explicit
  limits, and every field is type- and range-checked (a validly signed but mutated body from a
  buggy peer is rejected as a whole: nothing of it is applied).
- Distinct counters have distinct names: ``incarnation`` (sender restarts), ``seq`` (data
  stream), control counter, ``owner_epoch`` (bucket ownership). View id and map epoch belong to
  membership messages, which this module carries opaquely.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import msgpack

from lbsync.accel import CTFAST
from lbsync.replication.fec import BLOCK as PARITY_BLOCK
from lbsync.replication.fec import MAX_ROWS as PARITY_ROWS

MAGIC = b"LS"
VERSION = 1
TYPE_DATA = 1
TYPE_CONTROL = 2
HEADER = struct.Struct("!2sBBBBHIII")
HEADER_LEN = HEADER.size  # 20
MAC_LEN = 16
OVERHEAD = HEADER_LEN + MAC_LEN
FIRST_SEQ = 1
SEQ_MOD = 1 << 32
_HALF = 1 << 31
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

# Message kinds. Data kinds travel in the sequenced stream, control kinds do not.
K_FLOW_UPDATE = 1
K_FLOW_DELETE = 2
K_EXPECT_UPDATE = 3
K_EXPECT_DELETE = 4
K_RESYNC_BEGIN = 5
K_RESYNC_END = 6
K_BUCKET_DIGEST = 7
K_RESYNC_DONE = 8
K_HIGH_WATER = 16
K_NACK = 17
K_GONE = 18
K_RESYNC_REQUEST = 19
K_PARITY = 20
K_REPAIR_STATE = 21
K_MEMBERSHIP = 32

DATA_KINDS = frozenset(range(1, 16))
CONTROL_KINDS = frozenset((*range(16, 32), K_MEMBERSHIP))
ALL_KINDS = DATA_KINDS | CONTROL_KINDS


def unwrap(wire: int, near: int) -> int:
    """The integer congruent to ``wire`` mod 2**32 closest to ``near`` (serial arithmetic)."""
    diff = (wire - near) & U32
    if diff >= _HALF:
        diff -= SEQ_MOD
    return near + diff


class RemoteProtocolError(Exception):
    """A peer sent something this version cannot accept; ``reason`` is a stable counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class LocalProtocolError(Exception):
    """Our caller misused the API (e.g. updated a bucket it does not own)."""


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed header of a datagram."""

    type: int
    sender: int
    key_id: int
    incarnation: int
    seq: int
    oldest: int


def pack_header(h: Header) -> bytes:
    return HEADER.pack(MAGIC, VERSION, h.type, h.sender, h.key_id, 0, h.incarnation,
                       h.seq & U32, h.oldest & U32)


# ------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class FlowUpdate:
    """A flow's latest state: ``record`` is the packed FlowRecord, ``key`` its flow key."""

    KIND: ClassVar[int] = K_FLOW_UPDATE
    bucket: int
    owner_epoch: int
    key: bytes
    record: bytes


@dataclass(frozen=True, slots=True)
class FlowDelete:
    """A flow was destroyed by its owner."""

    KIND: ClassVar[int] = K_FLOW_DELETE
    bucket: int
    owner_epoch: int
    key: bytes


@dataclass(frozen=True, slots=True)
class ExpectationUpdate:
    """An expectation's latest state (packed record)."""

    KIND: ClassVar[int] = K_EXPECT_UPDATE
    bucket: int
    owner_epoch: int
    key: bytes
    record: bytes


@dataclass(frozen=True, slots=True)
class ExpectationDelete:
    """An expectation was removed by its owner."""

    KIND: ClassVar[int] = K_EXPECT_DELETE
    bucket: int
    owner_epoch: int
    key: bytes


@dataclass(frozen=True, slots=True)
class ResyncBegin:
    """A streamed resync answer for ``bucket`` starts; the updates that follow are its content."""

    KIND: ClassVar[int] = K_RESYNC_BEGIN
    bucket: int
    owner_epoch: int


@dataclass(frozen=True, slots=True)
class ResyncEnd:
    """End of a bucket's resync answer: receivers drop keys not refreshed since the begin marker
    and compare ``count``/``digest`` with their own."""

    KIND: ClassVar[int] = K_RESYNC_END
    bucket: int
    owner_epoch: int
    count: int
    digest: int


@dataclass(frozen=True, slots=True)
class BucketDigest:
    """The owner's digest of a bucket at this point of its stream."""

    KIND: ClassVar[int] = K_BUCKET_DIGEST
    bucket: int
    owner_epoch: int
    count: int
    digest: int


@dataclass(frozen=True, slots=True)
class ResyncDone:
    """Every bucket of resync request ``token`` from ``requester`` has been streamed."""

    KIND: ClassVar[int] = K_RESYNC_DONE
    requester: int
    token: int


@dataclass(frozen=True, slots=True)
class HighWater:
    """Tail-loss probe: the sender's last data sequence number sent (wire form)."""

    KIND: ClassVar[int] = K_HIGH_WATER
    last_seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """Receiver asks ``target`` (incarnation ``incarnation``) to retransmit sequence ranges;
    ``ranges`` are (first wire seq, count) pairs."""

    KIND: ClassVar[int] = K_NACK
    target: int
    incarnation: int
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Gone:
    """The sender no longer holds these ranges; ``buckets`` were touched by them (``None``:
    unknown, treat as every bucket the sender owns). A paced resync of them follows."""

    KIND: ClassVar[int] = K_GONE
    ranges: tuple[tuple[int, int], ...]
    buckets: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class Parity:
    """Repair of the data sequence numbers ``first .. first+count-1`` (one repair block, see
    ``fec.py``): parity ``row`` of their datagrams. Any ``m`` parities of a block rebuild any
    ``m`` datagrams of it that a receiver misses."""

    KIND: ClassVar[int] = K_PARITY
    first: int
    count: int
    row: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class RepairState:
    """What the sending node still misses of ``target``'s stream (incarnation
    ``incarnation``), piggybacked on a CONTROL datagram it sends anyway (heartbeat, tail
    probe): ``blocks`` are (first wire seq of a repair block, mask) pairs, bit ``i`` of the
    mask (1..0xFFFF) = seq ``first + i`` missing. ``target`` answers it as a NACK of those
    seqs; other receivers take it as one (suppression)."""

    KIND: ClassVar[int] = K_REPAIR_STATE
    target: int
    incarnation: int
    blocks: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    """Ask ``target`` to stream ``buckets`` (empty: every bucket it owns)."""

    KIND: ClassVar[int] = K_RESYNC_REQUEST
    target: int
    token: int
    buckets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Membership:
    """An opaque membership message (heartbeat, view...), interpreted by the membership core."""

    KIND: ClassVar[int] = K_MEMBERSHIP
    subkind: int
    payload: bytes


DataMessage = (FlowUpdate | FlowDelete | ExpectationUpdate | ExpectationDelete | ResyncBegin
               | ResyncEnd | BucketDigest | ResyncDone)
ControlMessage = (HighWater | Nack | Gone | ResyncRequest | Parity | RepairState
                  | Membership)
Message = DataMessage | ControlMessage
RecordMessage = FlowUpdate | FlowDelete | ExpectationUpdate | ExpectationDelete


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied while decoding a body."""

    buckets: int
    max_datagram: int = 1400
    max_key: int = 255
    max_ranges: int = 64
    max_payload: int = 1200


# ------------------------------------------------------------------------------------------
# Encoding

_packer = msgpack.Packer(use_bin_type=True)


def _pack(obj: list[object]) -> bytes:
    data: bytes = _packer.pack(obj)
    return data


def _flat(ranges: Sequence[tuple[int, int]]) -> list[int]:
    out: list[int] = []
    for start, count in ranges:
        out.append(start & U32)
        out.append(count)
    return out


def encode_message(m: Message) -> bytes:
    """One message in its msgpack form (bodies are arrays of these)."""
    if isinstance(m, FlowUpdate | ExpectationUpdate):
        return _pack([m.KIND, m.bucket, m.owner_epoch, m.key, m.record])
    if isinstance(m, FlowDelete | ExpectationDelete):
        return _pack([m.KIND, m.bucket, m.owner_epoch, m.key])
    if isinstance(m, ResyncBegin):
        return _pack([m.KIND, m.bucket, m.owner_epoch])
    if isinstance(m, ResyncEnd | BucketDigest):
        return _pack([m.KIND, m.bucket, m.owner_epoch, m.count, m.digest])
    if isinstance(m, ResyncDone):
        return _pack([m.KIND, m.requester, m.token])
    if isinstance(m, HighWater):
        return _pack([m.KIND, m.last_seq & U32])
    if isinstance(m, Nack):
        return _pack([m.KIND, m.target, m.incarnation, _flat(m.ranges)])
    if isinstance(m, Gone):
        b = None if m.buckets is None else list(m.buckets)
        return _pack([m.KIND, _flat(m.ranges), b])
    if isinstance(m, ResyncRequest):
        return _pack([m.KIND, m.target, m.token, list(m.buckets)])
    if isinstance(m, Parity):
        return _pack([m.KIND, m.first & U32, m.count, m.row, m.payload])
    if isinstance(m, RepairState):
        return _pack([m.KIND, m.target, m.incarnation, _flat(m.blocks)])
    return _pack([m.KIND, m.subkind, m.payload])


def array_header(n: int) -> bytes:
    """msgpack array header for ``n`` elements."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_body(parts: Sequence[bytes]) -> bytes:
    """A body from already-encoded messages."""
    return array_header(len(parts)) + b"".join(parts)


# ------------------------------------------------------------------------------------------
# Decoding

# The C accelerator (lbsync/_ctfast.c, docs/kernel.md) decodes DATA bodies made only of flow
# updates and deletes (nearly all of them), building the same FlowUpdate / FlowDelete objects
# ~5x faster (a frozen dataclass's __init__ was most of a record's decode); it declines
# (None) anything else, and anything this module would reject, so errors stay Python's.
_c_decode_data: Callable[[bytes, int, int, int], list[Message] | None] | None = None
if CTFAST is not None:
    CTFAST.set_message_types(FlowUpdate, FlowDelete)
    _c_decode_data = CTFAST.decode_data


def parse_header(data: bytes) -> Header:
    """Header fields, after the size check; magic and version are checked here."""
    magic, version, dtype, sender, key_id, flags, inc, seq, oldest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RemoteProtocolError("bad_magic")
    if version != VERSION:
        raise RemoteProtocolError("bad_version", str(version))
    if dtype not in (TYPE_DATA, TYPE_CONTROL):
        raise RemoteProtocolError("bad_type", str(dtype))
    if flags != 0:
        raise RemoteProtocolError("bad_flags")
    if not 1 <= sender <= 255:
        raise RemoteProtocolError("bad_sender")
    return Header(dtype, sender, key_id, inc, seq, oldest)


def _u32(v: object) -> int:
    if type(v) is not int or not 0 <= v <= U32:
        raise RemoteProtocolError("malformed", "u32 expected")
    return v


def _u64(v: object) -> int:
    if type(v) is not int or not 0 <= v <= U64:
        raise RemoteProtocolError("malformed", "u64 expected")
    return v


def _node(v: object) -> int:
    if type(v) is not int or not 1 <= v <= 255:
        raise RemoteProtocolError("malformed", "node id expected")
    return v


def _bucket(v: object, lim: Limits) -> int:
    if type(v) is not int or not 0 <= v < lim.buckets:
        raise RemoteProtocolError("malformed", "bucket out of range")
    return v


def _key(v: object, lim: Limits) -> bytes:
    if type(v) is not bytes or not 1 <= len(v) <= lim.max_key:
        raise RemoteProtocolError("malformed", "key")
    return v


def _bin(v: object, lim: Limits) -> bytes:
    if type(v) is not bytes or len(v) > lim.max_datagram:
        raise RemoteProtocolError("malformed", "bytes")
    return v


def _ranges(v: object, lim: Limits) -> tuple[tuple[int, int], ...]:
    if type(v) is not list or len(v) % 2 or not 0 < len(v) <= 2 * lim.max_ranges:
        raise RemoteProtocolError("malformed", "ranges")
    out = []
    for i in range(0, len(v), 2):
        start, count = _u32(v[i]), _u32(v[i + 1])
        if not 1 <= count <= _HALF:
            raise RemoteProtocolError("malformed", "range count")
        out.append((start, count))
    return tuple(out)


def _repair_blocks(v: object, lim: Limits) -> tuple[tuple[int, int], ...]:
    if type(v) is not list or len(v) % 2 or not 0 < len(v) <= 2 * lim.max_ranges:
        raise RemoteProtocolError("malformed", "repair blocks")
    out = []
    for i in range(0, len(v), 2):
        first, mask = _u32(v[i]), v[i + 1]
        # Blocks are aligned on FIRST_SEQ (1) and 2**32 is a multiple of the block size.
        if (first - 1) % PARITY_BLOCK or type(mask) is not int \
                or not 0 < mask < 1 << PARITY_BLOCK:
            raise RemoteProtocolError("malformed", "repair block")
        out.append((first, mask))
    return tuple(out)


def _buckets(v: object, lim: Limits) -> tuple[int, ...]:
    if type(v) is not list or len(v) > lim.buckets:
        raise RemoteProtocolError("malformed", "bucket list")
    return tuple(_bucket(b, lim) for b in v)


def _decode_one(m: object, dtype: int, lim: Limits) -> Message:
    if type(m) is not list or not m:
        raise RemoteProtocolError("malformed", "message is not an array")
    kind = m[0]
    n = len(m)
    if type(kind) is not int:
        raise RemoteProtocolError("malformed", "kind")
    if (kind in DATA_KINDS) != (dtype == TYPE_DATA) or kind not in ALL_KINDS:
        raise RemoteProtocolError("malformed", f"kind {kind} in datagram type {dtype}")
    if kind == K_FLOW_UPDATE and n == 5:
        return FlowUpdate(_bucket(m[1], lim), _u32(m[2]), _key(m[3], lim), _bin(m[4], lim))
    if kind == K_FLOW_DELETE and n == 4:
        return FlowDelete(_bucket(m[1], lim), _u32(m[2]), _key(m[3], lim))
    if kind == K_EXPECT_UPDATE and n == 5:
        return ExpectationUpdate(_bucket(m[1], lim), _u32(m[2]), _key(m[3], lim),
                                 _bin(m[4], lim))
    if kind == K_EXPECT_DELETE and n == 4:
        return ExpectationDelete(_bucket(m[1], lim), _u32(m[2]), _key(m[3], lim))
    if kind == K_RESYNC_BEGIN and n == 3:
        return ResyncBegin(_bucket(m[1], lim), _u32(m[2]))
    if kind == K_RESYNC_END and n == 5:
        return ResyncEnd(_bucket(m[1], lim), _u32(m[2]), _u32(m[3]), _u64(m[4]))
    if kind == K_BUCKET_DIGEST and n == 5:
        return BucketDigest(_bucket(m[1], lim), _u32(m[2]), _u32(m[3]), _u64(m[4]))
    if kind == K_RESYNC_DONE and n == 3:
        return ResyncDone(_node(m[1]), _u32(m[2]))
    if kind == K_HIGH_WATER and n == 2:
        return HighWater(_u32(m[1]))
    if kind == K_NACK and n == 4:
        return Nack(_node(m[1]), _u32(m[2]), _ranges(m[3], lim))
    if kind == K_GONE and n == 3:
        return Gone(_ranges(m[1], lim), None if m[2] is None else _buckets(m[2], lim))
    if kind == K_RESYNC_REQUEST and n == 4:
        return ResyncRequest(_node(m[1]), _u32(m[2]), _buckets(m[3], lim))
    if kind == K_PARITY and n == 5:
        count, row = m[2], m[3]
        if type(count) is not int or not 1 <= count <= PARITY_BLOCK \
                or type(row) is not int or not 0 <= row < PARITY_ROWS:
            raise RemoteProtocolError("malformed", "parity count or row")
        payload = _bin(m[4], lim)
        if len(payload) < 2:
            raise RemoteProtocolError("malformed", "parity payload")
        return Parity(_u32(m[1]), count, row, payload)
    if kind == K_REPAIR_STATE and n == 4:
        return RepairState(_node(m[1]), _u32(m[2]), _repair_blocks(m[3], lim))
    if kind == K_MEMBERSHIP and n == 3:
        sub = m[1]
        if type(sub) is not int or not 0 <= sub <= 255:
            raise RemoteProtocolError("malformed", "membership subkind")
        payload = m[2]
        if type(payload) is not bytes or len(payload) > lim.max_payload:
            raise RemoteProtocolError("malformed", "membership payload")
        return Membership(sub, payload)
    raise RemoteProtocolError("malformed", f"kind {kind} with {n} fields")


def decode_body(body: bytes, dtype: int, lim: Limits) -> list[Message]:
    """All messages of a body, or :class:`RemoteProtocolError` (never anything else)."""
    if dtype == TYPE_DATA and _c_decode_data is not None:
        decoded = _c_decode_data(body, lim.buckets, lim.max_key, lim.max_datagram)
        if decoded is not None:
            return decoded
    try:
        obj = msgpack.unpackb(
            body, raw=False, use_list=True, strict_map_key=True,
            max_bin_len=lim.max_datagram, max_str_len=0, max_array_len=lim.max_datagram,
            max_map_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises a zoo of types for bad input; all mean one thing
        raise RemoteProtocolError("malformed", f"msgpack: {type(exc).__name__}") from None
    if type(obj) is not list or not obj:
        raise RemoteProtocolError("malformed", "body is not a non-empty array")
    out: list[Message] = []
    append = out.append
    buckets, max_key = lim.buckets, lim.max_key
    is_data = dtype == TYPE_DATA
    for m in obj:
        # Fast path for the hot message (a flow update in a DATA datagram), same checks as
        # _decode_one; anything unusual takes the general path.
        if is_data and type(m) is list and len(m) == 5 and m[0] == K_FLOW_UPDATE:
            _k, b, e, key, rec = m
            if (type(b) is int and 0 <= b < buckets and type(e) is int and 0 <= e <= U32
                    and type(key) is bytes and 0 < len(key) <= max_key and type(rec) is bytes
                    and type(_k) is int):
                append(FlowUpdate(b, e, key, rec))
                continue
        append(_decode_one(m, dtype, lim))
    return out
