"""Erasure coding of repair datagrams: a Cauchy code over GF(2^8), byte-wise.

A repair block is ``K`` consecutive data sequence numbers (aligned: block ``b`` holds
``b*K + 1 .. b*K + K``). A *parity* of a block is, for a row ``r``, the byte-wise GF(2^8) sum
over the block's columns ``i`` (``seq - first``) of ``coef(r, i) * payload_i``, where
``payload_i`` is the whole signed DATA datagram with a 2-byte big-endian length in front,
zero-padded to the longest of the block. ``coef(r, i) = 1 / ((K + r) xor i)``: a Cauchy
matrix, every square submatrix of which is invertible, so any ``m`` parities (distinct rows,
same column count) rebuild any ``m`` missing datagrams of the block, whoever misses which.
That is what lets one repair datagram serve receivers that lost different datagrams.

Rules:
- Pure and deterministic: bytes in, bytes out. Multiplication by a constant is a 256-byte
  ``bytes.translate`` table, addition is XOR of big integers: no per-byte Python loop.
- :func:`solve` runs Gaussian elimination on whatever equations it is given (parities of
  different column counts mix, a parity simply has no term for the columns it does not
  cover); it returns ``None`` when they do not determine every unknown.
- A rebuilt datagram is only a candidate: the caller authenticates it like any datagram.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

BLOCK = 16  # data sequence numbers per repair block
MAX_ROWS = 256 - BLOCK  # distinct parity rows per block

_EXP = [0] * 512
_LOG = [0] * 256
_x = 1
for _i in range(255):
    _EXP[_i] = _x
    _LOG[_x] = _i
    _x <<= 1
    if _x & 0x100:
        _x ^= 0x11D
for _i in range(255, 512):
    _EXP[_i] = _EXP[_i - 255]
del _x, _i

_TABLES: dict[int, bytes] = {}


def gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(256)")
    return _EXP[255 - _LOG[a]]


def _table(c: int) -> bytes:
    t = _TABLES.get(c)
    if t is None:
        t = bytes(gf_mul(c, x) for x in range(256))
        _TABLES[c] = t
    return t


def coef(row: int, column: int) -> int:
    """The Cauchy coefficient of ``column`` (0..BLOCK-1) in parity ``row`` (0..MAX_ROWS-1)."""
    return gf_inv((BLOCK + row) ^ column)


def _scale(c: int, data: bytes) -> int:
    """``c * data`` as a big integer (for XOR accumulation)."""
    if c == 1:
        return int.from_bytes(data, "big")
    return int.from_bytes(data.translate(_table(c)), "big")


def frame(datagram: bytes) -> bytes:
    """The coded form of one datagram: its length, then its bytes."""
    return len(datagram).to_bytes(2, "big") + datagram


def encode(row: int, datagrams: Sequence[bytes]) -> bytes:
    """Parity ``row`` over ``datagrams`` (columns 0..len-1 of a block)."""
    framed = [frame(d) for d in datagrams]
    size = max(len(f) for f in framed)
    acc = 0
    for i, f in enumerate(framed):
        acc ^= _scale(coef(row, i), f.ljust(size, b"\0"))
    return acc.to_bytes(size, "big")


def solve(known: Mapping[int, bytes], unknown: Sequence[int],
          parities: Sequence[tuple[int, int, bytes]]) -> dict[int, bytes] | None:
    """Rebuild the ``unknown`` columns from ``parities`` ((row, column count, payload)) and the
    ``known`` columns' datagrams; ``None`` if the equations do not determine them all. The
    result maps column -> datagram candidate (length-checked, not authenticated)."""
    if not unknown or len(parities) < len(unknown):
        return None
    size = max(len(p) for _r, _c, p in parities)
    index = {col: k for k, col in enumerate(unknown)}
    rows: list[tuple[list[int], int]] = []
    for row, count, payload in parities:
        acc = int.from_bytes(payload.ljust(size, b"\0"), "big")
        coefs = [0] * len(unknown)
        for col in range(count):
            k = index.get(col)
            c = coef(row, col)
            if k is not None:
                coefs[k] = c
                continue
            d = known.get(col)
            if d is None:
                return None  # a column neither known nor sought: cannot subtract it
            f = frame(d)
            if len(f) > size:
                return None
            acc ^= _scale(c, f.ljust(size, b"\0"))
        rows.append((coefs, acc))
    n = len(unknown)
    # Gaussian elimination over GF(256) on (coefficients | payload as an integer).
    for col in range(n):
        pivot = next((j for j in range(col, len(rows)) if rows[j][0][col]), None)
        if pivot is None:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        pc, pv = rows[col]
        inv = gf_inv(pc[col])
        if inv != 1:
            pc = [gf_mul(inv, c) for c in pc]
            pv = _scale(inv, pv.to_bytes(size, "big"))
            rows[col] = (pc, pv)
        pv_bytes = pv.to_bytes(size, "big")
        for j in range(len(rows)):
            if j == col:
                continue
            rc, rv = rows[j]
            factor = rc[col]
            if factor:
                rows[j] = ([c ^ gf_mul(factor, p) for c, p in zip(rc, pc, strict=True)],
                           rv ^ _scale(factor, pv_bytes))
    out: dict[int, bytes] = {}
    for k, col in enumerate(unknown):
        data = rows[k][1].to_bytes(size, "big")
        length = int.from_bytes(data[:2], "big")
        if length > size - 2:
            return None
        out[col] = data[2:2 + length]
    return out
