"""Worked examples of the owner map (checked by hand, see docs/hashing.md), its canonical
encoding and digest (golden bytes), explain(), plan() and argument validation."""

from __future__ import annotations

import hashlib

import pytest

from hashing.ownermap import (
    ALGORITHM_VERSION,
    NO_OWNER,
    ZERO_HASH,
    Member,
    Move,
    OwnerMap,
    OwnerMapError,
    View,
    apportion,
    assign,
    explain,
    plan,
)

V3 = View.of([Member(1), Member(2, 2), Member(3)])


def test_worked_example_new_cluster_then_join() -> None:
    # W = 4, quotas 4, 8, 4: free buckets 0..15 fill node 1, 2, 3 in id order.
    m1 = assign(V3, 16, None)
    assert m1.owners == (1,) * 4 + (2,) * 8 + (3,) * 4
    assert (m1.epoch, m1.prev_hash, m1.version) == (1, ZERO_HASH, ALGORITHM_VERSION)
    # Node 4 joins: W = 5, floors 3, 6, 3, 3 (15), one more bucket to the largest remainder
    # (node 2: 32 mod 5 = 2). Nodes 1, 2, 3 release their highest buckets 3, 11, 15.
    m2 = assign(V3.with_member(Member(4)), 16, m1)
    assert m2.owners == (1, 1, 1, 4, 2, 2, 2, 2, 2, 2, 2, 4, 3, 3, 3, 4)
    assert m2.counts() == {1: 3, 2: 7, 3: 3, 4: 3}
    assert (m2.epoch, m2.prev_hash) == (2, m1.digest)
    # Successors: node 1 dies -> its 0, 1, 2 fill nodes 2, 3, 4 (each lacks one); node 2 dies
    # -> three-way tie on remainder and holdings, node 1 (lowest id) gets 6 of 16 ...
    assert m2.successors() == (2, 3, 4, 1, 1, 1, 1, 3, 3, 4, 4, 2, 1, 2, 4, 3)


def test_ties_favour_current_holders_then_low_ids() -> None:
    fresh = assign(View.of([Member(1), Member(2), Member(3)]), 64, None)
    assert fresh.counts() == {1: 22, 2: 21, 3: 21}          # equal remainders: lowest id
    alone = assign(View.of([Member(3)]), 64, None)
    grown = assign(View.of([Member(1), Member(2), Member(3)]), 64, alone)
    assert grown.counts() == {1: 21, 2: 21, 3: 22}          # equal remainders: the holder
    assert grown.owners == (3,) * 22 + (1,) * 21 + (2,) * 21
    assert sum(a != b for a, b in zip(alone.owners, grown.owners, strict=True)) == 42


def test_apportionment_is_largest_remainder() -> None:
    view = View.of([Member(1, 5), Member(2, 3), Member(3, 2), Member(9, 7, drained=True)])
    # 10 buckets by 5:3:2 -> exact; 11 buckets -> 5.5, 3.3, 2.2 -> 6, 3, 2
    assert apportion(view, 10) == {1: 5, 2: 3, 3: 2, 9: 0}
    assert apportion(view, 11) == {1: 6, 2: 3, 3: 2, 9: 0}
    # 7 by 1:1:1 -> 2.33 each; the tie goes to whoever holds more, then the lowest id
    flat = View.of([Member(4), Member(5), Member(6)])
    assert apportion(flat, 7) == {4: 3, 5: 2, 6: 2}
    assert apportion(flat, 7, {6: 3, 5: 2}) == {4: 2, 5: 2, 6: 3}


def test_drained_members_hold_nothing_and_all_drained_means_unowned() -> None:
    m = assign(V3, 64, None)
    drained = assign(V3.with_member(Member(2, 2, drained=True)), 64, m)
    assert drained.counts()[2] == 0 and sum(drained.counts().values()) == 64
    none = assign(View.of([Member(1, drained=True)]), 64, drained)
    assert set(none.owners) == {NO_OWNER} and none.successors() == (NO_OWNER,) * 64
    back = assign(View.of([Member(1)]), 64, none)
    assert set(back.owners) == {1}


def test_single_node_has_no_successor() -> None:
    m = assign(View.of([Member(7)]), 64, None)
    assert m.successors() == (NO_OWNER,) * 64
    assert "successor: none" in m.explain(0)


def test_golden_encoding_and_digest() -> None:
    m1 = assign(V3, 16, None)
    enc = m1.encode()
    assert enc[:4] == b"LBOM"
    assert enc.hex() == (
        "4c424f4d" "0001" "0000" "00000010" "0000000000000001" + "00" * 32 + "00000003"
        "0001" "00000001" "00" "0002" "00000002" "00" "0003" "00000001" "00"
        + "0001" * 4 + "0002" * 8 + "0003" * 4)
    assert m1.digest == hashlib.sha256(enc).digest()
    # Pinned: if this changes, the algorithm or encoding changed: bump ALGORITHM_VERSION.
    assert m1.digest.hex() == "55983be8ea1cb6415940af27084f01a7c4220377bf1066b53b67ccc0b2aa294a"
    m2 = assign(V3.with_member(Member(4)), 16, m1)
    assert m2.digest.hex() == "363b10654ee25a7f672915ea4991e7165eedad8f66a9b3c68f646736f054a0c9"


