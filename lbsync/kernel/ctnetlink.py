"""Pure ctnetlink codec (``struct`` only): conntrack and expectation messages <-> lbsync forms.

No sockets here. The decoder turns the bytes of one ``recv`` (events or dump replies) into
:class:`CtEvent` tuples: the hot-path representation, carrying the packed
:class:`~lbsync.kernel.flowrecord.FlowRecord` bytes plus the few fields routing needs (key,
bucket = ct mark, kind, l4proto, TCP state, status). No rich objects are built per event; callers
that need them call ``FlowRecord.unpack(ev.record)``.

Rules:
- Unknown attributes are skipped (the kernel adds new ones: 6.18 puts a timestamp, type 27, on
  every event). Attribute types are masked with ``NLA_TYPE_MASK`` (nested/byte-order flags off).
- Anything malformed raises :class:`CodecError` and nothing else: truncated headers, lengths
  past the end, wrong payload sizes, missing tuples, addresses not matching the family.
- Encoders take the packed record (bytes) because that is what the daemon holds; they build a
  create from the *un-NATed* reply tuple plus ``CTA_NAT_SRC``/``CTA_NAT_DST`` ranges with
  min == max (sending the NATed reply tuple looks right in ``conntrack -L`` but packets are not
  translated), and always set ``IPS_CONFIRMED`` (without it the kernel answers EBUSY).
- A batch is several netlink messages in one ``sendmsg``. ctnetlink has no nfnetlink
  transaction support, so each message is processed (and may fail) on its own; without
  ``NLM_F_ACK`` only failures are answered, each ``NLMSG_ERROR`` carrying the failing ``seq``.
  The last message of a batch asks for an ACK so the reader knows the batch is complete.
- Accelerator: when the optional C extension :mod:`lbsync._ctfast` is importable (and
  ``LBSYNC_NO_ACCEL=1`` is not set), it decodes the conntrack messages it knows completely and
  encodes the fast-path creates, byte for byte as the Python code here; every message or record
  it declines takes the Python code, so errors and surprises behave the same (``CODEC`` says
  which is active; docs/kernel.md).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from lbsync.accel import CTFAST
from lbsync.kernel.flowrecord import (
    AF_INET,
    AF_INET6,
    ICMP_PROTOS,
    IPPROTO_DCCP,
    IPPROTO_ICMP,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT,
    IPS_FIXED_TIMEOUT,
    IPS_HELPER,
    IPS_SEEN_REPLY,
    IPS_SEQ_ADJUST,
    IPS_SRC_NAT,
    PORT_PROTOS,
    RECORD_VERSION,
    FlowTuple,
    ProtoTuple,
    RecordError,
    parse_key,
    unpack_fields,
)

# -- netlink / nfnetlink constants --------------------------------------------------------------
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NFNL_SUBSYS_CTNETLINK = 1
NFNL_SUBSYS_CTNETLINK_EXP = 2
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
IPCTNL_MSG_EXP_NEW = 0
IPCTNL_MSG_EXP_GET = 1
IPCTNL_MSG_EXP_DELETE = 2
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
EXP_NEW = (NFNL_SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_NEW
EXP_GET = (NFNL_SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_GET
EXP_DELETE = (NFNL_SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_DELETE

# multicast groups (enum nfnetlink_groups)
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3
NFNLGRP_CONNTRACK_EXP_NEW = 4
NFNLGRP_CONNTRACK_EXP_UPDATE = 5
NFNLGRP_CONNTRACK_EXP_DESTROY = 6

# enum ctattr_type
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_HELP = 5
CTA_NAT_SRC = 6
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_USE = 11
CTA_ID = 12
CTA_NAT_DST = 13
CTA_TUPLE_MASTER = 14
CTA_SEQ_ADJ_ORIG = 15
CTA_SEQ_ADJ_REPLY = 16
CTA_SECMARK = 17
CTA_ZONE = 18
CTA_SECCTX = 19
CTA_TIMESTAMP = 20
CTA_MARK_MASK = 21
CTA_LABELS = 22
CTA_LABELS_MASK = 23
CTA_SYNPROXY = 24
CTA_FILTER = 25
CTA_STATUS_MASK = 26
CTA_TIMESTAMP_EVENT = 27

CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID = 4
CTA_PROTO_ICMP_TYPE = 5
CTA_PROTO_ICMP_CODE = 6
CTA_PROTO_ICMPV6_ID = 7
CTA_PROTO_ICMPV6_TYPE = 8
CTA_PROTO_ICMPV6_CODE = 9
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_DCCP = 2
CTA_PROTOINFO_SCTP = 3
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_TCP_WSCALE_ORIGINAL = 2
CTA_PROTOINFO_TCP_WSCALE_REPLY = 3
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY = 5
CTA_PROTOINFO_DCCP_STATE = 1
CTA_PROTOINFO_DCCP_ROLE = 2
CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ = 3
CTA_PROTOINFO_SCTP_STATE = 1
CTA_PROTOINFO_SCTP_VTAG_ORIGINAL = 2
CTA_PROTOINFO_SCTP_VTAG_REPLY = 3
CTA_HELP_NAME = 1
CTA_NAT_V4_MINIP = 1
CTA_NAT_V4_MAXIP = 2
CTA_NAT_PROTO = 3
CTA_NAT_V6_MINIP = 4
CTA_NAT_V6_MAXIP = 5
CTA_PROTONAT_PORT_MIN = 1
CTA_PROTONAT_PORT_MAX = 2
CTA_SEQADJ_CORRECTION_POS = 1
CTA_SEQADJ_OFFSET_BEFORE = 2
CTA_SEQADJ_OFFSET_AFTER = 3

# enum ctattr_expect
CTA_EXPECT_MASTER = 1
CTA_EXPECT_TUPLE = 2
CTA_EXPECT_MASK = 3
CTA_EXPECT_TIMEOUT = 4
CTA_EXPECT_ID = 5
CTA_EXPECT_HELP_NAME = 6
CTA_EXPECT_ZONE = 7
CTA_EXPECT_FLAGS = 8
CTA_EXPECT_CLASS = 9
CTA_EXPECT_NAT = 10
CTA_EXPECT_FN = 11
CTA_EXPECT_NAT_DIR = 1
CTA_EXPECT_NAT_TUPLE = 2

# -- lbsync event kinds ------------------------------------------------------------------------
KIND_NEW = 1
KIND_UPDATE = 2
KIND_DESTROY = 3
KIND_DUMP = 4
KIND_NAMES = {KIND_NEW: "new", KIND_UPDATE: "update", KIND_DESTROY: "destroy",
              KIND_DUMP: "dump"}

# Status bits a create may carry. The kernel sets EXPECTED itself from CTA_TUPLE_MASTER and the
# NAT bits from the NAT ranges; DYING/TEMPLATE/OFFLOAD/NAT_DONE are local to a kernel.
CREATE_STATUS_MASK = (IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED | IPS_SRC_NAT | IPS_DST_NAT
                      | IPS_SEQ_ADJUST | IPS_FIXED_TIMEOUT | IPS_HELPER)

_NLMSG = struct.Struct("=IHHII")
_NLMSG_NFGEN = struct.Struct("=IHHIIBBH")
_NLA = struct.Struct("=HH")
_U32BE = struct.Struct(">I")
_U16BE = struct.Struct(">H")
_U64BE = struct.Struct(">Q")
_ERRNO = struct.Struct("=i")
_KEY_HEAD = struct.Struct(">BBHHH")


class CodecError(ValueError):
    """A netlink message from the kernel (or a fuzzer) is malformed."""


class CtEvent(NamedTuple):
    """One conntrack message in hot-path form (an event, or one entry of a dump).

    A NamedTuple rather than a frozen dataclass: it is built per event, and tuple construction
    is ~5x cheaper than a frozen dataclass ``__init__`` (see docs/kernel.md).
    ``tcp_state`` is -1 when absent (not TCP, or a DESTROY); ``portid`` is the netlink sender:
    0 for packets, a socket's port id for entries that socket created (echoes).
    """

    kind: int
    key: bytes
    bucket: int
    l4proto: int
    tcp_state: int
    status: int
    record: bytes
    portid: int


_new_tuple = tuple.__new__

_ctfast: Any = CTFAST  # None: the Python codec does everything
if _ctfast is not None:
    _ctfast.set_event_type(CtEvent)
#: "c" when the C accelerator decodes and encodes the hot paths, else "python"
CODEC = "c" if _ctfast is not None else "python"
# the C entry points, or None (tests swap them for same-run comparisons)
_c_decode_ct: Callable[[bytes, int, bool, list[CtEvent]], int] | None = (
    None if _ctfast is None else _ctfast.decode_ct)
_c_create: Callable[[bytes, int, int, int], bytes | None] | None = (
    None if _ctfast is None else _ctfast.create)
# the event reader's receive loop (lbsync.kernel.conntrack.ConntrackEvents._read_c)
_c_recv_events: Callable[[int, bytearray, int, list[CtEvent]],
                         tuple[int, int, bytes | None]] | None = (
    None if _ctfast is None else _ctfast.recv_events)
# lbsync.kernel.conntrack.keys_of_dump (the owner sweep's keys-only decoder), or None
_c_keys_of_dump: Callable[[bytes, Any, set[bytes]], tuple[bool, bool] | None] | None = (
    None if _ctfast is None else _ctfast.keys_of_dump)
# lbsync.node._standby_check's verdict on a packed record, or None (left to the Python code)
_c_standby_check: Callable[[bytes, bytes], int | None] | None = (
    None if _ctfast is None else _ctfast.standby_check)


@dataclass(frozen=True, slots=True)
class NetlinkAck:
    """An ``NLMSG_ERROR`` answer: ``error`` is 0 for an ACK, else a positive errno."""

    seq: int
    error: int


@dataclass(frozen=True, slots=True)
class ExpectRecord:
    """One expectation (e.g. the FTP helper's data connection), enough to recreate it."""

    family: int
    master: ProtoTuple
    tuple: ProtoTuple
    mask: ProtoTuple
    timeout: int | None = None
    helper: str | None = None
    zone: int = 0
    flags: int = 0
    klass: int | None = None
    nat_dir: int | None = None
    nat_tuple: ProtoTuple | None = None
    fn: str | None = None


@dataclass(frozen=True, slots=True)
class ExpEvent:
    """An expectation message: EXP_NEW (kind new) or EXP_DELETE (kind destroy), or a dump."""

    kind: int
    expect: ExpectRecord
    portid: int


@dataclass(slots=True)
class Decoded:
    """What one receive buffer held, in arrival order per category."""

    events: list[CtEvent]
    expectations: list[ExpEvent]
    acks: list[NetlinkAck]
    done: bool = False
    skipped: int = 0


# -- decoding ---------------------------------------------------------------------------------


# Fast path: the kernel lays out an address+ports tuple identically every time (IPv4: 48
# bytes, IPv6: 72). One unpack plus a comparison of the seven attribute headers replaces the
# generic walk below (~4x faster); any other layout takes the generic walk.
_FAST_V4 = struct.Struct(">4s4s4s4s4s4s4sB3x4sH2x4sH2x").unpack_from
_FAST_V6 = struct.Struct(">4s4s16s4s16s4s4sB3x4sH2x4sH2x").unpack_from


def _fast_headers(alen: int, src_type: int, dst_type: int) -> tuple[bytes, ...]:
    return (_NLA.pack(4 + 2 * (4 + alen), CTA_TUPLE_IP | NLA_F_NESTED),
            _NLA.pack(4 + alen, src_type), _NLA.pack(4 + alen, dst_type),
            _NLA.pack(28, CTA_TUPLE_PROTO | NLA_F_NESTED), _NLA.pack(5, CTA_PROTO_NUM),
            _NLA.pack(6, CTA_PROTO_SRC_PORT), _NLA.pack(6, CTA_PROTO_DST_PORT))


_HEADERS_V4 = _fast_headers(4, CTA_IP_V4_SRC, CTA_IP_V4_DST)
_HEADERS_V6 = _fast_headers(16, CTA_IP_V6_SRC, CTA_IP_V6_DST)


def _tuple(buf: bytes, pos: int, end: int) -> tuple[int, bytes, bytes, int, int]:
    """Parse a CTA_TUPLE_* payload into (l4proto, src, dst, sport, dport)."""
    n = end - pos
    if n == 48:
        h0, h1, src, h2, dst, h3, h4, num, h5, sport, h6, dport = _FAST_V4(buf, pos)
        if (h0, h1, h2, h3, h4, h5, h6) == _HEADERS_V4:
            return num, src, dst, sport, dport
    elif n == 72:
        h0, h1, src, h2, dst, h3, h4, num, h5, sport, h6, dport = _FAST_V6(buf, pos)
        if (h0, h1, h2, h3, h4, h5, h6) == _HEADERS_V6:
            return num, src, dst, sport, dport
    src = dst = b""
    proto = -1
    sport = dport = 0
    itype = icode = -1
    nla = _NLA.unpack_from
    while pos < end:
        alen, atype = nla(buf, pos)
        nxt = pos + ((alen + 3) & ~3)
        if alen < 4 or pos + alen > end:
            raise CodecError("attribute length out of bounds")
        atype &= NLA_TYPE_MASK
        if atype == CTA_TUPLE_IP:
            p, e = pos + 4, pos + alen
            while p < e:
                blen, btype = nla(buf, p)
                if blen < 4 or p + blen > e:
                    raise CodecError("attribute length out of bounds")
                btype &= NLA_TYPE_MASK
                if btype in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = buf[p + 4:p + blen]
                elif btype in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = buf[p + 4:p + blen]
                p += (blen + 3) & ~3
        elif atype == CTA_TUPLE_PROTO:
            p, e = pos + 4, pos + alen
            while p < e:
                blen, btype = nla(buf, p)
                if blen < 4 or p + blen > e:
                    raise CodecError("attribute length out of bounds")
                btype &= NLA_TYPE_MASK
                if btype == CTA_PROTO_NUM:
                    if blen != 5:
                        raise CodecError("bad CTA_PROTO_NUM")
                    proto = buf[p + 4]
                elif btype in (CTA_PROTO_SRC_PORT, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID):
                    if blen != 6:
                        raise CodecError("bad port attribute")
                    sport = (buf[p + 4] << 8) | buf[p + 5]
                elif btype == CTA_PROTO_DST_PORT:
                    if blen != 6:
                        raise CodecError("bad port attribute")
                    dport = (buf[p + 4] << 8) | buf[p + 5]
                elif btype in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE):
                    if blen != 5:
                        raise CodecError("bad icmp type")
                    itype = buf[p + 4]
                elif btype in (CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE):
                    if blen != 5:
                        raise CodecError("bad icmp code")
                    icode = buf[p + 4]
                p += (blen + 3) & ~3
        pos = nxt
    if proto < 0 or not src or len(src) != len(dst) or len(src) not in (4, 16):
        raise CodecError("incomplete tuple")
    if itype >= 0 or icode >= 0:
        dport = (max(itype, 0) << 8) | max(icode, 0)
    return proto, src, dst, sport, dport


