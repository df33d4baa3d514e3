"""Membership wire messages, bitmaps, target maps and timing profiles."""

from __future__ import annotations

import msgpack
import pytest

from lbsync.config import MembershipConfig
from lbsync.membership import (
    Heartbeat,
    MapOffer,
    MapRequest,
    MembershipWireError,
    PeerReport,
    TargetMap,
    Timing,
    bitmap_from_buckets,
    buckets_from_bitmap,
    decode,
)


def _hb() -> Heartbeat:
    return Heartbeat(
        node_id=2, incarnation=7, seq=42, view_id=3, map_epoch=5, map_proposer=1,
        map_digest=b"\x11" * 16, owned=bitmap_from_buckets({0, 9}, 16), ready=True,
        fenced=False, drained=False, witness=False, weight=10, grace_ms=0,
        peers=(PeerReport(1, 4, 120, 40, 0), PeerReport(3, 1, 7, 41, 2)))


# fixarray(14): kind 1, version 1, node 2, inc 7, seq 42, view 3, epoch 5, proposer 1,
# bin16 digest, bin2 bitmap {0, 9}, flags READY, weight 10, grace 0, two peer reports.
GOLDEN_HEARTBEAT = (
    "9e010102072a030501c410" + "11" * 16 + "c4020102010a00"
    "92" "950104782800" "950301072902")


def test_heartbeat_golden_bytes_and_round_trip() -> None:
    hb = _hb()
    wire = msgpack.packb(hb.to_wire(), use_bin_type=True)
    assert wire.hex() == GOLDEN_HEARTBEAT
    assert decode(msgpack.unpackb(wire, raw=False)) == hb
    assert Heartbeat.from_wire(hb.to_wire()) == hb


def test_map_request_and_offer_round_trip() -> None:
    m = TargetMap.build(epoch=3, proposer=2, owners=[1, 2, 3], successors=[[2], [3, 1], []],
                        incarnations=[(1, 9), (2, 1), (3, 4)])
    for msg in (MapRequest(1, 3, 2), MapOffer(2, m)):
        obj = msgpack.unpackb(msgpack.packb(msg.to_wire(), use_bin_type=True), raw=False)
        assert decode(obj) == msg
    assert MapOffer.from_wire(MapOffer(2, m).to_wire()).map.digest == m.digest
    with pytest.raises(MembershipWireError):
        MapRequest.from_wire(MapOffer(2, m).to_wire())


@pytest.mark.parametrize("mutate", [
    lambda w: 5,
    lambda w: [],
    lambda w: [9, 1],
    lambda w: [w[0], 2, *w[2:]],                       # version
    lambda w: w[:-1],                                  # field count
    lambda w: [*w[:2], 300, *w[3:]],                   # node id > 255
    lambda w: [*w[:3], 0, *w[4:]],                     # incarnation 0
    lambda w: [*w[:4], True, *w[5:]],                  # bool is not an int
    lambda w: [*w[:8], "x", *w[9:]],                   # digest not bytes
    lambda w: [*w[:10], 64, *w[11:]],                  # unknown flag
    lambda w: [*w[:13], [[1, 2, 3]]],                  # short peer report
    lambda w: [*w[:13], [[1, 2, 3, 4, 5]] * 300],      # too many peers
    # peer reports: each field's type and bound (checked inline for well-formed lists)
    lambda w: [*w[:13], [[256, 1, 1, 1, 0]]],          # peer id > 255
    lambda w: [*w[:13], [[1, True, 1, 1, 0]]],         # bool incarnation
    lambda w: [*w[:13], [[1, 1, -1, 1, 0]]],           # negative age
    lambda w: [*w[:13], [[1, 1, 2**32, 1, 0]]],        # age beyond u32
    lambda w: [*w[:13], [[1, 1, 1, 2**64, 0]]],        # echo beyond u64
    lambda w: [*w[:13], [[1, 1, 1, 1, 1.0]]],          # float
    lambda w: [*w[:13], [[1, 1, 1, 1, 0, 0]]],         # long peer report
])
def test_malformed_heartbeats_raise_one_error(mutate: object) -> None:
    wire = _hb().to_wire()
    with pytest.raises(MembershipWireError):
        decode(mutate(wire))  # type: ignore[operator]


