"""The bucket function: a bit-exact twin of the kernel's jhash and of nft's ``jhash ... mod B``.

The datapath stamps every new flow's bucket into its ct mark with
``ct mark set jhash <key> mod B seed S`` (DESIGN.md section 2); the daemon must compute the same
bucket for any flow without asking the kernel. This module is that computation, nothing else.

What the kernel does (net/netfilter/nft_hash.c, include/linux/jhash.h, nft 1.0.6):

* nft loads the key fields into consecutive 32-bit registers. An address fills 4 (IPv4) or
  16 (IPv6) bytes in network byte order; a port fills 2 bytes in network byte order and the
  payload expression zeroes the rest of its register, so a port is 2 bytes + 2 zero bytes.
  ``nft --debug=netlink`` shows ``jhash(reg 2, 8, seed)`` for ``ip saddr . th sport``: the
  length handed to the kernel is the padded length in bytes (4, 8, 16 or 20 here).
* The kernel evaluates ``reciprocal_scale(jhash(regs, len, seed), B)`` (plus an offset, 0 for
  us). ``jhash`` is the byte-wise lookup3 variant, not ``jhash2``: its initial value is
  ``0xdeadbeef + len + seed`` with ``len`` in bytes, whole 12-byte blocks before the last one
  are read as native-endian 32-bit words, and the last 1..12 bytes are always assembled
  little-endian (``k[0] | k[1] << 8 | ...``) whatever the CPU.
* ``reciprocal_scale(h, B) = (h * B) >> 32`` (64-bit product).

Byte order: on little-endian CPUs every key word is read little-endian. On a big-endian CPU the
whole blocks would be read big-endian, so keys longer than 12 bytes (IPv6) hash differently;
IPv4 keys (4 or 8 bytes, tail only) would not. This twin implements the little-endian kernel
(:data:`BYTE_ORDER`); a farm must not mix CPU endianness (the daemon checks it at join).

For keys whose length is a multiple of 4, ``jhash(data)`` equals ``jhash2`` over the
little-endian words of ``data`` (the kernel's two initial values agree: ``len == words << 2``);
:func:`jhash2` is here for that cross-check and for callers that already hold words.

Pure and dependency-free (standard library only): ``hashing/`` is a specification.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import Final

__all__ = [
    "BYTE_ORDER",
    "JHASH_INITVAL",
    "bucket_of",
    "flow_key",
    "jhash",
    "jhash2",
    "nft_jhash_expr",
    "reciprocal_scale",
]

JHASH_INITVAL: Final = 0xDEADBEEF
BYTE_ORDER: Final = "little"
"""CPU byte order this twin reproduces (the order whole 12-byte blocks are read in)."""

_M: Final = 0xFFFFFFFF
_BLOCKS_LE: Final = struct.Struct("<III")

Address = str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """``__jhash_mix``: mix three 32-bit values reversibly (inputs and outputs masked)."""
    a = (a - c) & _M
    a ^= ((c << 4) | (c >> 28)) & _M
    c = (c + b) & _M
    b = (b - a) & _M
    b ^= ((a << 6) | (a >> 26)) & _M
    a = (a + c) & _M
    c = (c - b) & _M
    c ^= ((b << 8) | (b >> 24)) & _M
    b = (b + a) & _M
    a = (a - c) & _M
    a ^= ((c << 16) | (c >> 16)) & _M
    c = (c + b) & _M
    b = (b - a) & _M
    b ^= ((a << 19) | (a >> 13)) & _M
    a = (a + c) & _M
    c = (c - b) & _M
    c ^= ((b << 4) | (b >> 28)) & _M
    b = (b + a) & _M
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    """``__jhash_final``: final mixing of (a, b, c) into c; returns c."""
    c ^= b
    c = (c - ((b << 14) | (b >> 18))) & _M
    a ^= c
    a = (a - ((c << 11) | (c >> 21))) & _M
    b ^= a
    b = (b - ((a << 25) | (a >> 7))) & _M
    c ^= b
    c = (c - ((b << 16) | (b >> 16))) & _M
    a ^= c
    a = (a - ((c << 4) | (c >> 28))) & _M
    b ^= a
    b = (b - ((a << 14) | (a >> 18))) & _M
    c ^= b
    c = (c - ((b << 24) | (b >> 8))) & _M
    return c


def jhash(data: bytes, initval: int) -> int:
    """The kernel's ``jhash(key, len(data), initval)`` on a little-endian CPU.

    ``initval`` is the nft ``seed``. Returns the 32-bit hash.
    """
    if not 0 <= initval <= _M:
        raise ValueError(f"initval must be a 32-bit unsigned integer, not {initval!r}")
    length = len(data)
    a = b = c = (JHASH_INITVAL + length + initval) & _M
    off = 0
    # All blocks but the last: native-endian words (little-endian here, BYTE_ORDER).
    while length > 12:
        x, y, z = _BLOCKS_LE.unpack_from(data, off)
        a, b, c = _mix((a + x) & _M, (b + y) & _M, (c + z) & _M)
        length -= 12
        off += 12
    if length == 0:
        # Only reachable for empty input; the kernel returns the initial value unmixed.
        return c
    # Last block (1..12 bytes): always assembled little-endian, zero-padded.
    tail = data[off:] + bytes(12 - length)
    x, y, z = _BLOCKS_LE.unpack(tail)
    return _final((a + x) & _M, (b + y) & _M, (c + z) & _M)


def jhash2(words: Sequence[int], initval: int) -> int:
    """The kernel's ``jhash2(k, len(words), initval)`` over 32-bit words (values, no bytes)."""
    if not 0 <= initval <= _M:
        raise ValueError(f"initval must be a 32-bit unsigned integer, not {initval!r}")
    length = len(words)
    a = b = c = (JHASH_INITVAL + (length << 2) + initval) & _M
    i = 0
    while length > 3:
        a, b, c = _mix((a + words[i]) & _M, (b + words[i + 1]) & _M, (c + words[i + 2]) & _M)
        length -= 3
        i += 3
    if length == 0:
        return c
    if length == 3:
        c = (c + words[i + 2]) & _M
    if length >= 2:
        b = (b + words[i + 1]) & _M
    a = (a + words[i]) & _M
    return _final(a, b, c)


