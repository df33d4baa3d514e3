"""Codec: encoders checked by decoding (ours and pyroute2's), fuzzing the decoder, BPF program."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbsync.kernel import bpf
from lbsync.kernel import ctnetlink as C
from lbsync.kernel.flowrecord import (
    AF_INET,
    AF_INET6,
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT,
    IPS_DYING,
    IPS_EXPECTED,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    FlowRecord,
    FlowTuple,
    ProtoTuple,
    RecordError,
    SctpInfo,
    SeqAdj,
    TcpInfo,
    unpack_fields,
)
from tests.unit.test_ctnetlink_oracle import MESSAGES

pyroute2_nfct = pytest.importorskip("pyroute2.netlink.nfnetlink.nfctsocket")


def a(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def as_kernel_event(msg: bytes) -> FlowRecord:
    """Decode one of our requests as if the kernel had sent it back."""
    d = C.decode(msg)
    assert len(d.events) == 1
    return FlowRecord.unpack(d.events[0].record)


# -- creates ----------------------------------------------------------------------------------

addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u8 = st.integers(0, 255)


@st.composite
def records(draw: st.DrawFn) -> FlowRecord:
    family = draw(st.sampled_from([AF_INET, AF_INET6]))
    addr = addr4 if family == AF_INET else addr6
    l4 = draw(st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_ICMP,
                               IPPROTO_GRE, 99]))
    if l4 == IPPROTO_ICMP and family == AF_INET6:
        l4 = 58
    if l4 in (99,):
        sp = dp = 0
    elif l4 in (1, 58):
        sp, dp = draw(u16), draw(st.integers(0, 255)) << 8
    else:
        sp, dp = draw(u16), draw(u16)
    orig = FlowTuple(draw(addr), draw(addr), sp, dp)
    tcp = TcpInfo(draw(st.integers(0, 9)), draw(st.integers(0, 14)), draw(st.integers(0, 14)),
                  draw(u8), draw(u8)) if l4 == IPPROTO_TCP else None
    sctp = SctpInfo(draw(st.integers(0, 9)), draw(u32), draw(u32)) if l4 == IPPROTO_SCTP else None
    seq = draw(st.none() | st.tuples(u32, u32, u32))
    master = draw(st.none() | st.builds(lambda s, d, p: ProtoTuple(
        IPPROTO_TCP, FlowTuple(s, d, p, 21)), addr, addr, u16))
    return FlowRecord(
        family=family, l4proto=l4, orig=orig, reply=orig.inverse(l4),
        status=IPS_CONFIRMED | draw(st.sampled_from([0, IPS_SEEN_REPLY,
                                                     IPS_SEEN_REPLY | IPS_ASSURED])),
        timeout=draw(u32), mark=draw(u32), zone=draw(u16), tcp=tcp, sctp=sctp,
        helper=draw(st.none() | st.sampled_from(["ftp", "sip", "tftp"])),
        labels=draw(st.none() | st.binary(min_size=16, max_size=16)),
        seqadj_orig=None if seq is None else SeqAdj(*seq),
        seqadj_reply=None if seq is None else SeqAdj(*seq), master=master)


@given(records())
def test_create_carries_every_field(rec: FlowRecord) -> None:
    msg = C.encode_create(rec.pack(), 5)
    mtype, flags, seq = struct.unpack_from("=HHI", msg, 4)
    assert (mtype, seq) == (C.CT_NEW, 5)
    assert flags == C.NLM_F_REQUEST | C.NLM_F_CREATE | C.NLM_F_EXCL
    back = as_kernel_event(msg)
    assert back == rec


def test_create_status_always_confirmed_never_local_bits() -> None:
    rec = FlowRecord(family=AF_INET, l4proto=IPPROTO_UDP,
                     orig=FlowTuple(a("198.18.0.1"), a("198.18.0.2"), 1, 2),
                     reply=FlowTuple(a("198.18.0.2"), a("198.18.0.1"), 2, 1),
                     status=IPS_SEEN_REPLY | IPS_DYING | IPS_EXPECTED, timeout=None)
    back = as_kernel_event(C.encode_create(rec.pack(), 1, default_timeout=33))
    assert back.status == IPS_SEEN_REPLY | IPS_CONFIRMED
    assert back.timeout == 33


def test_nat_create_sends_unnated_reply_and_ranges() -> None:
    # SNAT + DNAT: client 198.18.1.2:40000 -> VIP 198.18.3.100:7005, translated to
    # 198.18.2.1:41001 -> 198.18.2.2:8005
    rec = FlowRecord(family=AF_INET, l4proto=IPPROTO_TCP,
                     orig=FlowTuple(a("198.18.1.2"), a("198.18.3.100"), 40000, 7005),
                     reply=FlowTuple(a("198.18.2.2"), a("198.18.2.1"), 8005, 41001),
                     status=IPS_CONFIRMED | IPS_SRC_NAT | IPS_DST_NAT, timeout=100,
                     tcp=TcpInfo(3))
    msg = C.encode_create(rec.pack(), 9)
    assert as_kernel_event(msg).reply == rec.orig.inverse(IPPROTO_TCP)
    m = pyroute2_nfct.nfct_msg(msg)
    m.decode()
    src, dst = m.get_attr("CTA_NAT_SRC"), m.get_attr("CTA_NAT_DST")
    assert src.get_attr("CTA_NAT_V4_MINIP") == src.get_attr("CTA_NAT_V4_MAXIP") == "198.18.2.1"
    assert dst.get_attr("CTA_NAT_V4_MINIP") == dst.get_attr("CTA_NAT_V4_MAXIP") == "198.18.2.2"
    sp, dp = src.get_attr("CTA_NAT_PROTO"), dst.get_attr("CTA_NAT_PROTO")
    assert sp.get_attr("CTA_PROTONAT_PORT_MIN") == sp.get_attr("CTA_PROTONAT_PORT_MAX") == 41001
    assert dp.get_attr("CTA_PROTONAT_PORT_MIN") == dp.get_attr("CTA_PROTONAT_PORT_MAX") == 8005
    # IPv6 SNAT, and ICMP (the echo id is the port range)
    rec6 = dataclasses.replace(
        rec, family=AF_INET6, status=IPS_CONFIRMED | IPS_SRC_NAT,
        orig=FlowTuple(a("2001:db8:1::2"), a("2001:db8:2::2"), 1, 8006),
        reply=FlowTuple(a("2001:db8:2::2"), a("2001:db8:2::1"), 8006, 42000))
    m = pyroute2_nfct.nfct_msg(C.encode_create(rec6.pack(), 1))
    m.decode()
    assert m.get_attr("CTA_NAT_SRC").get_attr("CTA_NAT_V6_MINIP") == "2001:db8:2::1"
    icmp = FlowRecord(family=AF_INET, l4proto=IPPROTO_ICMP,
                      orig=FlowTuple(a("198.18.1.2"), a("198.18.2.2"), 7, 8 << 8),
                      reply=FlowTuple(a("198.18.2.2"), a("198.18.2.1"), 99, 0),
                      status=IPS_CONFIRMED | IPS_SRC_NAT, timeout=30)
    m = pyroute2_nfct.nfct_msg(C.encode_create(icmp.pack(), 1))
    m.decode()
    nat_proto = m.get_attr("CTA_NAT_SRC").get_attr("CTA_NAT_PROTO")
    assert nat_proto.get_attr("CTA_PROTONAT_PORT_MIN") == 99
    reply = m.get_attr("CTA_TUPLE_REPLY").get_attr("CTA_TUPLE_PROTO")
    assert reply.get_attr("CTA_PROTO_ICMP_TYPE") == 0  # echo reply, not the request type


def test_batch_sequence_numbers_and_single_ack() -> None:
    recs = [FlowRecord(family=AF_INET, l4proto=IPPROTO_UDP,
                       orig=FlowTuple(a("198.18.0.1"), a("198.18.0.2"), i, 53),
                       reply=FlowTuple(a("198.18.0.2"), a("198.18.0.1"), 53, i),
                       timeout=10).pack() for i in range(5)]
    batch = C.encode_create_batch(recs, 100)
    msgs = list(C.iter_messages(batch))
    assert [struct.unpack_from("=I", m, 8)[0] for m in msgs] == [100, 101, 102, 103, 104]
    assert [bool(struct.unpack_from("=H", m, 6)[0] & C.NLM_F_ACK) for m in msgs] == [
        False, False, False, False, True]


def test_bad_record_bytes_raise_record_error() -> None:
    with pytest.raises(RecordError):
        C.encode_create(b"\x93\x01\x02\x03", 1)


def test_delete_update_dump_requests() -> None:
    rec = FlowRecord(family=AF_INET, l4proto=IPPROTO_TCP,
                     orig=FlowTuple(a("198.18.0.1"), a("198.18.0.2"), 1000, 80),
                     reply=FlowTuple(a("198.18.0.2"), a("198.18.0.1"), 80, 1000), zone=4)
    m = pyroute2_nfct.nfct_msg(C.encode_delete(rec.key, 3))
    m.decode()
    assert m["header"]["type"] == C.CT_DELETE and m.get_attr("CTA_ZONE") == 4
    p = m.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_PROTO")
    assert (p.get_attr("CTA_PROTO_SRC_PORT"), p.get_attr("CTA_PROTO_DST_PORT")) == (1000, 80)
    m = pyroute2_nfct.nfct_msg(C.encode_update(rec.key, 4, timeout=50, mark=6, tcp_state=3))
    m.decode()
    assert m["header"]["flags"] == C.NLM_F_REQUEST
    assert (m.get_attr("CTA_TIMEOUT"), m.get_attr("CTA_MARK")) == (50, 6)
    pi = m.get_attr("CTA_PROTOINFO").get_attr("CTA_PROTOINFO_TCP")
    assert pi.get_attr("CTA_PROTOINFO_TCP_STATE") == 3
    m = pyroute2_nfct.nfct_msg(C.encode_dump_request(5, mark=0x10, mark_mask=0xF0))
    m.decode()
    assert m["header"]["flags"] == C.NLM_F_REQUEST | C.NLM_F_DUMP
    assert (m.get_attr("CTA_MARK"), m.get_attr("CTA_MARK_MASK")) == (0x10, 0xF0)


def test_errors_and_done_are_reported() -> None:
    hdr = struct.pack("=IHHII", 36, C.NLMSG_ERROR, 0, 77, 0)
    err = hdr + struct.pack("=i", -17) + struct.pack("=IHHII", 60, C.CT_NEW, 0, 42, 0)
    done = struct.pack("=IHHII", 20, C.NLMSG_DONE, 2, 78, 0) + b"\0\0\0\0"
    d = C.decode(err + done)
    assert d.acks == [C.NetlinkAck(42, 17)] and d.done


# -- fuzzing: only CodecError escapes ---------------------------------------------------------

def decode_only_codec_error(data: bytes) -> None:
    try:
        d = C.decode(data)
    except C.CodecError:
        return
    for ev in d.events:  # whatever decoded is a valid record
        FlowRecord.unpack(ev.record)


@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    decode_only_codec_error(data)


@given(st.sampled_from(MESSAGES), st.lists(st.tuples(st.integers(0, 4095), u8), max_size=8),
       st.integers(0, 4096), st.binary(max_size=64))
def test_mutated_kernel_messages(msg: bytes, flips: list[tuple[int, int]], cut: int,
                                 tail: bytes) -> None:
    buf = bytearray(msg)
    for pos, val in flips:
        buf[pos % len(buf)] = val
    decode_only_codec_error(bytes(buf[:max(cut, 16)]) + tail)


@given(st.sampled_from(MESSAGES), st.integers(16, 600), st.integers(0, 0xFFFF))
def test_mutated_attribute_lengths(msg: bytes, pos: int, value: int) -> None:
    buf = bytearray(msg)
    if pos + 2 <= len(buf):
        struct.pack_into("=H", buf, pos & ~3, value)  # lengths sit on 4-byte boundaries
    decode_only_codec_error(bytes(buf))


# -- BPF --------------------------------------------------------------------------------------

def run_bpf(prog: list[tuple[int, int, int, int]], packet: bytes) -> int:
    """A tiny interpreter for the instructions the filter uses."""
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == bpf.BPF_LD_W_ABS:
            acc = int.from_bytes(packet[k:k + 4], "big")
            pc += 1
        elif code == bpf.BPF_JMP_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == bpf.BPF_RET_K:
            return k
        else:
            raise AssertionError(code)


@pytest.mark.parametrize("pids", [[4242], [1, 0x7FFFFFFF, 9]])
def test_bpf_drops_exactly_the_given_ports(pids: list[int]) -> None:
    prog = bpf.drop_portids_program(pids)
    for pid in [*pids, 0, 4243, 123456]:
        msg = struct.pack("=IHHII", 20, C.CT_NEW, 0, 0, pid)
        assert run_bpf(prog, msg) == (0 if pid in pids else 0xFFFFFFFF)


def test_event_prefix_fast_path_equals_the_generic_walk(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Captured kernel messages decode the same with and without the event fast path (orig,
    reply, id, status, timeout in one unpack), and the captured events do take it."""
    from tests.unit.test_ctnetlink_oracle import CT_MESSAGES

    fast = [C.decode(m) for m in CT_MESSAGES]
    taken = 0
    for m in CT_MESSAGES:
        prefix = C._PREFIX_V4 if m[16] == AF_INET else C._PREFIX_V6
        taken += len(m) >= 20 + prefix[0] and prefix[1](m, 20) == prefix[3]
    assert taken >= 10
    never = (1 << 20, C._PREFIX_V4[1], C._PREFIX_V4[2], ())
    monkeypatch.setattr(C, "_PREFIX_V4", never)
    monkeypatch.setattr(C, "_PREFIX_V6", (1 << 20, C._PREFIX_V6[1], C._PREFIX_V6[2], ()))
    assert [C.decode(m) for m in CT_MESSAGES] == fast


