"""RangeSet against a plain set model."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from lbsync.replication.rangeset import RangeSet

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 200), st.integers(0, 30)), max_size=60)


@given(ops)
def test_rangeset_matches_set_model(operations: list[tuple[bool, int, int]]) -> None:
    rs = RangeSet()
    model: set[int] = set()
    for add, start, length in operations:
        if add:
            rs.add(start, start + length)
            model |= set(range(start, start + length))
        else:
            rs.subtract(start, start + length)
            model -= set(range(start, start + length))
    assert rs.count() == len(model)
    assert all(v in rs for v in model)
    assert not any(v in rs for v in range(-5, 240) if v not in model)
    ranges = list(rs)
    assert all(a.stop < b.start for a, b in itertools.pairwise(ranges))
    if model:
        assert rs.bounds() == range(min(model), max(model) + 1)
