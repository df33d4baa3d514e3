"""nf_tables set-element messages built without a kernel: the cached element attributes give
the bytes an attribute-by-attribute encoding gives (the kernel side is tests/kernel/
test_nftset.py)."""

from __future__ import annotations

import struct

from lbsync.membership import Timing
from lbsync.nftset import (
    HEADS_CACHE_MAX,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    NFTA_DATA_VALUE,
    NFTA_LIST_ELEM,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    NFTA_SET_ELEM_TIMEOUT,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    ElementOp,
    NftSetSocket,
    ifname_key,
    mark_key,
)


def _nla(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, atype) + payload + b"\0" * (-n % 4)


def _expected(op: ElementOp, seq: int, ack: bool, table: str = "lbsync") -> bytes:
    timeout = _nla(NFTA_SET_ELEM_TIMEOUT, struct.pack(">Q", op.timeout_ms)) \
        if op.timeout_ms else b""
    elems = b"".join(_nla(NFTA_LIST_ELEM | NLA_F_NESTED,
                          _nla(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _nla(NFTA_DATA_VALUE, k))
                          + timeout) for k in op.keys)
    body = (_nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
            + _nla(NFTA_SET_ELEM_LIST_SET, op.set_name.encode() + b"\0")
            + _nla(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elems))
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0) | (NLM_F_CREATE if op.add else 0)
    mtype = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if op.add else NFT_MSG_DELSETELEM)
    payload = struct.pack("=BBH", NFPROTO_INET, 0, 0) + body
    return struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq, 0) + payload


def test_element_messages_match_an_attribute_by_attribute_encoding() -> None:
    with NftSetSocket() as s:
        for keys in ([mark_key(b) for b in range(0, 64, 3)], [ifname_key("outside0")],
                     [mark_key(7)]):
            for add in (True, False):
                for timeout in (0, 1, 187, 10**9):  # refreshes: same keys, new timeouts
                    op = ElementOp("owned", add, tuple(keys), timeout)
                    assert s._elem_msg(op, 42, True) == _expected(op, 42, True)
                    assert s._elem_msg(op, 43, False) == _expected(op, 43, False)
        for i in range(3 * HEADS_CACHE_MAX):  # the cache stays bounded
            s._elem_msg(ElementOp("owned", True, (mark_key(i),), 5), 1, False)
        assert len(s._heads) <= HEADS_CACHE_MAX


def test_owned_rewrite_threshold_is_half_a_heartbeat() -> None:
    for profile in ("default", "fast"):
        t = Timing.from_profile(profile)
        assert t.rewrite == t.heartbeat / 2