def _protoinfo(buf: bytes, pos: int, end: int) -> list[int] | None:
    nla = _NLA.unpack_from
    while pos < end:
        alen, atype = nla(buf, pos)
        if alen < 4 or pos + alen > end:
            raise CodecError("attribute length out of bounds")
        atype &= NLA_TYPE_MASK
        p, e = pos + 4, pos + alen
        if atype == CTA_PROTOINFO_TCP:
            st = ws_o = ws_r = fl_o = fl_r = 0
            while p < e:
                blen, btype = nla(buf, p)
                if blen < 4 or p + blen > e:
                    raise CodecError("attribute length out of bounds")
                btype &= NLA_TYPE_MASK
                if btype == CTA_PROTOINFO_TCP_STATE:
                    st = buf[p + 4] if blen == 5 else _bad("tcp state")
                elif btype == CTA_PROTOINFO_TCP_WSCALE_ORIGINAL:
                    ws_o = buf[p + 4] if blen == 5 else _bad("tcp wscale")
                elif btype == CTA_PROTOINFO_TCP_WSCALE_REPLY:
                    ws_r = buf[p + 4] if blen == 5 else _bad("tcp wscale")
                elif btype == CTA_PROTOINFO_TCP_FLAGS_ORIGINAL:
                    fl_o = buf[p + 4] if blen == 6 else _bad("tcp flags")
                elif btype == CTA_PROTOINFO_TCP_FLAGS_REPLY:
                    fl_r = buf[p + 4] if blen == 6 else _bad("tcp flags")
                p += (blen + 3) & ~3
            return [st, ws_o, ws_r, fl_o, fl_r]
        if atype == CTA_PROTOINFO_SCTP:
            st = vt_o = vt_r = 0
            while p < e:
                blen, btype = nla(buf, p)
                if blen < 4 or p + blen > e:
                    raise CodecError("attribute length out of bounds")
                btype &= NLA_TYPE_MASK
                if btype == CTA_PROTOINFO_SCTP_STATE:
                    st = buf[p + 4] if blen == 5 else _bad("sctp state")
                elif btype == CTA_PROTOINFO_SCTP_VTAG_ORIGINAL:
                    vt_o = _u32(buf, p, blen)
                elif btype == CTA_PROTOINFO_SCTP_VTAG_REPLY:
                    vt_r = _u32(buf, p, blen)
                p += (blen + 3) & ~3
            return [st, vt_o, vt_r]
        if atype == CTA_PROTOINFO_DCCP:
            st = role = 0
            hs = 0
            while p < e:
                blen, btype = nla(buf, p)
                if blen < 4 or p + blen > e:
                    raise CodecError("attribute length out of bounds")
                btype &= NLA_TYPE_MASK
                if btype == CTA_PROTOINFO_DCCP_STATE:
                    st = buf[p + 4] if blen == 5 else _bad("dccp state")
                elif btype == CTA_PROTOINFO_DCCP_ROLE:
                    role = buf[p + 4] if blen == 5 else _bad("dccp role")
                elif btype == CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ:
                    if blen != 12:
                        raise CodecError("bad dccp handshake seq")
                    hs = _U64BE.unpack_from(buf, p + 4)[0]
                p += (blen + 3) & ~3
            return [st, role, hs]
        pos += (alen + 3) & ~3
    return None