def test_peer_reports_decode_alike_from_lists_and_tuples() -> None:
    wire = _hb().to_wire()
    as_tuples = [*wire[:13], [tuple(p) for p in wire[13]]]
    assert decode(as_tuples) == decode(wire) == _hb()


def test_malformed_map_offer_raises_wire_error() -> None:
    good = MapOffer(1, TargetMap.build(epoch=1, proposer=1, owners=[1, 2],
                                       successors=[[2], [1]])).to_wire()
    bad_chain = [*good[:6], [b"\x02\x02", b"\x01"], good[7]]
    with pytest.raises(MembershipWireError, match="bad map"):
        decode(bad_chain)
    with pytest.raises(MembershipWireError):
        decode([*good[:6], [b"\x02"], good[7]])  # one chain for two buckets


def test_bitmap_round_trip_and_limits() -> None:
    assert bitmap_from_buckets([0, 7, 8, 20], 21) == bytes([0x81, 0x01, 0x10])
    assert buckets_from_bitmap(bytes([0x81, 0x01, 0x10]), 21) == {0, 7, 8, 20}
    with pytest.raises(ValueError):
        buckets_from_bitmap(bytes([0, 0, 0x20]), 21)  # bit 21 beyond B
    with pytest.raises(ValueError):
        buckets_from_bitmap(b"\x00", 21)
    with pytest.raises(ValueError):
        bitmap_from_buckets([21], 21)


def test_target_map_rank_digest_and_without() -> None:
    a = TargetMap.build(epoch=2, proposer=3, owners=[1, 2, 3, 1],
                        successors=[[2, 3], [3, 1], [1, 2], [3, 2]],
                        incarnations=[(1, 1), (2, 1), (3, 1)])
    b = TargetMap.build(epoch=2, proposer=1, owners=[1, 2, 3, 1],
                        successors=[[2, 3], [3, 1], [1, 2], [3, 2]],
                        incarnations=[(1, 1), (2, 1), (3, 1)])
    assert b.rank > a.rank  # same epoch: the lower proposer wins
    assert a.digest == b.digest  # the proposer is not content
    c = a.without({1}, proposer=2)
    assert c.epoch == 3 and list(c.owners) == [2, 2, 3, 3]
    assert c.chain(0) == (2, 3) and c.incarnation_of(1) == 0 and c.incarnation_of(2) == 1
    d = a.without({1, 2, 3}, proposer=2)
    assert list(d.owners) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        TargetMap.build(epoch=0, proposer=1, owners=[1], successors=[[]])
    with pytest.raises(ValueError):
        TargetMap.build(epoch=1, proposer=1, owners=[1], successors=[[2, 2]])


def test_target_map_from_hashing_owner_map_follows_its_successors() -> None:
    ownermap = pytest.importorskip("hashing.ownermap")
    view = ownermap.View.of([ownermap.Member(n) for n in (1, 2, 3, 4)])
    om = ownermap.assign(view, 64, None)
    tm = TargetMap.from_owner_map(om, proposer=1)
    succ = om.successors()
    assert tm.epoch == om.epoch and list(tm.owners) == list(om.owners)
    for k in range(64):
        assert tm.chain(k)[0] == om.owner(k)
        assert tm.chain(k)[1] == succ[k]
        assert len(tm.chain(k)) == 4
    # The takeover map for one dead node equals hashing's own successor map.
    after = om.successor_map(2)
    assert list(tm.without({2}, proposer=1).owners) == list(after.owners)


def test_timing_profiles() -> None:
    d = Timing.from_profile("default")
    f = Timing.from_profile("fast")
    assert (d.heartbeat, d.dead, d.fence) == pytest.approx((0.04, 0.28, 0.2))
    assert (f.heartbeat, f.dead, f.fence) == pytest.approx((0.02, 0.14, 0.1))
    for t in (d, f):
        assert t.fence < t.dead and t.stall < t.fence
    c = Timing.from_config(MembershipConfig(profile="custom", heartbeat_ms=50, miss_count=6))
    assert (c.dead, c.fence) == pytest.approx((0.3, 0.2))
    assert Timing.from_config(MembershipConfig()) == d
    with pytest.raises(ValueError, match="miss_count"):
        Timing.from_profile("custom", 50, 4)
    with pytest.raises(ValueError):
        Timing.from_profile("slow")
