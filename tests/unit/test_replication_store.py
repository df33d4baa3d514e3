"""The per-bucket store: owner_epoch rule, bound with counted refusals, digests."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lbsync.replication.store import EXPECTATION, FLOW, BucketStore, Outcome


def test_owner_epoch_rule() -> None:
    s = BucketStore(4)
    assert s.put(FLOW, 1, 5, b"k", b"new owner") is Outcome.APPLIED
    assert s.put(FLOW, 1, 4, b"k", b"old owner late") is Outcome.STALE
    assert s.delete(FLOW, 1, 4, b"k") is Outcome.STALE
    assert s.get(FLOW, 1, b"k") == b"new owner"
    assert s.put(FLOW, 1, 6, b"k", b"newer") is Outcome.APPLIED and s.epoch(1) == 6
    assert s.raise_epoch(1, 5) is Outcome.STALE
    assert s.epoch(2) == 0 and s.statistics().stale == 3


def test_bound_refuses_and_counts_but_allows_replace_and_delete() -> None:
    s = BucketStore(2, max_entries=2)
    assert s.put(FLOW, 0, 1, b"a", b"1") is Outcome.APPLIED
    assert s.put(EXPECTATION, 1, 1, b"b", b"1") is Outcome.APPLIED
    assert s.put(FLOW, 0, 1, b"c", b"1") is Outcome.FULL
    assert s.put(FLOW, 0, 1, b"a", b"2") is Outcome.APPLIED
    assert s.statistics().refused_full == 1 and len(s) == 2
    assert s.delete(FLOW, 0, 1, b"a") is Outcome.APPLIED
    assert s.put(FLOW, 0, 1, b"c", b"1") is Outcome.APPLIED


def test_purge_keeps_only_touched() -> None:
    s = BucketStore(1)
    for k in (b"a", b"b", b"c"):
        s.put(FLOW, 0, 1, k, b"r")
    s.put(EXPECTATION, 0, 1, b"a", b"e")
    assert s.purge(0, [(FLOW, b"b"), (EXPECTATION, b"a")]) == 2
    assert s.snapshot(0) == ({b"b": b"r"}, {b"a": b"e"}) and len(s) == 2


entries = st.dictionaries(
    st.tuples(st.sampled_from([FLOW, EXPECTATION]), st.binary(min_size=1, max_size=8)),
    st.binary(max_size=16), max_size=30)


@given(entries, st.randoms(use_true_random=False))
def test_digest_is_order_independent_and_content_sensitive(
        content: dict[tuple[int, bytes], bytes], rnd: object) -> None:
    a, b = BucketStore(1), BucketStore(1)
    items = list(content.items())
    for (kind, key), rec in items:
        a.put(kind, 0, 1, key, rec)
    rnd.shuffle(items)  # type: ignore[attr-defined]
    for (kind, key), rec in items:
        b.put(kind, 0, 1, b"junk" + key, b"x")  # written, then fixed: history must not matter
        b.put(kind, 0, 1, key, rec)
        b.delete(kind, 0, 1, b"junk" + key)
    assert a.digest(0) == b.digest(0)
    if items:
        (kind, key), rec = items[0]
        b.put(kind, 0, 1, key, rec + b"!")
        assert a.digest(0) != b.digest(0)
        b.put(kind, 0, 1, key, rec)
        assert a.digest(0) == b.digest(0)
        b.delete(kind, 0, 1, key)
        assert a.digest(0) != b.digest(0)