def _bad(what: str) -> int:
    raise CodecError(f"bad {what}")


def _u32(buf: bytes, p: int, blen: int) -> int:
    if blen != 8:
        raise CodecError("bad u32 attribute")
    v: int = _U32BE.unpack_from(buf, p + 4)[0]
    return v


def _seqadj(buf: bytes, pos: int, end: int) -> list[int]:
    out = [0, 0, 0]
    nla = _NLA.unpack_from
    while pos < end:
        alen, atype = nla(buf, pos)
        if alen < 4 or pos + alen > end:
            raise CodecError("attribute length out of bounds")
        atype &= NLA_TYPE_MASK
        if 1 <= atype <= 3:
            out[atype - 1] = _u32(buf, pos, alen)
        pos += (alen + 3) & ~3
    return out


def _helper_name(buf: bytes, pos: int, end: int) -> str | None:
    nla = _NLA.unpack_from
    while pos < end:
        alen, atype = nla(buf, pos)
        if alen < 4 or pos + alen > end:
            raise CodecError("attribute length out of bounds")
        if atype & NLA_TYPE_MASK == CTA_HELP_NAME:
            return _cstr(buf, pos + 4, pos + alen)
        pos += (alen + 3) & ~3
    return None


def _cstr(buf: bytes, start: int, end: int) -> str:
    raw = buf[start:end]
    nul = raw.find(b"\0")
    try:
        return (raw if nul < 0 else raw[:nul]).decode("ascii")
    except UnicodeDecodeError:
        raise CodecError("non-ASCII name") from None


_packb = msgpack.Packer(use_bin_type=True).pack


_IGNORED = frozenset({CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_USE, CTA_ID, CTA_SECMARK,
                      CTA_SECCTX, CTA_TIMESTAMP, CTA_SYNPROXY, CTA_TIMESTAMP_EVENT,
                      CTA_NAT_SRC, CTA_NAT_DST, CTA_MARK_MASK, CTA_LABELS_MASK, CTA_FILTER,
                      CTA_STATUS_MASK})
# The kernel's TCP protoinfo (non-DESTROY): state, both window scales, both flag pairs.
_TCPINFO_IN = struct.Struct(">B3x4sB3x4sB3x4sB3x4sB3x").unpack_from


# Event fast path: the kernel's events (6.x: ctnetlink_conntrack_event) start with the same five
# attributes every time: CTA_TUPLE_ORIG, CTA_TUPLE_REPLY (address + ports layout, see _tuple),
# CTA_ID, CTA_STATUS, CTA_TIMEOUT. One unpack of the attribute headers compared with the expected
# ones, one unpack of the values, replace two _tuple calls and three turns of the generic loop
# (~1.5 us of ~4.3 per event); the attributes after the prefix take the generic loop. Any other
# start (a zone, ICMP, a dump's order) takes the generic loop from the first attribute.
def _prefix_structs(alen: int) -> tuple[int, Any, Any, tuple[int, ...]]:
    # headers as native u32 (len, type), values skipped; values with headers skipped
    t_hdrs = f"III{alen}xI{alen}xIIxxxxIxxxxIxxxx"
    t_vals = f"12x{alen}s4x{alen}s8xB3x4xH2x4xH2x"
    hdrs = struct.Struct("=" + t_hdrs + t_hdrs + "I4xI4xI4x")
    vals = struct.Struct(">" + t_vals + t_vals + "8x4xI4xI")
    tup = encode_tuple(CTA_TUPLE_ORIG, IPPROTO_TCP, b"\0" * alen, b"\0" * alen, 0, 0)
    rep = encode_tuple(CTA_TUPLE_REPLY, IPPROTO_TCP, b"\0" * alen, b"\0" * alen, 0, 0)
    template = (tup + rep + _u32attr(CTA_ID, 0) + _u32attr(CTA_STATUS, 0)
                + _u32attr(CTA_TIMEOUT, 0))
    assert len(template) == hdrs.size == vals.size
    return hdrs.size, hdrs.unpack_from, vals.unpack_from, hdrs.unpack(template)


