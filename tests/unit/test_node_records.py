"""The daemon's cheap checks on packed records (which standby copies may be created, and
when a one-way flow waits) agree with the full FlowRecord, and never raise on garbage."""

from __future__ import annotations

import pytest

from lbsync.kernel.flowrecord import (
    IPS_CONFIRMED,
    IPS_SEEN_REPLY,
    TCP_STATE_NAMES,
    FlowRecord,
    FlowTuple,
    TcpInfo,
    flow_key,
)
from lbsync.node import _injectable, _unanswered

A, B = bytes([198, 18, 0, 100]), bytes([198, 18, 1, 10])


def rec(l4: int, state: int | None = None, status: int = IPS_CONFIRMED) -> bytes:
    return FlowRecord(family=2, l4proto=l4, orig=FlowTuple(A, B, 40000, 5001),
                      reply=FlowTuple(B, A, 5001, 40000), status=status,
                      tcp=TcpInfo(state) if state is not None else None).pack()


@pytest.mark.parametrize("state", range(len(TCP_STATE_NAMES)))
def test_tcp_copies_only_past_the_handshake(state: int) -> None:
    name = TCP_STATE_NAMES[state]
    expected = name not in ("NONE", "SYN_SENT", "SYN_RECV", "SYN_SENT2")
    assert _injectable(rec(6, state)) is expected, name


def test_other_protocols_and_one_way_flows() -> None:
    udp_key = flow_key(2, 17, 0, A, B, 40000, 5001)
    tcp_key = flow_key(2, 6, 0, A, B, 40000, 5001)
    assert _injectable(rec(17)) and _injectable(rec(1))
    assert not _injectable(rec(6))           # TCP without protoinfo: no state, no copy
    assert _unanswered(udp_key, rec(17))
    assert not _unanswered(udp_key, rec(17, status=IPS_CONFIRMED | IPS_SEEN_REPLY))
    assert not _unanswered(tcp_key, rec(6, 3))


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"\x9f", rec(17)[:-3], b"\x91\x02"])
def test_malformed_records_are_never_injected_and_never_raise(garbage: bytes) -> None:
    assert _injectable(garbage) is False
    assert _unanswered(flow_key(2, 17, 0, A, B, 1, 2), garbage) is True


def test_standby_check_agrees_with_the_two_checks() -> None:
    """The receiver's one-unpack check gives what _injectable then _unanswered give."""
    from lbsync.node import _INJECTABLE, _NOT_ESTABLISHED, _UNANSWERED, _standby_check

    keys = [flow_key(2, 17, 0, A, B, 1, 2), flow_key(2, 6, 0, A, B, 1, 2)]
    recs = [rec(17), rec(17, status=IPS_CONFIRMED | IPS_SEEN_REPLY), rec(1), rec(6),
            *(rec(6, state) for state in range(len(TCP_STATE_NAMES))), b"\x93garbage"]
    for key in keys:
        for r in recs:
            if not _injectable(r):
                want = _NOT_ESTABLISHED
            elif _unanswered(key, r):
                want = _UNANSWERED
            else:
                want = _INJECTABLE
            assert _standby_check(key, r) == want, (key, r)
