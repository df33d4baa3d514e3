"""FlowRecord: everything needed to recreate one conntrack entry on another node.

Three forms of one flow, from cheapest to richest:

- the **key** (:func:`flow_key`): original tuple + zone, packed into 16 bytes (IPv4) or 40 bytes
  (IPv6): ``family u8 | l4proto u8 | zone be16 | sport be16 | dport be16 | src | dst``. It names
  a flow on every node (never a kernel pointer or id);
- the **packed form** (:meth:`FlowRecord.pack`): a versioned msgpack array, architecture
  independent (integers are msgpack integers, addresses raw network-order bytes). This is what
  the event hot path produces and what replication carries as opaque ``record`` bytes;
- the **object** (:class:`FlowRecord`): frozen dataclasses built lazily with
  :meth:`FlowRecord.unpack` when a caller needs named fields (tests, status, takeover checks).

Packed form, version 1 (positions are the wire format; decoders accept and ignore trailing
elements so a later version may append fields)::

    [1, family, l4proto, orig, reply, status, timeout|nil, mark, zone,
     protoinfo|nil, helper|nil, labels|nil, seqadj|nil, master|nil]
    tuple     = [src bytes, dst bytes, sport, dport]
    protoinfo = TCP  [state, wscale_orig, wscale_reply, flags_orig, flags_reply]
              | SCTP [state, vtag_orig, vtag_reply]
              | DCCP [state, role, handshake_seq]
    seqadj    = [orig_pos, orig_before, orig_after, reply_pos, reply_before, reply_after]
    master    = [l4proto, src, dst, sport, dport]

Port slots follow the kernel's tuple union: for ICMP/ICMPv6 ``sport`` is the echo id and
``dport`` is ``type << 8 | code``; for GRE they are the keys; for other protocols both are 0.
NAT is not stored: like conntrackd, it is derived from the status bits and the reply tuple
(:attr:`FlowRecord.snat`, :attr:`FlowRecord.dnat`), because dumps and events carry none.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

RECORD_VERSION = 1

AF_INET = 2
AF_INET6 = 10

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_GRE = 47
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

PORT_PROTOS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_DCCP, IPPROTO_SCTP, IPPROTO_UDPLITE})
ICMP_PROTOS = frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6})

# enum ip_conntrack_status (include/uapi/linux/netfilter/nf_conntrack_common.h)
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SEQ_ADJUST = 1 << 6
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
IPS_DYING = 1 << 9
IPS_FIXED_TIMEOUT = 1 << 10
IPS_TEMPLATE = 1 << 11
IPS_NAT_CLASH = 1 << 12
IPS_HELPER = 1 << 13
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15

# enum tcp_conntrack
TCP_NONE = 0
TCP_SYN_SENT = 1
TCP_SYN_RECV = 2
TCP_ESTABLISHED = 3
TCP_FIN_WAIT = 4
TCP_CLOSE_WAIT = 5
TCP_LAST_ACK = 6
TCP_TIME_WAIT = 7
TCP_CLOSE = 8
TCP_SYN_SENT2 = 9
TCP_STATE_NAMES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
                   "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")

# ICMP request -> reply types, used to invert a tuple (the kernel's invert_tuple does the same;
# pyroute2's NFCTAttrTuple.reverse() keeps the request type, which is wrong).
_ICMP_INVERSE = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17, 10: 9, 9: 10}
_ICMPV6_INVERSE = {128: 129, 129: 128, 139: 140, 140: 139}

_KEY_HEAD = struct.Struct(">BBHHH")


class RecordError(ValueError):
    """A packed record or key is malformed (wrong version, shape or types)."""


def flow_key(family: int, l4proto: int, zone: int, src: bytes, dst: bytes,
             sport: int, dport: int) -> bytes:
    """The stable key of a flow: original tuple + zone (see the module docstring)."""
    return _KEY_HEAD.pack(family, l4proto, zone, sport, dport) + src + dst


@dataclass(frozen=True, slots=True)
class FlowTuple:
    """One direction of a flow. Addresses are raw network-order bytes (4 or 16)."""

    src: bytes
    dst: bytes
    sport: int = 0
    dport: int = 0

    @property
    def src_addr(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.src)

    @property
    def dst_addr(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.dst)

    @property
    def icmp_id(self) -> int:
        return self.sport

    @property
    def icmp_type(self) -> int:
        return self.dport >> 8

    @property
    def icmp_code(self) -> int:
        return self.dport & 0xFF

    def inverse(self, l4proto: int) -> FlowTuple:
        """The tuple of the other direction before any NAT (the kernel's invert_tuple)."""
        if l4proto in ICMP_PROTOS:
            table = _ICMP_INVERSE if l4proto == IPPROTO_ICMP else _ICMPV6_INVERSE
            itype = table.get(self.dport >> 8, self.dport >> 8)
            return FlowTuple(self.dst, self.src, self.sport, (itype << 8) | (self.dport & 0xFF))
        return FlowTuple(self.dst, self.src, self.dport, self.sport)

    def fields(self) -> list[Any]:
        return [self.src, self.dst, self.sport, self.dport]


@dataclass(frozen=True, slots=True)
class ProtoTuple:
    """A tuple with its own L4 protocol: the master of a related flow, expectation tuples."""

    l4proto: int
    tuple: FlowTuple


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """TCP tracker state; flags are the tracker's ``IP_CT_TCP_FLAG_*`` per direction."""

    state: int
    wscale_orig: int = 0
    wscale_reply: int = 0
    flags_orig: int = 0
    flags_reply: int = 0


@dataclass(frozen=True, slots=True)
class SctpInfo:
    """SCTP tracker state and verification tags."""

    state: int
    vtag_orig: int = 0
    vtag_reply: int = 0


@dataclass(frozen=True, slots=True)
class DccpInfo:
    """DCCP tracker state."""

    state: int
    role: int = 0
    handshake_seq: int = 0


@dataclass(frozen=True, slots=True)
class SeqAdj:
    """Sequence adjustment of one direction (helpers that rewrite payload, e.g. FTP + NAT)."""

    correction_pos: int
    offset_before: int
    offset_after: int


@dataclass(frozen=True, slots=True)
class NatBinding:
    """One NAT manipulation derived from status and reply tuple: translated address and port."""

    addr: bytes
    port: int | None


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One conntrack entry, as much as another node needs to recreate it.

    Counters, the kernel id, ``use`` and timestamps are deliberately absent: they are local.
    ``timeout`` is seconds remaining when read (``None`` in DESTROY events).
    """

    family: int
    l4proto: int
    orig: FlowTuple
    reply: FlowTuple
    status: int = IPS_CONFIRMED
    timeout: int | None = None
    mark: int = 0
    zone: int = 0
    tcp: TcpInfo | None = None
    sctp: SctpInfo | None = None
    dccp: DccpInfo | None = None
    helper: str | None = None
    labels: bytes | None = None
    seqadj_orig: SeqAdj | None = None
    seqadj_reply: SeqAdj | None = None
    master: ProtoTuple | None = None

    @property
    def key(self) -> bytes:
        o = self.orig
        return flow_key(self.family, self.l4proto, self.zone, o.src, o.dst, o.sport, o.dport)

    @property
    def bucket(self) -> int:
        return self.mark

    @property
    def snat(self) -> NatBinding | None:
        """Source NAT as conntrackd derives it: reply destination when IPS_SRC_NAT is set."""
        if not self.status & IPS_SRC_NAT:
            return None
        return NatBinding(self.reply.dst, self._nat_port(self.reply.dport))

    @property
    def dnat(self) -> NatBinding | None:
        """Destination NAT: reply source when IPS_DST_NAT is set."""
        if not self.status & IPS_DST_NAT:
            return None
        return NatBinding(self.reply.src, self._nat_port(self.reply.sport))

    def _nat_port(self, port: int) -> int | None:
        if self.l4proto in PORT_PROTOS:
            return port
        if self.l4proto in ICMP_PROTOS:
            return self.reply.sport  # the (possibly translated) echo id
        return None

    # -- packed form ------------------------------------------------------------------------

    def fields(self) -> list[Any]:
        """The packed-form array (see the module docstring)."""
        proto: list[Any] | None = None
        if self.tcp is not None:
            t = self.tcp
            proto = [t.state, t.wscale_orig, t.wscale_reply, t.flags_orig, t.flags_reply]
        elif self.sctp is not None:
            proto = [self.sctp.state, self.sctp.vtag_orig, self.sctp.vtag_reply]
        elif self.dccp is not None:
            proto = [self.dccp.state, self.dccp.role, self.dccp.handshake_seq]
        seqadj: list[int] | None = None
        if self.seqadj_orig is not None or self.seqadj_reply is not None:
            so = self.seqadj_orig or SeqAdj(0, 0, 0)
            sr = self.seqadj_reply or SeqAdj(0, 0, 0)
            seqadj = [so.correction_pos, so.offset_before, so.offset_after,
                      sr.correction_pos, sr.offset_before, sr.offset_after]
        master: list[Any] | None = None
        if self.master is not None:
            m = self.master
            master = [m.l4proto, *m.tuple.fields()]
        return [RECORD_VERSION, self.family, self.l4proto, self.orig.fields(),
                self.reply.fields(), self.status, self.timeout, self.mark, self.zone, proto,
                self.helper, self.labels, seqadj, master]

    def pack(self) -> bytes:
        return pack_fields(self.fields())

    @classmethod
    def unpack(cls, data: bytes) -> FlowRecord:
        """Build the object from packed bytes; :class:`RecordError` if malformed."""
        return cls.from_fields(unpack_fields(data))

    @classmethod
    def from_fields(cls, f: list[Any]) -> FlowRecord:
        try:
            family, l4proto = _int(f[1], 255), _int(f[2], 255)
            orig, reply = _tuple(f[3], family), _tuple(f[4], family)
            tcp = sctp = dccp = None
            pi = f[9]
            if pi is not None:
                if l4proto == IPPROTO_TCP:
                    tcp = TcpInfo(*[_int(v, 255) for v in pi[:5]])
                elif l4proto == IPPROTO_SCTP:
                    sctp = SctpInfo(_int(pi[0], 255), _int(pi[1], U32), _int(pi[2], U32))
                elif l4proto == IPPROTO_DCCP:
                    dccp = DccpInfo(_int(pi[0], 255), _int(pi[1], 255), _int(pi[2], U64))
                else:
                    raise RecordError(f"protoinfo for l4proto {l4proto}")
            sa = f[12]
            so = sr = None
            if sa is not None:
                v = [_int(x, U32) for x in sa[:6]]
                so, sr = SeqAdj(v[0], v[1], v[2]), SeqAdj(v[3], v[4], v[5])
            master = None
            if f[13] is not None:
                m = f[13]
                master = ProtoTuple(_int(m[0], 255), _tuple(m[1:5], family))
            helper = f[10]
            labels = f[11]
            if helper is not None and not (isinstance(helper, str) and helper.isascii()):
                raise RecordError("helper must be an ASCII string")
            if labels is not None and not isinstance(labels, bytes):
                raise RecordError("labels must be bytes")
            timeout = None if f[6] is None else _int(f[6], U32)
            return cls(family=family, l4proto=l4proto, orig=orig, reply=reply,
                       status=_int(f[5], U32), timeout=timeout, mark=_int(f[7], U32),
                       zone=_int(f[8], 0xFFFF), tcp=tcp, sctp=sctp, dccp=dccp, helper=helper,
                       labels=labels, seqadj_orig=so, seqadj_reply=sr, master=master)
        except (IndexError, TypeError, ValueError) as e:
            if isinstance(e, RecordError):
                raise
            raise RecordError(f"malformed record: {e}") from None


def pack_fields(fields: list[Any]) -> bytes:
    out: bytes = msgpack.packb(fields, use_bin_type=True)
    return out


def unpack_fields(data: bytes) -> list[Any]:
    """Decode the packed array with explicit limits; :class:`RecordError` if malformed."""
    try:
        f = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                            max_bin_len=4096, max_str_len=64, max_array_len=64,
                            max_map_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise RecordError(f"undecodable record: {type(e).__name__}") from None
    if not isinstance(f, list) or len(f) < 14:
        raise RecordError("record is not an array of >= 14 elements")
    if f[0] != RECORD_VERSION:
        raise RecordError(f"unsupported record version {f[0]!r}")
    return f


U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF


def _int(v: Any, hi: int) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise RecordError(f"expected an integer in 0..{hi}, got {v!r:.20}")
    return v


def _tuple(t: Any, family: int) -> FlowTuple:
    alen = 4 if family == AF_INET else 16 if family == AF_INET6 else -1
    if alen < 0:
        raise RecordError(f"unknown family {family}")
    src, dst = t[0], t[1]
    if not (isinstance(src, bytes) and isinstance(dst, bytes)
            and len(src) == alen and len(dst) == alen):
        raise RecordError("tuple addresses do not match the family")
    return FlowTuple(src, dst, _int(t[2], 0xFFFF), _int(t[3], 0xFFFF))


def parse_key(key: bytes) -> tuple[int, int, int, bytes, bytes, int, int]:
    """Split a key into (family, l4proto, zone, src, dst, sport, dport)."""
    if len(key) not in (16, 40):
        raise RecordError(f"key of {len(key)} bytes")
    family, l4proto, zone, sport, dport = _KEY_HEAD.unpack_from(key, 0)
    alen = (len(key) - 8) // 2
    if (family, alen) not in ((AF_INET, 4), (AF_INET6, 16)):
        raise RecordError("key family does not match its length")
    return family, l4proto, zone, key[8:8 + alen], key[8 + alen:], sport, dport


def merge_records(old: FlowRecord, new: FlowRecord) -> FlowRecord:
    """``new`` completed by ``old``: UPDATE events carry protoinfo, helper, labels and seqadj
    only when those changed, so a consumer keeps earlier values for what an event omits."""
    return FlowRecord(
        family=new.family, l4proto=new.l4proto, orig=new.orig, reply=new.reply,
        status=new.status, timeout=new.timeout if new.timeout is not None else old.timeout,
        mark=new.mark, zone=new.zone, tcp=new.tcp or old.tcp, sctp=new.sctp or old.sctp,
        dccp=new.dccp or old.dccp, helper=new.helper if new.helper is not None else old.helper,
        labels=new.labels if new.labels is not None else old.labels,
        seqadj_orig=new.seqadj_orig or old.seqadj_orig,
        seqadj_reply=new.seqadj_reply or old.seqadj_reply, master=new.master or old.master)