def _decode_ct(buf: bytes, pos: int, end: int, family: int, kind: int, portid: int) -> CtEvent:
    """Decode the attributes of one conntrack message (after the nfgenmsg header)."""
    orig: tuple[int, bytes, bytes, int, int] | None = None
    reply: tuple[int, bytes, bytes, int, int] | None = None
    master: tuple[int, bytes, bytes, int, int] | None = None
    status = mark = zone = 0
    timeout: int | None = None
    proto: list[int] | None = None
    helper: str | None = None
    labels: bytes | None = None
    sa_o: list[int] | None = None
    sa_r: list[int] | None = None
    nla = _NLA.unpack_from
    u32 = _U32BE.unpack_from
    ignored = _IGNORED
    if family == AF_INET:
        size, hdrs, vals, want = _PREFIX_V4
    else:
        size, hdrs, vals, want = _PREFIX_V6
    if end - pos >= size and hdrs(buf, pos) == want:
        osrc, odst, l4, osp, odp, rsrc, rdst, rl4, rsp, rdp, status, timeout = vals(buf, pos)
        orig = (l4, osrc, odst, osp, odp)
        reply = (rl4, rsrc, rdst, rsp, rdp)
        pos += size
    # Literal attribute numbers below (see the CTA_* names in the comments): this loop runs
    # ~8 times per event, and constants beat global lookups.
    while pos < end:
        alen, atype = nla(buf, pos)
        if alen < 4 or pos + alen > end:
            raise CodecError("attribute length out of bounds")
        atype &= 0x3FFF
        if atype == 1:  # CTA_TUPLE_ORIG
            orig = _tuple(buf, pos + 4, pos + alen)
        elif atype == 2:  # CTA_TUPLE_REPLY
            reply = _tuple(buf, pos + 4, pos + alen)
        elif atype in ignored:  # id, use, counters, timestamps, synproxy, secctx, ...
            pass
        elif atype == 3 or atype == 7 or atype == 8:  # CTA_STATUS, CTA_TIMEOUT, CTA_MARK
            if alen != 8:
                raise CodecError("bad u32 attribute")
            v = u32(buf, pos + 4)[0]
            if atype == 3:
                status = v
            elif atype == 7:
                timeout = v
            else:
                mark = v
        elif atype == 4:  # CTA_PROTOINFO
            if alen == 48 and buf[pos:pos + 12] == _H_TCPINFO:
                st, h1, ws_o, h2, ws_r, h3, fl_o, h4, fl_r = _TCPINFO_IN(buf, pos + 12)
                if (h1, h2, h3, h4) != _H_TCPINFO_REST:
                    raise CodecError("unexpected TCP protoinfo layout")
                proto = [st, ws_o, ws_r, fl_o, fl_r]
            else:
                proto = _protoinfo(buf, pos + 4, pos + alen)
        elif atype == 18:  # CTA_ZONE
            if alen != 6:
                raise CodecError("bad CTA_ZONE")
            zone = _U16BE.unpack_from(buf, pos + 4)[0]
        elif atype == 5:  # CTA_HELP
            helper = _helper_name(buf, pos + 4, pos + alen)
        elif atype == 22:  # CTA_LABELS
            labels = buf[pos + 4:pos + alen]
        elif atype == 14:  # CTA_TUPLE_MASTER
            master = _tuple(buf, pos + 4, pos + alen)
        elif atype == 15:  # CTA_SEQ_ADJ_ORIG
            sa_o = _seqadj(buf, pos + 4, pos + alen)
        elif atype == 16:  # CTA_SEQ_ADJ_REPLY
            sa_r = _seqadj(buf, pos + 4, pos + alen)
        pos += (alen + 3) & ~3
    if orig is None or reply is None:
        raise CodecError("conntrack message without both tuples")
    l4, osrc, odst, osp, odp = orig
    alen_family = 4 if family == AF_INET else 16 if family == AF_INET6 else 0
    if len(osrc) != alen_family or len(reply[1]) != alen_family or reply[0] != l4:
        raise CodecError("tuples do not match the message family")
    seqadj = None
    if sa_o is not None or sa_r is not None:
        seqadj = (sa_o or [0, 0, 0]) + (sa_r or [0, 0, 0])
    m = None
    if master is not None:
        if len(master[1]) != alen_family:
            raise CodecError("master tuple does not match the family")
        m = list(master)
    if proto is not None and not ((l4 == IPPROTO_TCP and len(proto) == 5)
                                  or (l4 != IPPROTO_TCP and len(proto) == 3
                                      and l4 in (IPPROTO_SCTP, IPPROTO_DCCP))):
        raise CodecError("protoinfo does not match l4proto")
    record = _packb([RECORD_VERSION, family, l4, [osrc, odst, osp, odp], list(reply[1:]),
                     status, timeout, mark, zone, proto, helper, labels, seqadj, m])
    key = _KEY_HEAD.pack(family, l4, zone, osp, odp) + osrc + odst
    tcp_state = proto[0] if (proto is not None and l4 == IPPROTO_TCP) else -1
    # tuple.__new__ directly: the NamedTuple's generated __new__ is a Python-level call
    return _new_tuple(CtEvent, (kind, key, mark, l4, tcp_state, status, record, portid))


def _decode_exp(buf: bytes, pos: int, end: int, family: int) -> ExpectRecord:
    master = tup = mask = nat_tuple = None
    timeout = klass = nat_dir = None
    helper = fn = None
    zone = flags = 0
    nla = _NLA.unpack_from
    while pos < end:
        alen, atype = nla(buf, pos)
        if alen < 4 or pos + alen > end:
            raise CodecError("attribute length out of bounds")
        atype &= NLA_TYPE_MASK
        if atype == CTA_EXPECT_MASTER:
            master = _tuple(buf, pos + 4, pos + alen)
        elif atype == CTA_EXPECT_TUPLE:
            tup = _tuple(buf, pos + 4, pos + alen)
        elif atype == CTA_EXPECT_MASK:
            mask = _tuple(buf, pos + 4, pos + alen)
        elif atype == CTA_EXPECT_TIMEOUT:
            timeout = _u32(buf, pos, alen)
        elif atype == CTA_EXPECT_HELP_NAME:
            helper = _cstr(buf, pos + 4, pos + alen)
        elif atype == CTA_EXPECT_FN:
            fn = _cstr(buf, pos + 4, pos + alen)
        elif atype == CTA_EXPECT_ZONE:
            if alen != 6:
                raise CodecError("bad CTA_EXPECT_ZONE")
            zone = _U16BE.unpack_from(buf, pos + 4)[0]
        elif atype == CTA_EXPECT_FLAGS:
            flags = _u32(buf, pos, alen)
        elif atype == CTA_EXPECT_CLASS:
            klass = _u32(buf, pos, alen)
        elif atype == CTA_EXPECT_NAT:
            p, e = pos + 4, pos + alen
            while p < e:
                blen, btype = nla(buf, p)
                if blen < 4 or p + blen > e:
                    raise CodecError("attribute length out of bounds")
                btype &= NLA_TYPE_MASK
                if btype == CTA_EXPECT_NAT_DIR:
                    nat_dir = _u32(buf, p, blen)
                elif btype == CTA_EXPECT_NAT_TUPLE:
                    nat_tuple = _tuple(buf, p + 4, p + blen)
                p += (blen + 3) & ~3
        pos += (alen + 3) & ~3
    if master is None or tup is None or mask is None:
        raise CodecError("expectation without master, tuple or mask")
    return ExpectRecord(family=family, master=_pt(master), tuple=_pt(tup), mask=_pt(mask),
                        timeout=timeout, helper=helper, zone=zone, flags=flags, klass=klass,
                        nat_dir=nat_dir, nat_tuple=None if nat_tuple is None else _pt(nat_tuple),
                        fn=fn)