def test_decode_round_trip_and_rejects_garbage() -> None:
    m = assign(V3.with_member(Member(200, 5, drained=True)), 256, assign(V3, 256, None))
    back = OwnerMap.decode(m.encode())
    assert back == m and back.digest == m.digest and back.previous_owners is None
    assert "origin: unknown" in back.explain(0)
    enc = m.encode()
    bad = [
        b"", enc[:-1], enc + b"\0", b"XBOM" + enc[4:],
        enc[:4] + b"\x00\x02" + enc[6:],                    # unknown version
        enc[:-2] + b"\x00\x63",                             # owner 99 is no member
    ]
    for data in bad:
        with pytest.raises(OwnerMapError):
            OwnerMap.decode(data)


def test_explain_says_why() -> None:
    m1 = assign(V3, 16, None)
    m2 = assign(V3.with_member(Member(4)), 16, m1)
    text = explain(m2, 3)
    assert text.startswith("bucket 3 of 16: owner 4 in map epoch 2")
    assert "quota 16*1/5 = 3 + 1/5" in text
    assert "moved from 1" in text and "above its 3" in text
    assert "successor: node 1 if node 4 fails" in text
    assert "origin: kept" in m2.explain(0)
    gone = assign(V3.without(3), 16, m2)
    assert gone.owners[12] != 3 and "node 3 left the view" in gone.explain(12)
    drained = assign(V3.with_member(Member(3, drained=True)), 16, m1)
    assert "node 3 is drained" in drained.explain(12)
    assert "new cluster" in m1.explain(5)
    with pytest.raises(OwnerMapError):
        explain(m1, 16)


def test_plan_example_and_bound() -> None:
    m1 = assign(V3, 16, None)
    m2 = assign(V3.with_member(Member(4)), 16, m1)
    assert plan(m1, m2, 2) == ((Move(3, 1, 4), Move(11, 2, 4)), (Move(15, 3, 4),))
    assert plan(m2, m2, 4) == ()
    # A swap needs the +1 slack: each node must receive before it gives.
    a = OwnerMap(1, 4, 1, ZERO_HASH, View.of([Member(1), Member(2)]), (1, 1, 2, 2))
    b = OwnerMap(1, 4, 2, a.digest, a.view, (2, 2, 1, 1))
    batches = plan(a, b, 1)
    assert [len(x) for x in batches] == [1, 1, 1, 1]
    with pytest.raises(OwnerMapError):
        plan(a, b, 0)
    with pytest.raises(OwnerMapError):
        plan(a, m1, 1)


@pytest.mark.parametrize("make", [
    lambda: Member(0),
    lambda: Member(70000),
    lambda: Member(1, 0),
    lambda: Member(1, True),
    lambda: View.of([Member(1), Member(1, 2)]),
    lambda: assign(V3, 0, None),
    lambda: assign(V3, 32, assign(V3, 16, None)),
    lambda: OwnerMap(1, 4, 1, ZERO_HASH, V3, (1, 2, 3)),
    lambda: OwnerMap(1, 4, 1, b"short", V3, (1, 2, 3, 3)),
    lambda: OwnerMap(2, 4, 1, ZERO_HASH, V3, (1, 2, 3, 3)),
    lambda: OwnerMap(1, 4, 1, ZERO_HASH, V3, (1, 2, 3, 0)),
])
def test_invalid_arguments_raise(make: object) -> None:
    with pytest.raises(OwnerMapError):
        make()  # type: ignore[operator]


def test_views_are_sorted_and_edited_immutably() -> None:
    v = View((Member(5), Member(2), Member(9, drained=True)))
    assert v.node_ids == (2, 5, 9)
    assert [m.node_id for m in v.eligible] == [2, 5]
    assert v.with_member(Member(5, 3)).member(5).weight == 3 and v.member(5).weight == 1
    assert v.without(2).node_ids == (5, 9) and v.without(42) == v
    with pytest.raises(KeyError):
        v.member(42)


def test_recomputing_a_tied_map_moves_nothing() -> None:
    # Found by Hypothesis: 64 buckets by 1:1:4 -> quotas 10.67, 10.67, 42.67, all remainders
    # equal, 2 extra buckets. Nodes 1 and 2 (holding 32 each) take them; recomputed, node 3
    # (holding 42, its floor) must not win the tie back and move a bucket for nothing.
    two = assign(View.of([Member(1), Member(2)]), 64, None)
    view = View.of([Member(1), Member(2), Member(3, 4)])
    three = assign(view, 64, two)
    assert three.counts() == {1: 11, 2: 11, 3: 42}
    assert assign(view, 64, three).owners == three.owners


def test_hashing_imports_only_the_standard_library() -> None:
    import subprocess
    import sys
    code = ("import sys, hashing, hashing.jhash, hashing.ownermap\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
            " - {'hashing', '__main__'}))")
    cp = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                        check=True, timeout=30, cwd=__file__.rsplit("/tests/", 1)[0])
    assert cp.stdout.strip() == "[]"