@given(records(), st.booleans())
def test_create_fast_path_is_byte_identical_to_the_generic_encoder(rec: FlowRecord,
                                                                  ack: bool) -> None:
    packed = rec.pack()
    flags = C.NLM_F_REQUEST | C.NLM_F_CREATE | C.NLM_F_EXCL | (C.NLM_F_ACK if ack else 0)
    family, body = C._create_body(unpack_fields(packed), 120)
    assert C.encode_create(packed, 9, ack=ack) == C._nfmsg(C.CT_NEW, flags, 9, family, body)
    plain = dataclasses.replace(rec, zone=0, helper=None, labels=None, seqadj_orig=None,
                                seqadj_reply=None, master=None, sctp=None)
    fields = unpack_fields(plain.pack())
    family, body = C._create_body(fields, 120)
    fast = C._create_fast(fields, 9, flags, 120)
    assert fast is None or fast == C._nfmsg(C.CT_NEW, flags, 9, family, body)
    if plain.l4proto in (IPPROTO_TCP, IPPROTO_UDP):
        assert fast is not None


@given(records(), st.booleans(), st.integers(0, 0xFFFFFFFF))
def test_delete_fast_path_is_byte_identical_to_the_generic_encoder(rec: FlowRecord, ack: bool,
                                                                  seq: int) -> None:
    for r in (rec, dataclasses.replace(rec, zone=0)):
        flags = C.NLM_F_REQUEST | (C.NLM_F_ACK if ack else 0)
        family, body = C._key_body(r.key)
        assert C.encode_delete(r.key, seq, ack=ack) == C._nfmsg(C.CT_DELETE, flags, seq,
                                                                 family, body)


