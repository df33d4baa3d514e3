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


def _scratch_digest(s: BucketStore, bucket: int) -> tuple[int, int]:
    """The digest recomputed from every entry (what the incremental one must always equal)."""
    from lbsync.replication.store import entry_hash

    flows, exps = s.snapshot(bucket)
    total = sum(entry_hash(FLOW, k, r) for k, r in flows.items())
    total += sum(entry_hash(EXPECTATION, k, r) for k, r in exps.items())
    return len(flows) + len(exps), total & ((1 << 64) - 1)


_OPS = st.lists(st.tuples(st.sampled_from(["put", "delete", "digest", "purge"]),
                          st.sampled_from([FLOW, EXPECTATION]), st.integers(0, 1),
                          st.integers(0, 6), st.integers(0, 3)), max_size=80)


@given(_OPS)
def test_incremental_digest_equals_a_full_recomputation(ops: list[tuple[str, int, int, int,
                                                                        int]]) -> None:
    s = BucketStore(2)
    for op, kind, bucket, k, v in ops:
        key, rec = bytes([k]), bytes([v]) * (v + 1)
        if op == "put":
            s.put(kind, bucket, 1, key, rec)
        elif op == "delete":
            s.delete(kind, bucket, 1, key)
        elif op == "purge":
            s.purge(bucket, [(FLOW, bytes([k])), (EXPECTATION, bytes([v]))])
        else:
            assert s.digest(bucket) == _scratch_digest(s, bucket)
    for b in (0, 1):
        assert s.digest(b) == _scratch_digest(s, b)
        assert s.digest(b) == _scratch_digest(s, b)  # twice: nothing noted in between


def test_incremental_digest_notes_stay_bounded() -> None:
    s = BucketStore(1)
    for i in range(5000):  # churn far beyond the bucket's size, no digest asked meanwhile
        key = i.to_bytes(4, "big")
        s.put(FLOW, 0, 1, key, b"r")
        s.delete(FLOW, 0, 1, key)
    notes = s._changed[FLOW][0]
    assert notes is None
    s.put(FLOW, 0, 1, b"x", b"y")
    assert s.digest(0) == _scratch_digest(s, 0)


def test_a_bulk_fill_holds_no_note_per_entry_and_digests_stay_right() -> None:
    s = BucketStore(1)
    for i in range(10_000):  # a resync or a burst filling a bucket
        s.put(FLOW, 0, 1, i.to_bytes(4, "big"), b"r")
        notes = s._changed[FLOW][0]
        assert notes is None or len(notes) <= 64 + 1 + len(s.flows(0)) // 2
    assert s.digest(0) == _scratch_digest(s, 0)
    for i in range(100):  # then a little churn: incremental again
        s.put(FLOW, 0, 1, i.to_bytes(4, "big"), b"changed")
    assert s._changed[FLOW][0] is not None
    assert s.digest(0) == _scratch_digest(s, 0)


def test_digest_cost_counts_what_the_next_digest_hashes() -> None:
    s = BucketStore(1)
    assert s.digest_cost(0) == 0
    for i in range(10):
        s.put(FLOW, 0, 1, bytes([i]), b"r")
    assert s.digest_cost(0) == 20  # old and new summand of each changed entry, at most
    s.digest(0)
    assert s.digest_cost(0) == 0
    for i in range(1000):  # past the notes' bound: the next digest hashes the whole bucket
        s.put(FLOW, 0, 1, i.to_bytes(2, "big"), b"x")
    assert s.digest_cost(0) == s.count(0)
