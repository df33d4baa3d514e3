"""Per-bucket replica store: the protocol's model of every bucket's state, on every node.

One :class:`BucketStore` per node holds, per bucket, ``key -> packed record`` for flows and for
expectations, plus the bucket's current ``owner_epoch``. The owner writes its own buckets through
the replication endpoint (so that what it sends and what it stores are one), receivers write
replicated records into it, resync answers and digests are read from it. The daemon can use it
directly as its standby store.

Rules:
- owner_epoch rule: a write (update, delete, resync marker) for bucket ``b`` with epoch ``e`` is
  applied only if ``e >= epoch(b)``; applying it raises ``epoch(b)`` to ``e``. A late
  retransmission from a former owner therefore never overwrites the new owner's state.
- Bounded: at most ``max_entries`` entries in all; an insert beyond is refused and counted
  (``refused_full``), never silently lost. Replacing or deleting is always possible.
- Digest of a bucket: (count, sum mod 2**64 of BLAKE2b-64 over kind, key and record of every
  entry): order independent, kept incrementally. A write only notes the entry's previous record
  (first write since the last digest); the next ``digest()`` of the bucket hashes just the
  entries noted, subtracting their old summands and adding their new ones, so a digest costs
  the bucket's changes since the last one, not its size (recomputing whole changed buckets
  every second was ~4 hashes per replicated flow on every node at 20k flows/s, in bursts that
  stalled the loop), and a flow created and deleted between two digests costs no hash at all.
  Notes are bounded per bucket by half its size plus 64: past that, hashing the whole bucket
  costs at most twice as much, so it is recomputed from scratch (a bulk resync or a burst into a
  bucket costs no more than before and holds no note per entry).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType

from lbsync.accel import CTFAST

_U64 = (1 << 64) - 1
# a bucket's notes beyond _NOTES_SLACK + half its size: recompute it from scratch
_NOTES_SLACK = 64
FLOW = 0
EXPECTATION = 1


class Outcome(IntEnum):
    """Result of a store write."""

    APPLIED = 0
    STALE = 1  # owner_epoch below the bucket's current one
    FULL = 2  # insert refused: store at its bound


_APPLIED, _STALE, _FULL = Outcome.APPLIED, Outcome.STALE, Outcome.FULL


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """Snapshot of a :class:`BucketStore`."""

    entries: int
    max_entries: int
    refused_full: int
    stale: int
    applied: int


_KIND_KEYLEN = struct.Struct(">BH").pack
_blake2b = hashlib.blake2b


def entry_hash(kind: int, key: bytes, record: bytes) -> int:
    """BLAKE2b-64 of one entry (the digest's summand): kind, key length (u16), key, record."""
    return int.from_bytes(_blake2b(_KIND_KEYLEN(kind, len(key)) + key + record,
                                   digest_size=8).digest(), "big")


def _py_table_sum(kind: int, table: Mapping[bytes, bytes]) -> int:
    total = 0
    for key, record in table.items():
        total += entry_hash(kind, key, record)
    return total


def _py_delta(kind: int, changed: Mapping[bytes, bytes | None],
              table: Mapping[bytes, bytes]) -> int:
    """The digest's change: new summands minus old ones of the entries noted since."""
    total = 0
    for key, old in changed.items():
        new = table.get(key)
        if new == old:
            continue
        if old is not None:
            total -= entry_hash(kind, key, old)
        if new is not None:
            total += entry_hash(kind, key, new)
    return total


# The C accelerator (lbsync/_ctfast.c, docs/kernel.md) computes the same sums (BLAKE2b from
# libb2): one call per bucket instead of ~0.7 us of interpreter per entry hash,
# a digest callback's hashing was most of the 20k/s p99 lag. None: Python does it.
_c_table_sum: Callable[[int, Mapping[bytes, bytes]], int | None] | None = (
    None if CTFAST is None else CTFAST.digest_sum)
_c_delta: Callable[[int, Mapping[bytes, bytes | None], Mapping[bytes, bytes]],
                   int | None] | None = None if CTFAST is None else CTFAST.digest_delta


def _table_sum(kind: int, table: dict[bytes, bytes]) -> int:
    """Sum of the entry hashes of a table (not reduced mod 2**64)."""
    if _c_table_sum is not None:
        total = _c_table_sum(kind, table)
        if total is not None:
            return total
    return _py_table_sum(kind, table)


def _delta(kind: int, changed: dict[bytes, bytes | None], table: dict[bytes, bytes]) -> int:
    if _c_delta is not None:
        total = _c_delta(kind, changed, table)
        if total is not None:
            return total
    return _py_delta(kind, changed, table)


class BucketStore:
    """Records by bucket and key, with owner epochs, a bound and digests."""

    def __init__(self, buckets: int, *, max_entries: int = 2_000_000) -> None:
        self.buckets = buckets
        self.max_entries = max_entries
        self._tables: tuple[list[dict[bytes, bytes]], list[dict[bytes, bytes]]] = (
            [{} for _ in range(buckets)], [{} for _ in range(buckets)])
        self._epochs = [0] * buckets
        # per bucket: the digest sum as of the last digest(), and per kind the records changed
        # since then (key -> its record at that time, None if absent); None: recompute
        self._sums = [0] * buckets
        self._changed: tuple[list[dict[bytes, bytes | None] | None], ...] = (
            [{} for _ in range(buckets)], [{} for _ in range(buckets)])
        self._entries = 0
        self.refused_full = 0
        self.stale = 0
        self.applied = 0

    # -- reads -------------------------------------------------------------------------------

    def epoch(self, bucket: int) -> int:
        return self._epochs[bucket]

    def flows(self, bucket: int) -> Mapping[bytes, bytes]:
        return MappingProxyType(self._tables[FLOW][bucket])

    def expectations(self, bucket: int) -> Mapping[bytes, bytes]:
        return MappingProxyType(self._tables[EXPECTATION][bucket])

    def get(self, kind: int, bucket: int, key: bytes) -> bytes | None:
        return self._tables[kind][bucket].get(key)

    def keys(self, bucket: int) -> list[tuple[int, bytes]]:
        """Snapshot of a bucket's (kind, key) pairs."""
        return ([(FLOW, k) for k in self._tables[FLOW][bucket]]
                + [(EXPECTATION, k) for k in self._tables[EXPECTATION][bucket]])

    def count(self, bucket: int) -> int:
        return len(self._tables[FLOW][bucket]) + len(self._tables[EXPECTATION][bucket])

    def __len__(self) -> int:
        return self._entries

    def digest(self, bucket: int) -> tuple[int, int]:
        """(count, digest) of a bucket."""
        changes = [self._changed[FLOW][bucket], self._changed[EXPECTATION][bucket]]
        if changes[FLOW] is None or changes[EXPECTATION] is None:
            total = 0
            for kind in (FLOW, EXPECTATION):
                total += _table_sum(kind, self._tables[kind][bucket])
        else:
            total = self._sums[bucket]
            for kind in (FLOW, EXPECTATION):
                changed = changes[kind]
                if changed:
                    total += _delta(kind, changed, self._tables[kind][bucket])
        self._sums[bucket] = total & _U64
        self._changed[FLOW][bucket] = {}
        self._changed[EXPECTATION][bucket] = {}
        return (self.count(bucket), self._sums[bucket])

    def digest_cost(self, bucket: int) -> int:
        """About how many entries the next ``digest(bucket)`` hashes (the changed ones twice:
        old and new summands; the whole bucket when it is recomputed from scratch)."""
        flows, exps = self._changed[FLOW][bucket], self._changed[EXPECTATION][bucket]
        if flows is None or exps is None:
            return self.count(bucket)
        return 2 * (len(flows) + len(exps))

    def snapshot(self, bucket: int) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
        """Copies of a bucket's flows and expectations (tests, status)."""
        return dict(self._tables[FLOW][bucket]), dict(self._tables[EXPECTATION][bucket])

    # -- writes ------------------------------------------------------------------------------

    def raise_epoch(self, bucket: int, owner_epoch: int) -> Outcome:
        """Apply the epoch rule for a marker without a record (resync begin, digest...)."""
        cur = self._epochs[bucket]
        if owner_epoch < cur:
            self.stale += 1
            return Outcome.STALE
        self._epochs[bucket] = owner_epoch
        return Outcome.APPLIED

    def put(self, kind: int, bucket: int, owner_epoch: int, key: bytes,
            record: bytes) -> Outcome:
        # once per replicated record on every node: locals, one module-level outcome constant
        epochs = self._epochs
        if owner_epoch < epochs[bucket]:
            self.stale += 1
            return _STALE
        epochs[bucket] = owner_epoch
        table = self._tables[kind][bucket]
        old = table.get(key)
        if old is None:
            if self._entries >= self.max_entries:
                self.refused_full += 1
                return _FULL
            self._entries += 1
        table[key] = record
        changed = self._changed[kind][bucket]
        if changed is not None and key not in changed:
            changed[key] = old
            if len(changed) > _NOTES_SLACK + (len(table) >> 1):
                self._changed[kind][bucket] = None
        self.applied += 1
        return _APPLIED

    def delete(self, kind: int, bucket: int, owner_epoch: int, key: bytes) -> Outcome:
        epochs = self._epochs
        if owner_epoch < epochs[bucket]:
            self.stale += 1
            return _STALE
        epochs[bucket] = owner_epoch
        table = self._tables[kind][bucket]
        old = table.pop(key, None)
        if old is not None:
            self._entries -= 1
            changed = self._changed[kind][bucket]
            if changed is not None and key not in changed:
                changed[key] = old
                if len(changed) > _NOTES_SLACK + (len(table) >> 1):
                    self._changed[kind][bucket] = None
        self.applied += 1
        return _APPLIED

    def purge(self, bucket: int, keep: Iterable[tuple[int, bytes]]) -> int:
        """Drop every entry of ``bucket`` not in ``keep``; the number dropped."""
        keep_set = set(keep)
        dropped = 0
        for kind in (FLOW, EXPECTATION):
            table = self._tables[kind][bucket]
            for key in [k for k in table if (kind, k) not in keep_set]:
                del table[key]
                dropped += 1
        if dropped:
            self._entries -= dropped
            self._changed[FLOW][bucket] = self._changed[EXPECTATION][bucket] = None
        return dropped

    def clear_bucket(self, bucket: int) -> int:
        """Drop a whole bucket (e.g. a test hook corrupting the store); the number dropped."""
        return self.purge(bucket, ())

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(self._entries, self.max_entries, self.refused_full, self.stale,
                               self.applied)