@given(records(), st.sampled_from([IPS_SRC_NAT, IPS_DST_NAT, IPS_SRC_NAT | IPS_DST_NAT]),
       st.binary(min_size=16, max_size=16), u16, u16)
def test_nat_create_fast_path_is_byte_identical(rec: FlowRecord, nat: int, addrs: bytes,
                                                 sp: int, dp: int) -> None:
    """SNAT/DNAT copies (un-NATed reply + ranges) take the fast path, byte for byte."""
    alen = 4 if rec.family == AF_INET else 16
    natted = FlowTuple(addrs[:alen], addrs[-alen:], sp, dp)
    r = dataclasses.replace(rec, status=rec.status | nat, reply=natted, zone=0, helper=None,
                            labels=None, seqadj_orig=None, seqadj_reply=None, master=None,
                            sctp=None)
    fields = unpack_fields(r.pack())
    family, body = C._create_body(fields, 120)
    flags = C.NLM_F_REQUEST | C.NLM_F_CREATE | C.NLM_F_EXCL
    fast = C._create_fast(fields, 9, flags, 120)
    assert fast is None or fast == C._nfmsg(C.CT_NEW, flags, 9, family, body)
    if r.l4proto in (IPPROTO_TCP, IPPROTO_UDP):
        assert fast is not None
    assert C.encode_create(r.pack(), 9) == C._nfmsg(C.CT_NEW, flags, 9, family, body)
