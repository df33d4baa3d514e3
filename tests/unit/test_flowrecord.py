"""FlowRecord: golden packed vectors, stable keys, NAT derivation, tuple inversion, limits."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbsync.kernel.flowrecord import (
    AF_INET,
    AF_INET6,
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT,
    IPS_DST_NAT_DONE,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    IPS_SRC_NAT_DONE,
    FlowRecord,
    FlowTuple,
    ProtoTuple,
    RecordError,
    SctpInfo,
    SeqAdj,
    TcpInfo,
    flow_key,
    merge_records,
    parse_key,
)


def a(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


SNAT_TCP = FlowRecord(
    family=AF_INET, l4proto=IPPROTO_TCP,
    orig=FlowTuple(a("198.18.1.2"), a("198.18.2.2"), 43188, 8001),
    reply=FlowTuple(a("198.18.2.2"), a("198.18.2.1"), 8001, 40003),
    status=(IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED | IPS_SRC_NAT | IPS_SRC_NAT_DONE
            | IPS_DST_NAT_DONE),
    timeout=431999, mark=42, zone=5, tcp=TcpInfo(3, 7, 7, 0x23, 0x23), helper="ftp",
    labels=bytes([2]) + bytes(15))
SNAT_TCP_PACKED = bytes.fromhex(
    "9e01020694c404c6120102c404c6120202cda8b4cd1f4194c404c6120202c404c6120201cd1f41cd9c43cd019e"
    "ce0006977f2a05950307072323a3667470c41002000000000000000000000000000000c0c0")
SNAT_TCP_KEY = bytes.fromhex("02060005a8b41f41c6120102c6120202")

ICMP6 = FlowRecord(
    family=AF_INET6, l4proto=IPPROTO_ICMPV6,
    orig=FlowTuple(a("2001:db8:1::2"), a("2001:db8:2::2"), 0x4C43, 128 << 8),
    reply=FlowTuple(a("2001:db8:2::2"), a("2001:db8:1::2"), 0x4C43, 129 << 8),
    status=IPS_CONFIRMED | IPS_SEEN_REPLY, timeout=30)
ICMP6_PACKED = bytes.fromhex(
    "9e010a3a94c41020010db8000100000000000000000002c41020010db8000200000000000000000002cd4c43cd"
    "800094c41020010db8000200000000000000000002c41020010db8000100000000000000000002cd4c43cd8100"
    "0a1e0000c0c0c0c0c0")
ICMP6_KEY = bytes.fromhex(
    "0a3a00004c43800020010db800010000000000000000000220010db8000200000000000000000002")


@pytest.mark.parametrize(("rec", "packed", "key"), [(SNAT_TCP, SNAT_TCP_PACKED, SNAT_TCP_KEY),
                                                    (ICMP6, ICMP6_PACKED, ICMP6_KEY)])
def test_golden_vectors(rec: FlowRecord, packed: bytes, key: bytes) -> None:
    assert rec.pack() == packed
    assert FlowRecord.unpack(packed) == rec
    assert rec.key == key
    assert parse_key(key) == (rec.family, rec.l4proto, rec.zone, rec.orig.src, rec.orig.dst,
                              rec.orig.sport, rec.orig.dport)


def test_key_ignores_everything_but_original_tuple_and_zone() -> None:
    moved = dataclasses.replace(SNAT_TCP, mark=7, timeout=3, tcp=TcpInfo(7),
                                reply=FlowTuple(a("198.18.2.2"), a("198.18.2.9"), 8001, 1))
    assert moved.key == SNAT_TCP.key
    assert dataclasses.replace(SNAT_TCP, zone=6).key != SNAT_TCP.key
    assert len(SNAT_TCP.key) == 16 and len(ICMP6.key) == 40


def test_nat_derived_from_status_and_reply_like_conntrackd() -> None:
    snat = SNAT_TCP.snat
    assert snat is not None and snat.addr == a("198.18.2.1") and snat.port == 40003
    assert SNAT_TCP.dnat is None
    dnat = dataclasses.replace(
        SNAT_TCP, status=IPS_CONFIRMED | IPS_DST_NAT,
        reply=FlowTuple(a("198.18.9.9"), a("198.18.1.2"), 8443, 43188))
    assert dnat.snat is None
    assert dnat.dnat is not None and dnat.dnat.addr == a("198.18.9.9") and dnat.dnat.port == 8443
    # ICMP: the "port" of a NAT binding is the (possibly translated) echo id of the reply
    icmp = FlowRecord(family=AF_INET, l4proto=IPPROTO_ICMP,
                      orig=FlowTuple(a("198.18.1.2"), a("198.18.2.2"), 5, 8 << 8),
                      reply=FlowTuple(a("198.18.2.2"), a("198.18.2.1"), 77, 0),
                      status=IPS_CONFIRMED | IPS_SRC_NAT)
    assert icmp.snat is not None and icmp.snat.port == 77
    gre = dataclasses.replace(icmp, l4proto=IPPROTO_GRE)
    assert gre.snat is not None and gre.snat.port is None


def test_inverse_swaps_icmp_request_type_unlike_pyroute2() -> None:
    t = FlowTuple(a("198.18.1.2"), a("198.18.2.2"), 9, (8 << 8) | 0)
    inv = t.inverse(IPPROTO_ICMP)
    assert (inv.src, inv.dst, inv.icmp_id, inv.icmp_type, inv.icmp_code) == (
        t.dst, t.src, 9, 0, 0)
    assert ICMP6.orig.inverse(IPPROTO_ICMPV6) == ICMP6.reply
    tcp = FlowTuple(a("198.18.1.2"), a("198.18.2.2"), 1000, 80)
    assert tcp.inverse(IPPROTO_TCP) == FlowTuple(a("198.18.2.2"), a("198.18.1.2"), 80, 1000)


def test_all_optional_parts_round_trip() -> None:
    rec = dataclasses.replace(
        SNAT_TCP, l4proto=IPPROTO_SCTP, tcp=None, sctp=SctpInfo(3, 0xDEADBEEF, 1),
        seqadj_orig=SeqAdj(100, 3, 5), seqadj_reply=None,
        master=ProtoTuple(IPPROTO_TCP, FlowTuple(a("198.18.1.2"), a("198.18.2.2"), 1, 21)))
    back = FlowRecord.unpack(rec.pack())
    assert back.sctp == rec.sctp and back.master == rec.master
    assert back.seqadj_orig == SeqAdj(100, 3, 5) and back.seqadj_reply == SeqAdj(0, 0, 0)


def test_merge_keeps_fields_later_events_omit() -> None:
    update = dataclasses.replace(SNAT_TCP, helper=None, labels=None, tcp=TcpInfo(4),
                                 timeout=None)
    merged = merge_records(SNAT_TCP, update)
    assert merged.helper == "ftp" and merged.labels == SNAT_TCP.labels
    assert merged.tcp == TcpInfo(4) and merged.timeout == SNAT_TCP.timeout


@pytest.mark.parametrize("bad", [
    b"", b"\xc1", msgpack.packb([2] + [None] * 13), msgpack.packb([1, 2, 6]),
    msgpack.packb({"a": 1}), SNAT_TCP_PACKED[:-3],
    msgpack.packb([1, 2, 6, [b"\0" * 16, b"\0" * 4, 1, 2], [b"1234", b"1234", 1, 2], 0, None,
                   0, 0, None, None, None, None, None], use_bin_type=True),
    msgpack.packb([1, 2, 6, [b"1234", b"1234", "x", 2], [b"1234", b"1234", 1, 2], 0, None,
                   0, 0, None, None, None, None, None], use_bin_type=True),
    msgpack.packb([1, 2, 17, [b"1234", b"1234", 1, 2], [b"1234", b"1234", 1, 2], 0, None,
                   0, 0, [1, 2, 3], None, None, None, None], use_bin_type=True),
])
def test_malformed_records_raise_record_error(bad: bytes) -> None:
    with pytest.raises(RecordError):
        FlowRecord.unpack(bad)


@given(st.binary(max_size=300))
def test_random_bytes_only_record_error(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        FlowRecord.unpack(data)


addr4 = st.binary(min_size=4, max_size=4)
ports = st.integers(0, 65535)


@given(addr4, addr4, ports, ports, st.integers(0, 65535), st.sampled_from([6, 17, 132]))
def test_key_layout_property(src: bytes, dst: bytes, sp: int, dp: int, zone: int,
                             proto: int) -> None:
    key = flow_key(AF_INET, proto, zone, src, dst, sp, dp)
    assert parse_key(key) == (AF_INET, proto, zone, src, dst, sp, dp)
    assert key[:2] == bytes([AF_INET, proto]) and key[8:12] == src


leaves = (st.none() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=20)
          | st.text(max_size=5) | st.booleans() | st.floats(allow_nan=False))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=5), max_leaves=10)


@given(st.lists(values, min_size=14, max_size=16), st.booleans())
def test_structured_garbage_only_record_error(fields: list[object], versioned: bool) -> None:
    if versioned:
        fields[0] = 1
    try:
        rec = FlowRecord.unpack(msgpack.packb(fields, use_bin_type=True))
    except RecordError:
        return
    assert FlowRecord.unpack(rec.pack()) == rec