def _pt(t: tuple[int, bytes, bytes, int, int]) -> ProtoTuple:
    return ProtoTuple(t[0], FlowTuple(t[1], t[2], t[3], t[4]))


assert (CT_NEW, CT_DELETE, NLM_F_CREATE) == (0x100, 0x102, 0x400)
assert (KIND_NEW, KIND_UPDATE, KIND_DESTROY, KIND_DUMP) == (1, 2, 3, 4)


def decode(buf: bytes, out: Decoded | None = None, *, dump: bool = False) -> Decoded:
    """Decode every netlink message in ``buf`` (one ``recv``).

    Conntrack messages become :class:`CtEvent` (kind DUMP when ``dump`` is true), expectation
    messages :class:`ExpEvent`, ``NLMSG_ERROR`` :class:`NetlinkAck`; ``NLMSG_DONE`` sets
    ``done``. Other messages are counted in ``skipped``. Raises only :class:`CodecError`.
    """
    if out is None:
        out = Decoded([], [], [])
    events = out.events
    append = events.append
    decode_ct = _decode_ct
    c_decode = _c_decode_ct
    pos = 0
    n = len(buf)
    hdr = _NLMSG.unpack_from
    try:
        while pos < n:
            if c_decode is not None:
                # the C decoder takes every conntrack message it decodes completely and stops
                # at the first other one, which the code below handles (and raises for)
                pos = c_decode(buf, pos, dump, events)
                if pos >= n:
                    break
            if n - pos < 16:
                raise CodecError("truncated netlink header")
            mlen, mtype, mflags, _seq, portid = hdr(buf, pos)
            if mlen < 16 or pos + mlen > n:
                raise CodecError("netlink message length out of bounds")
            end = pos + mlen
            # literals (once per message): 0x100 CT_NEW, 0x102 CT_DELETE, 0x400 NLM_F_CREATE;
            # kinds 4 DUMP, 3 DESTROY, 1 NEW, 2 UPDATE
            if mtype == 0x100 or mtype == 0x102:
                if mlen < 20:
                    raise CodecError("truncated nfgenmsg")
                kind = 4 if dump else 3 if mtype == 0x102 else 1 if mflags & 0x400 else 2
                append(decode_ct(buf, pos + 20, end, buf[pos + 16], kind, portid))
            elif mtype in (EXP_NEW, EXP_DELETE):
                if mlen < 20:
                    raise CodecError("truncated nfgenmsg")
                kind = KIND_DUMP if dump else KIND_DESTROY if mtype == EXP_DELETE else KIND_NEW
                out.expectations.append(
                    ExpEvent(kind, _decode_exp(buf, pos + 20, end, buf[pos + 16]), portid))
            elif mtype == NLMSG_ERROR:
                if mlen < 36:
                    raise CodecError("truncated NLMSG_ERROR")
                err = _ERRNO.unpack_from(buf, pos + 16)[0]
                oseq = _NLMSG.unpack_from(buf, pos + 20)[3]
                out.acks.append(NetlinkAck(oseq, -err))
            elif mtype == NLMSG_DONE:
                out.done = True
            else:
                out.skipped += 1
            pos += (mlen + 3) & ~3
    except (struct.error, IndexError) as e:
        raise CodecError(f"truncated message: {e}") from None
    return out


# -- encoding ---------------------------------------------------------------------------------


