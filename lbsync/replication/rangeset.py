"""Sorted sets of integer ranges: sequence gaps, NACK ranges, gone ranges.

Modelled on aioquic's ``RangeSet``: a sorted list of disjoint, non-adjacent half-open
``range`` objects. Sequence numbers here are already unwrapped (see
:func:`lbsync.replication.wire.unwrap`), so plain integer order is correct.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator


class RangeSet:
    """A set of integers stored as sorted disjoint half-open ranges."""

    __slots__ = ("_ranges",)

    def __init__(self, ranges: Iterable[range] = ()) -> None:
        self._ranges: list[range] = []
        for r in ranges:
            self.add(r.start, r.stop)

    def add(self, start: int, stop: int | None = None) -> None:
        """Add ``[start, stop)`` (``stop`` defaults to ``start + 1``)."""
        if stop is None:
            stop = start + 1
        if stop <= start:
            return
        rs = self._ranges
        # First range whose stop >= start (it may merge), last whose start <= stop.
        i = 0
        lo, hi = 0, len(rs)
        while lo < hi:
            mid = (lo + hi) // 2
            if rs[mid].stop < start:
                lo = mid + 1
            else:
                hi = mid
        i = lo
        j = i
        while j < len(rs) and rs[j].start <= stop:
            start = min(start, rs[j].start)
            stop = max(stop, rs[j].stop)
            j += 1
        rs[i:j] = [range(start, stop)]

    def subtract(self, start: int, stop: int) -> None:
        """Remove ``[start, stop)``."""
        if stop <= start:
            return
        out: list[range] = []
        for r in self._ranges:
            if r.stop <= start or r.start >= stop:
                out.append(r)
                continue
            if r.start < start:
                out.append(range(r.start, start))
            if r.stop > stop:
                out.append(range(stop, r.stop))
        self._ranges = out

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        i = bisect_right(self._ranges, value, key=lambda r: r.start) - 1
        return i >= 0 and value < self._ranges[i].stop

    def __iter__(self) -> Iterator[range]:
        return iter(list(self._ranges))

    def __len__(self) -> int:
        return len(self._ranges)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self._ranges == other._ranges

    def __repr__(self) -> str:
        return f"RangeSet({self._ranges!r})"

    def count(self) -> int:
        """Number of integers in the set."""
        return sum(len(r) for r in self._ranges)

    def bounds(self) -> range:
        """``range(min, max + 1)``; raises ``IndexError`` when empty."""
        return range(self._ranges[0].start, self._ranges[-1].stop)
