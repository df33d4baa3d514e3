"""The owner's batched write path (``ReplicationEndpoint.write_flows`` / ``Sender.write``)
against one ``update_flow``/``delete_flow`` call per record: the same datagrams byte for
byte, the same store, the same counters, the same error at the same record."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbsync.replication.auth import KeyRing
from lbsync.replication.endpoint import ReplicationEndpoint
from lbsync.replication.params import ProtocolParams
from lbsync.replication.store import FLOW, BucketStore
from lbsync.replication.wire import LocalProtocolError

KR = KeyRing({1: b"k" * 32}, 1)
P = ProtocolParams(buckets=8, max_datagram=400)
Change = tuple[int, bytes, "bytes | None"]


def owner(max_entries: int) -> ReplicationEndpoint:
    e = ReplicationEndpoint(node_id=1, incarnation=1, keyring=KR, params=P, now=0.0,
                            rng=random.Random(1),
                            store=BucketStore(P.buckets, max_entries=max_entries))
    for b in range(6):  # buckets 6 and 7 are not owned
        e.claim(b, 3, 0.0, announce=False)
    e.store.raise_epoch(5, 4)  # bucket 5: a newer owner exists, our writes are stale
    return e


def one_by_one(e: ReplicationEndpoint, changes: list[Change], now: float) -> None:
    for bucket, key, record in changes:
        if record is None:
            e.delete_flow(bucket, key, now)
        else:
            e.update_flow(bucket, key, record, now)


def state(e: ReplicationEndpoint) -> tuple[object, ...]:
    s = e.statistics()
    return (e.datagrams_to_send(), s.sender, s.store,
            [e.store.snapshot(b) for b in range(P.buckets)],
            [e.store.digest(b) for b in range(P.buckets)], e.get_timer())


changes_st = st.lists(st.tuples(
    st.integers(0, 5),
    st.sampled_from([b"a", b"bb", b"c" * 40, b"d" * 7]),
    st.one_of(st.none(), st.binary(min_size=0, max_size=120))), max_size=60)


@settings(max_examples=300, deadline=None)
@given(slices=st.lists(changes_st, max_size=5), max_entries=st.integers(0, 12))
def test_write_flows_equals_one_call_per_record(slices: list[list[Change]],
                                                max_entries: int) -> None:
    a, b = owner(max_entries), owner(max_entries)
    now = 1.0
    for changes in slices:
        sent = a.sender.records_sent
        one_by_one(a, changes, now)
        assert b.write_flows(changes, now) == a.sender.records_sent - sent
        now += 0.001
    assert state(a) == state(b)
    a.flush(now)
    b.flush(now)
    assert state(a) == state(b)


@pytest.mark.parametrize("bad", [(7, b"k", b"r"), (0, b"", b"r"), (0, b"k" * 256, b"r"),
                                 (0, b"k", b"r" * 400), (7, b"k", None)])
def test_write_flows_raises_at_the_same_record(bad: Change) -> None:
    before: list[Change] = [(0, b"x", b"1"), (1, b"y", b"2"), (0, b"x", None)]
    a, b = owner(100), owner(100)
    with pytest.raises(LocalProtocolError) as ea:
        one_by_one(a, [*before, bad, (2, b"z", b"3")], 1.0)
    with pytest.raises(LocalProtocolError) as eb:
        b.write_flows([*before, bad, (2, b"z", b"3")], 1.0)
    assert str(ea.value) == str(eb.value)
    assert state(a) == state(b)  # the changes before the bad one are written and queued
    assert a.store.get(FLOW, 1, b"y") == b"2"
