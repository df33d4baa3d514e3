"""The repair code (``fec.py``): GF(256) arithmetic and the Cauchy erasure code."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbsync.replication import fec


def test_field_arithmetic() -> None:
    for a in range(1, 256):
        assert fec.gf_mul(a, fec.gf_inv(a)) == 1
        assert fec.gf_mul(a, 1) == a and fec.gf_mul(a, 0) == 0
    assert fec.gf_mul(2, 0x80) == 0x1D  # x * x^7 = x^8 = x^4 + x^3 + x^2 + 1 (mod 0x11d)
    with pytest.raises(ZeroDivisionError):
        fec.gf_inv(0)


def test_every_square_submatrix_is_invertible_for_small_blocks() -> None:
    """The MDS property the protocol relies on, checked by decoding: any m parity rows rebuild
    any m missing columns (exhaustive over columns for m <= 2, sampled rows)."""
    rng = random.Random(7)
    data = [rng.randbytes(rng.randint(30, 80)) for _ in range(fec.BLOCK)]
    for a in range(fec.BLOCK):
        for b in range(a + 1, fec.BLOCK):
            rows = rng.sample(range(fec.MAX_ROWS), 2)
            parities = [(r, fec.BLOCK, fec.encode(r, data)) for r in rows]
            known = {i: d for i, d in enumerate(data) if i not in (a, b)}
            assert fec.solve(known, [a, b], parities) == {a: data[a], b: data[b]}


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_m_parities_rebuild_any_m_missing(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, fec.BLOCK))
    datagrams = [data.draw(st.binary(min_size=1, max_size=300)) for _ in range(n)]
    missing = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    rows = data.draw(st.lists(st.integers(0, fec.MAX_ROWS - 1), min_size=len(missing),
                              max_size=len(missing), unique=True))
    parities = [(r, n, fec.encode(r, datagrams)) for r in rows]
    known = {i: d for i, d in enumerate(datagrams) if i not in missing}
    out = fec.solve(known, missing, parities)
    assert out == {i: datagrams[i] for i in missing}


def test_too_few_parities_or_an_unknown_column_give_none() -> None:
    data = [bytes([i]) * 50 for i in range(5)]
    p0 = (0, 5, fec.encode(0, data))
    assert fec.solve({i: data[i] for i in range(2, 5)}, [0, 1], [p0]) is None
    # Column 4 neither known nor sought: it cannot be subtracted out.
    assert fec.solve({i: data[i] for i in range(1, 4)}, [0], [p0]) is None


def test_parities_of_different_column_counts_mix() -> None:
    """A block still filling: an early parity covers fewer columns than a later one."""
    rng = random.Random(3)
    data = [rng.randbytes(100) for _ in range(fec.BLOCK)]
    early = (5, 6, fec.encode(5, data[:6]))
    late = (9, fec.BLOCK, fec.encode(9, data))
    known = {i: d for i, d in enumerate(data) if i not in (2, 12)}
    assert fec.solve(known, [2, 12], [early, late]) == {2: data[2], 12: data[12]}


def test_rebuilt_length_is_checked() -> None:
    data = [b"a" * 10, b"b" * 20]
    p = bytearray(fec.encode(0, data))
    p[0] ^= 0xFF  # the coded length of the missing one now exceeds the payload
    assert fec.solve({1: data[1]}, [0], [(0, 2, bytes(p))]) is None