def _nla(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _NLA.pack(n, atype) + payload + b"\0" * (-n & 3)


def _nest(atype: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return _NLA.pack(4 + len(body), atype | NLA_F_NESTED) + body


_PORTS_V4 = struct.Struct("=HH HH HH4s HH4s HH HHB3x HH2s2x HH2s2x")
_PORTS_V6 = struct.Struct("=HH HH HH16s HH16s HH HHB3x HH2s2x HH2s2x")
_N = NLA_F_NESTED


def encode_tuple(atype: int, l4proto: int, src: bytes, dst: bytes, sport: int,
                 dport: int) -> bytes:
    """One CTA_TUPLE_* attribute (ports, ICMP id/type/code, or addresses only)."""
    if l4proto in PORT_PROTOS:
        sp, dp = sport.to_bytes(2, "big"), dport.to_bytes(2, "big")
        if len(src) == 4:
            return _PORTS_V4.pack(52, atype | _N, 20, CTA_TUPLE_IP | _N, 8, CTA_IP_V4_SRC, src,
                                  8, CTA_IP_V4_DST, dst, 28, CTA_TUPLE_PROTO | _N,
                                  5, CTA_PROTO_NUM, l4proto, 6, CTA_PROTO_SRC_PORT, sp,
                                  6, CTA_PROTO_DST_PORT, dp)
        return _PORTS_V6.pack(76, atype | _N, 44, CTA_TUPLE_IP | _N, 20, CTA_IP_V6_SRC, src,
                              20, CTA_IP_V6_DST, dst, 28, CTA_TUPLE_PROTO | _N,
                              5, CTA_PROTO_NUM, l4proto, 6, CTA_PROTO_SRC_PORT, sp,
                              6, CTA_PROTO_DST_PORT, dp)
    if len(src) == 4:
        ip = _nest(CTA_TUPLE_IP, _nla(CTA_IP_V4_SRC, src), _nla(CTA_IP_V4_DST, dst))
    else:
        ip = _nest(CTA_TUPLE_IP, _nla(CTA_IP_V6_SRC, src), _nla(CTA_IP_V6_DST, dst))
    parts = [_nla(CTA_PROTO_NUM, bytes([l4proto]))]
    if l4proto in ICMP_PROTOS:
        base = CTA_PROTO_ICMP_ID if l4proto == IPPROTO_ICMP else CTA_PROTO_ICMPV6_ID
        parts += [_nla(base, sport.to_bytes(2, "big")), _nla(base + 1, bytes([dport >> 8])),
                  _nla(base + 2, bytes([dport & 0xFF]))]
    elif sport or dport:  # GRE keys travel in the port slots
        parts += [_nla(CTA_PROTO_SRC_PORT, sport.to_bytes(2, "big")),
                  _nla(CTA_PROTO_DST_PORT, dport.to_bytes(2, "big"))]
    return _nest(atype, ip, _nest(CTA_TUPLE_PROTO, *parts))


def _nfmsg(mtype: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    return _NLMSG_NFGEN.pack(20 + len(body), mtype, flags, seq, 0, family, 0, 0) + body


def _nat(atype: int, addr: bytes, port: int | None) -> bytes:
    if port is not None and len(addr) == 4:
        p = port.to_bytes(2, "big")
        return _NAT_V4_PORT(_NLA.pack(40, atype | NLA_F_NESTED), _H_NAT_MIN4, addr,
                            _H_NAT_MAX4, addr, _H_NAT_PROTO, _H_PORT_MIN, p, _H_PORT_MAX, p)
    if len(addr) == 4:
        parts = [_nla(CTA_NAT_V4_MINIP, addr), _nla(CTA_NAT_V4_MAXIP, addr)]
    else:
        parts = [_nla(CTA_NAT_V6_MINIP, addr), _nla(CTA_NAT_V6_MAXIP, addr)]
    if port is not None:
        p = port.to_bytes(2, "big")
        parts.append(_nest(CTA_NAT_PROTO, _nla(CTA_PROTONAT_PORT_MIN, p),
                           _nla(CTA_PROTONAT_PORT_MAX, p)))
    return _nest(atype, *parts)


# Fixed layouts of the commonest create attributes, packed in one call each (encoding is
# half the cost of an inject). Attribute headers are native-order constants, values big-endian.
_STM = struct.Struct(">4sI4sI4sI").pack
_H_STATUS, _H_TIMEOUT, _H_MARK = (_NLA.pack(8, t) for t in (CTA_STATUS, CTA_TIMEOUT, CTA_MARK))
_TCPINFO = struct.Struct(">12sB3x4sB3x4sB3x4sBB2x4sBB2x").pack
_H_TCPINFO = (_NLA.pack(48, CTA_PROTOINFO | NLA_F_NESTED)
              + _NLA.pack(44, CTA_PROTOINFO_TCP | NLA_F_NESTED)
              + _NLA.pack(5, CTA_PROTOINFO_TCP_STATE))
_H_WS_O = _NLA.pack(5, CTA_PROTOINFO_TCP_WSCALE_ORIGINAL)
_H_WS_R = _NLA.pack(5, CTA_PROTOINFO_TCP_WSCALE_REPLY)
_H_FL_O = _NLA.pack(6, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL)
_H_FL_R = _NLA.pack(6, CTA_PROTOINFO_TCP_FLAGS_REPLY)
_H_TCPINFO_REST = (_H_WS_O, _H_WS_R, _H_FL_O, _H_FL_R)
_NAT_V4_PORT = struct.Struct(">4s4s4s4s4s4s4s2s2x4s2s2x").pack
_H_NAT_MIN4 = _NLA.pack(8, CTA_NAT_V4_MINIP)
_H_NAT_MAX4 = _NLA.pack(8, CTA_NAT_V4_MAXIP)
_H_NAT_PROTO = _NLA.pack(20, CTA_NAT_PROTO | NLA_F_NESTED)
_H_PORT_MIN = _NLA.pack(6, CTA_PROTONAT_PORT_MIN)
_H_PORT_MAX = _NLA.pack(6, CTA_PROTONAT_PORT_MAX)


def _u32attr(atype: int, v: int) -> bytes:
    return _NLA.pack(8, atype) + _U32BE.pack(v)


_PREFIX_V4 = _prefix_structs(4)
_PREFIX_V6 = _prefix_structs(16)


def _protoinfo_attr(l4: int, pi: list[Any]) -> bytes:
    if l4 == IPPROTO_TCP:
        st, ws_o, ws_r, fl_o, fl_r = pi[:5]
        # mask 0xff: the kernel applies flags & mask; dumps report mask 0
        return _nest(CTA_PROTOINFO, _nest(
            CTA_PROTOINFO_TCP, _nla(CTA_PROTOINFO_TCP_STATE, bytes([st])),
            _nla(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, bytes([ws_o])),
            _nla(CTA_PROTOINFO_TCP_WSCALE_REPLY, bytes([ws_r])),
            _nla(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes([fl_o, 0xFF])),
            _nla(CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes([fl_r, 0xFF]))))
    if l4 == IPPROTO_SCTP:
        return _nest(CTA_PROTOINFO, _nest(
            CTA_PROTOINFO_SCTP, _nla(CTA_PROTOINFO_SCTP_STATE, bytes([pi[0]])),
            _u32attr(CTA_PROTOINFO_SCTP_VTAG_ORIGINAL, pi[1]),
            _u32attr(CTA_PROTOINFO_SCTP_VTAG_REPLY, pi[2])))
    if l4 == IPPROTO_DCCP:
        return _nest(CTA_PROTOINFO, _nest(
            CTA_PROTOINFO_DCCP, _nla(CTA_PROTOINFO_DCCP_STATE, bytes([pi[0]])),
            _nla(CTA_PROTOINFO_DCCP_ROLE, bytes([pi[1]])),
            _nla(CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ, _U64BE.pack(pi[2]))))
    return b""


def _create_body(f: list[Any], default_timeout: int) -> tuple[int, bytes]:
    """Attributes of a create for the packed-form array ``f``; returns (family, body)."""
    family, l4 = f[1], f[2]
    o, r = f[3], f[4]
    status = f[5]
    master = f[13]
    parts = [encode_tuple(CTA_TUPLE_ORIG, l4, o[0], o[1], o[2], o[3])]
    nat: list[bytes] = []
    if status & (IPS_SRC_NAT | IPS_DST_NAT):
        # un-NATed reply (the kernel's inverse) plus ranges: the kernel redoes the NAT itself
        if l4 in PORT_PROTOS:
            parts.append(encode_tuple(CTA_TUPLE_REPLY, l4, o[1], o[0], o[3], o[2]))
        else:
            inv = FlowTuple(o[0], o[1], o[2], o[3]).inverse(l4)
            parts.append(encode_tuple(CTA_TUPLE_REPLY, l4, inv.src, inv.dst, inv.sport,
                                      inv.dport))
        icmp = l4 in ICMP_PROTOS
        ported = l4 in PORT_PROTOS or icmp
        if status & IPS_DST_NAT:
            nat.append(_nat(CTA_NAT_DST, r[0], (r[2] if ported else None)))
        if status & IPS_SRC_NAT:
            nat.append(_nat(CTA_NAT_SRC, r[1], (r[2] if icmp else r[3] if ported else None)))
    else:
        parts.append(encode_tuple(CTA_TUPLE_REPLY, l4, r[0], r[1], r[2], r[3]))
    # EXPECTED must not be sent (EBUSY): the kernel sets it from CTA_TUPLE_MASTER
    st = (status & CREATE_STATUS_MASK) | IPS_CONFIRMED
    timeout = f[6]
    parts.append(_STM(_H_STATUS, st, _H_TIMEOUT, default_timeout if timeout is None else timeout,
                      _H_MARK, f[7]))
    if f[8]:
        parts.append(_NLA.pack(6, CTA_ZONE) + _U16BE.pack(f[8]) + b"\0\0")
    pi = f[9]
    if pi is not None:
        if l4 == IPPROTO_TCP:
            # flag mask 0xff: the kernel applies flags & mask (dumps report mask 0)
            parts.append(_TCPINFO(_H_TCPINFO, pi[0], _H_WS_O, pi[1], _H_WS_R, pi[2], _H_FL_O,
                                  pi[3], 0xFF, _H_FL_R, pi[4], 0xFF))
        else:
            parts.append(_protoinfo_attr(l4, pi))
    if f[10] is not None:
        parts.append(_nest(CTA_HELP, _nla(CTA_HELP_NAME, f[10].encode("ascii") + b"\0")))
    parts += nat
    if f[11] is not None:
        parts.append(_nla(CTA_LABELS, f[11]))
        parts.append(_nla(CTA_LABELS_MASK, b"\xff" * len(f[11])))
    if f[12] is not None:
        sa = f[12]
        for atype, vals in ((CTA_SEQ_ADJ_ORIG, sa[0:3]), (CTA_SEQ_ADJ_REPLY, sa[3:6])):
            parts.append(_nest(atype, _u32attr(CTA_SEQADJ_CORRECTION_POS, vals[0]),
                               _u32attr(CTA_SEQADJ_OFFSET_BEFORE, vals[1]),
                               _u32attr(CTA_SEQADJ_OFFSET_AFTER, vals[2])))
    if master is not None:
        parts.append(encode_tuple(CTA_TUPLE_MASTER, master[0], master[1], master[2],
                                  master[3], master[4]))
    return family, b"".join(parts)


# Whole-create fast path for the commonest standby copies: ports (TCP, UDP, ...), zone 0, no
# helper, labels, sequence adjustment or master; optionally TCP protoinfo and NAT ranges.
# Header, both tuples, status/timeout/mark (and the TCP protoinfo) in two packs, the constant
# attribute headers bound once per layout (the generic encode was ~2 us of a receiver's
# per-flow work; the output is byte-identical to _create_body's, see the unit tests).
def _create_packer(alen: int, tcp: bool) -> Callable[..., bytes]:
    def headers(atype: int) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        h = _fast_headers(alen, *((CTA_IP_V4_SRC, CTA_IP_V4_DST) if alen == 4
                                  else (CTA_IP_V6_SRC, CTA_IP_V6_DST)))
        outer = _NLA.pack(4 + 4 + 2 * (4 + alen) + 28, atype | NLA_F_NESTED)
        return outer + h[0] + h[1], h[2], h[3] + h[4], h[5], h[6]
    tup = f"12s{alen}s4s{alen}s8sB3x4sH2x4sH2x"
    st = struct.Struct(">" + tup + tup + "4sI4sI4sI"
                       + ("12sB3x4sB3x4sB3x4sBB2x4sBB2x" if tcp else ""))
    pack, size, hdr = st.pack, 20 + st.size, _NLMSG_NFGEN.pack
    o0, o1, o2, o3, o4 = headers(CTA_TUPLE_ORIG)
    r0, r1, r2, r3, r4 = headers(CTA_TUPLE_REPLY)
    hs, ht, hm = _H_STATUS, _H_TIMEOUT, _H_MARK
    hti, hwo, hwr, hfo, hfr = _H_TCPINFO, _H_WS_O, _H_WS_R, _H_FL_O, _H_FL_R

    if not tcp:
        def create(flags: int, seq: int, family: int, l4: int, osrc: bytes, odst: bytes,
                   osp: int, odp: int, rsrc: bytes, rdst: bytes, rsp: int, rdp: int,
                   status: int, timeout: int, mark: int, pi: Any, nat: bytes) -> bytes:
            return hdr(size + len(nat), CT_NEW, flags, seq, 0, family, 0, 0) + pack(
                o0, osrc, o1, odst, o2, l4, o3, osp, o4, odp,
                r0, rsrc, r1, rdst, r2, l4, r3, rsp, r4, rdp, hs, status, ht, timeout, hm,
                mark) + nat
        return create

    def create_tcp(flags: int, seq: int, family: int, l4: int, osrc: bytes, odst: bytes,
                   osp: int, odp: int, rsrc: bytes, rdst: bytes, rsp: int, rdp: int,
                   status: int, timeout: int, mark: int, pi: Any, nat: bytes) -> bytes:
        st, ws_o, ws_r, fl_o, fl_r = pi
        return hdr(size + len(nat), CT_NEW, flags, seq, 0, family, 0, 0) + pack(
            o0, osrc, o1, odst, o2, l4, o3, osp, o4, odp,
            r0, rsrc, r1, rdst, r2, l4, r3, rsp, r4, rdp, hs, status, ht, timeout, hm, mark,
            hti, st, hwo, ws_o, hwr, ws_r, hfo, fl_o, 0xFF, hfr, fl_r, 0xFF) + nat
    return create_tcp


_CREATE_FAST = {(family, tcp): _create_packer(alen, tcp)
                for family, alen in ((AF_INET, 4), (AF_INET6, 16)) for tcp in (False, True)}
_NAT_STATUS = IPS_SRC_NAT | IPS_DST_NAT


def _create_fast(f: list[Any], seq: int, flags: int, default_timeout: int) -> bytes | None:
    """The create message of packed-form ``f`` on the fast path, or None (not its shape)."""
    if len(f) != 14:
        return None
    _v, family, l4, o, r, status, timeout, mark, zone, pi, helper, labels, seqadj, master = f
    tcp = pi is not None
    create = _CREATE_FAST.get((family, tcp))
    if (create is None or l4 not in PORT_PROTOS or zone or helper is not None
            or labels is not None or seqadj is not None or master is not None
            or (tcp and (l4 != IPPROTO_TCP or len(pi) != 5)) or len(o) != 4 or len(r) != 4):
        return None
    osrc, odst, osp, odp = o
    rsrc, rdst, rsp, rdp = r
    alen = 4 if family == AF_INET else 16
    if not (len(osrc) == len(odst) == len(rsrc) == len(rdst) == alen):
        return None
    nat = b""
    if status & _NAT_STATUS:
        # as _create_body: the un-NATed reply (the original tuple's inverse) plus the ranges
        # (min == max) taken from the NATed reply; destination NAT first
        if status & IPS_DST_NAT:
            nat = _nat(CTA_NAT_DST, rsrc, rsp)
        if status & IPS_SRC_NAT:
            nat += _nat(CTA_NAT_SRC, rdst, rdp)
        rsrc, rdst, rsp, rdp = odst, osrc, odp, osp
    return create(flags, seq, family, l4, osrc, odst, osp, odp, rsrc, rdst, rsp, rdp,
                  (status & CREATE_STATUS_MASK) | IPS_CONFIRMED,
                  default_timeout if timeout is None else timeout, mark, pi, nat)


def encode_create(record: bytes, seq: int, *, ack: bool = False,
                  default_timeout: int = 120) -> bytes:
    """One IPCTNL_MSG_CT_NEW (create, fail with EEXIST if present) for a packed record."""
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | (NLM_F_ACK if ack else 0)
    if _c_create is not None:
        msg = _c_create(record, seq, flags, default_timeout)
        if msg is not None:
            return msg
    try:
        f = unpack_fields(record)
        msg = _create_fast(f, seq, flags, default_timeout)
        if msg is not None:
            return msg
        family, body = _create_body(f, default_timeout)
        # inside the try: a family that is not a small integer (a peer's bad record) fails here
        return _nfmsg(CT_NEW, flags, seq, family, body)
    except (LookupError, TypeError, ValueError, AttributeError, OverflowError,
            struct.error) as e:  # LookupError: an empty map ({}) where a list belongs
        if isinstance(e, RecordError):
            raise
        raise RecordError(f"record cannot be encoded: {e}") from None


def encode_create_batch(records: Sequence[bytes], seq_start: int, *, ack_last: bool = True,
                        default_timeout: int = 120) -> bytes:
    """Creates for ``records`` with seq ``seq_start + i``; the last asks for an ACK."""
    if _c_create is not None and _ctfast is not None:
        def fallback(record: bytes, seq: int, ack: bool) -> bytes:
            return encode_create(record, seq, ack=ack, default_timeout=default_timeout)
        out: bytes = _ctfast.create_batch(records, seq_start, ack_last, default_timeout,
                                          fallback)
        return out
    last = len(records) - 1
    return b"".join(encode_create(r, seq_start + i, ack=ack_last and i == last,
                                  default_timeout=default_timeout)
                    for i, r in enumerate(records))


def _key_body(key: bytes) -> tuple[int, bytes]:
    family, l4, zone, src, dst, sport, dport = parse_key(key)
    body = encode_tuple(CTA_TUPLE_ORIG, l4, src, dst, sport, dport)
    if zone:
        body += _NLA.pack(6, CTA_ZONE) + _U16BE.pack(zone) + b"\0\0"
    return family, body


def _delete_packer(alen: int, family: int) -> Callable[[int, int, bytes], bytes]:
    """A delete of a zone-0 port-protocol key in one pack: the key's addresses and (already
    big-endian) ports go into the tuple as they are (byte-identical to the generic encoder)."""
    h = _fast_headers(alen, *((CTA_IP_V4_SRC, CTA_IP_V4_DST) if alen == 4
                              else (CTA_IP_V6_SRC, CTA_IP_V6_DST)))
    o0 = _NLA.pack(4 + 4 + 2 * (4 + alen) + 28, CTA_TUPLE_ORIG | NLA_F_NESTED) + h[0] + h[1]
    o1, o2, o3, o4 = h[2], h[3] + h[4], h[5], h[6]
    st = struct.Struct(f">12s{alen}s4s{alen}s8sB3x4s2s2x4s2s2x")
    pack, size, hdr = st.pack, 20 + st.size, _NLMSG_NFGEN.pack
    a, b = 8 + alen, 8 + 2 * alen

    def delete(flags: int, seq: int, key: bytes) -> bytes:
        return hdr(size, CT_DELETE, flags, seq, 0, family, 0, 0) + pack(
            o0, key[8:a], o1, key[a:b], o2, key[1], o3, key[4:6], o4, key[6:8])
    return delete


# by key length: 16 = IPv4, 40 = IPv6 (flowrecord.flow_key)
_DELETE_FAST = {16: (AF_INET, _delete_packer(4, AF_INET)),
                40: (AF_INET6, _delete_packer(16, AF_INET6))}


def encode_delete(key: bytes, seq: int, *, ack: bool = False) -> bytes:
    """IPCTNL_MSG_CT_DELETE of the entry named by ``key`` (ENOENT if absent)."""
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    fast = _DELETE_FAST.get(len(key))
    if (fast is not None and key[0] == fast[0] and key[1] in PORT_PROTOS and key[2] == 0
            and key[3] == 0):
        return fast[1](flags, seq, key)
    family, body = _key_body(key)
    return _nfmsg(CT_DELETE, flags, seq, family, body)


def encode_delete_batch(keys: Sequence[bytes], seq_start: int, *, ack_last: bool = True) -> bytes:
    last = len(keys) - 1
    return b"".join(encode_delete(k, seq_start + i, ack=ack_last and i == last)
                    for i, k in enumerate(keys))


def encode_update(key: bytes, seq: int, *, timeout: int | None = None, mark: int | None = None,
                  tcp_state: int | None = None, ack: bool = False) -> bytes:
    """IPCTNL_MSG_CT_NEW without NLM_F_CREATE: change timeout/mark/TCP state of an entry."""
    family, body = _key_body(key)
    parts = [body]
    if timeout is not None:
        parts.append(_u32attr(CTA_TIMEOUT, timeout))
    if mark is not None:
        parts.append(_u32attr(CTA_MARK, mark))
    if tcp_state is not None:
        parts.append(_nest(CTA_PROTOINFO, _nest(
            CTA_PROTOINFO_TCP, _nla(CTA_PROTOINFO_TCP_STATE, bytes([tcp_state])))))
    return _nfmsg(CT_NEW, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq, family,
                  b"".join(parts))


def encode_get(key: bytes, seq: int, *, ack: bool = False) -> bytes:
    """IPCTNL_MSG_CT_GET of one entry: the kernel answers with the entry, or ENOENT."""
    family, body = _key_body(key)
    return _nfmsg(CT_GET, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq, family, body)


def encode_dump_request(seq: int, *, family: int = 0, mark: int | None = None,
                        mark_mask: int = 0xFFFFFFFF) -> bytes:
    """IPCTNL_MSG_CT_GET dump, optionally filtered in the kernel by ``ct mark & mask == mark``."""
    body = b""
    if mark is not None:
        body = _u32attr(CTA_MARK, mark) + _u32attr(CTA_MARK_MASK, mark_mask)
    return _nfmsg(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, body)


def encode_exp_dump_request(seq: int, *, family: int = 0) -> bytes:
    return _nfmsg(EXP_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, b"")


def _ptuple(atype: int, t: ProtoTuple) -> bytes:
    return encode_tuple(atype, t.l4proto, t.tuple.src, t.tuple.dst, t.tuple.sport,
                        t.tuple.dport)


def encode_exp_create(exp: ExpectRecord, seq: int, *, ack: bool = True,
                      default_timeout: int = 300) -> bytes:
    """IPCTNL_MSG_EXP_NEW recreating ``exp`` (its master must exist, with its helper)."""
    parts = [_ptuple(CTA_EXPECT_MASTER, exp.master), _ptuple(CTA_EXPECT_TUPLE, exp.tuple),
             _ptuple(CTA_EXPECT_MASK, exp.mask),
             _u32attr(CTA_EXPECT_TIMEOUT,
                      default_timeout if exp.timeout is None else exp.timeout)]
    if exp.zone:
        parts.append(_NLA.pack(6, CTA_EXPECT_ZONE) + _U16BE.pack(exp.zone) + b"\0\0")
    if exp.helper:
        parts.append(_nla(CTA_EXPECT_HELP_NAME, exp.helper.encode("ascii") + b"\0"))
    if exp.flags:
        parts.append(_u32attr(CTA_EXPECT_FLAGS, exp.flags))
    if exp.klass is not None:
        parts.append(_u32attr(CTA_EXPECT_CLASS, exp.klass))
    if exp.fn:  # e.g. "nat-follow-master": the NAT helper's callback for the related flow
        parts.append(_nla(CTA_EXPECT_FN, exp.fn.encode("ascii") + b"\0"))
    if exp.nat_tuple is not None and exp.nat_dir is not None:
        parts.append(_nest(CTA_EXPECT_NAT, _u32attr(CTA_EXPECT_NAT_DIR, exp.nat_dir),
                           _ptuple(CTA_EXPECT_NAT_TUPLE, exp.nat_tuple)))
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | (NLM_F_ACK if ack else 0)
    return _nfmsg(EXP_NEW, flags, seq, exp.family, b"".join(parts))


def iter_messages(buf: bytes) -> Iterable[bytes]:
    """Split a buffer into whole netlink messages (for captures and tests)."""
    pos = 0
    while pos + 16 <= len(buf):
        mlen = _NLMSG.unpack_from(buf, pos)[0]
        if mlen < 16 or pos + mlen > len(buf):
            raise CodecError("netlink message length out of bounds")
        yield buf[pos:pos + mlen]
        pos += (mlen + 3) & ~3