def reciprocal_scale(h: int, n: int) -> int:
    """The kernel's ``reciprocal_scale(h, n) = (u64)h * n >> 32``: maps a u32 into [0, n)."""
    if not 0 <= h <= _M:
        raise ValueError(f"hash must be a 32-bit unsigned integer, not {h!r}")
    if not 1 <= n <= _M:
        raise ValueError(f"n must be 1..2**32-1, not {n!r}")
    return (h * n) >> 32


def _packed(addr: Address) -> bytes:
    if isinstance(addr, bytes):
        if len(addr) not in (4, 16):
            raise ValueError(f"a packed address has 4 or 16 bytes, not {len(addr)}")
        return addr
    if isinstance(addr, str):
        return ipaddress.ip_address(addr).packed
    if isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return addr.packed
    raise TypeError(f"address must be str, bytes or an ipaddress address, not {type(addr)!r}")


def flow_key(addr: Address, port: int | None) -> bytes:
    """The bytes nft hashes for the outside endpoint ``addr`` (and ``port``).

    Address in network byte order (4 or 16 bytes); for TCP/UDP the port, 2 bytes in network
    byte order plus 2 zero bytes (its register's padding); ``port=None`` is the address-only
    key of other protocols.
    """
    key = _packed(addr)
    if port is None:
        return key
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be 0..65535 or None, not {port!r}")
    return key + port.to_bytes(2, "big") + b"\x00\x00"


def bucket_of(addr: Address, port: int | None, *, buckets: int, seed: int) -> int:
    """The bucket the kernel stamps for a flow whose outside endpoint is ``addr:port``.

    Equals ``jhash ip saddr . th sport mod buckets seed seed`` on the outside interface and
    ``jhash ip daddr . th dport ...`` on the inside interface (``ip6`` likewise); with
    ``port=None``, the address-only key used for protocols other than TCP and UDP.
    """
    if not 1 <= buckets <= _M:
        raise ValueError(f"buckets must be 1..2**32-1, not {buckets!r}")
    if not 0 <= seed <= _M:
        raise ValueError(f"seed must be a 32-bit unsigned integer, not {seed!r}")
    return (jhash(flow_key(addr, port), seed) * buckets) >> 32


_FAMILY_KEYWORD: Final = {4: "ip", 6: "ip6"}


def nft_jhash_expr(family: int, side: str, l4: bool, buckets: int, seed: int) -> str:
    """The nft expression whose value :func:`bucket_of` reproduces.

    ``family`` 4 or 6; ``side`` ``"outside"`` (the outside endpoint is the packet's source) or
    ``"inside"`` (it is the destination); ``l4`` adds the TCP/UDP port (``th``), otherwise the
    key is the address alone. Example: ``jhash ip saddr . th sport mod 64 seed 0x1234``.
    """
    if family not in _FAMILY_KEYWORD:
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    if side not in ("outside", "inside"):
        raise ValueError(f"side must be 'outside' or 'inside', not {side!r}")
    if not 1 <= buckets <= _M:
        raise ValueError(f"buckets must be 1..2**32-1, not {buckets!r}")
    if not 0 <= seed <= _M:
        raise ValueError(f"seed must be a 32-bit unsigned integer, not {seed!r}")
    d = "s" if side == "outside" else "d"
    key = f"{_FAMILY_KEYWORD[family]} {d}addr"
    if l4:
        key += f" . th {d}port"
    return f"jhash {key} mod {buckets} seed 0x{seed:x}"

