"""Golden vectors for the bucket function, observed in the real kernel, and its invariants.

GOLDEN rows are ``(outside address, port or None, buckets, seed, ct mark)`` printed by
``python -m tests.kernel.test_jhash_kernel`` (root): the marks the kernel 6.18 stamped with
``ct mark set jhash ... mod buckets seed seed`` (nft 1.0.6) on real UDP, TCP and ICMP/ICMPv6
flows, for both outside and inside key forms. With ``buckets = 2**32 - 1`` the mark is
``jhash - 1`` (``reciprocal_scale(h, 2**32 - 1) = h - 1`` for h > 0): full 32-bit hashes.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hashing.jhash import (
    JHASH_INITVAL,
    bucket_of,
    flow_key,
    jhash,
    jhash2,
    nft_jhash_expr,
    reciprocal_scale,
)

GOLDEN: tuple[tuple[str, int | None, int, int, int], ...] = (
    ('198.18.128.1', 1024, 0x7, 0x00000000, 6),  # udp outside
    ('198.18.128.1', 1025, 0x7, 0x00000000, 6),  # tcp outside
    ('198.18.0.2', 20000, 0x7, 0x00000000, 5),  # udp inside
    ('198.18.128.1', None, 0x7, 0x00000000, 3),  # icmp outside
    ('198.18.128.4', 3135, 0x7, 0x00000000, 1),  # udp outside
    ('198.18.128.4', 3136, 0x7, 0x00000000, 2),  # tcp outside
    ('198.18.0.2', 20001, 0x7, 0x00000000, 4),  # udp inside
    ('198.18.128.4', None, 0x7, 0x00000000, 0),  # icmp outside
    ('198.18.129.1', 1061, 0x40, 0x00001234, 19),  # udp outside
    ('198.18.129.1', 1062, 0x40, 0x00001234, 27),  # tcp outside
    ('198.18.0.2', 21000, 0x40, 0x00001234, 39),  # udp inside
    ('198.18.129.1', None, 0x40, 0x00001234, 0),  # icmp outside
    ('198.18.129.4', 3172, 0x40, 0x00001234, 50),  # udp outside
    ('198.18.129.4', 3173, 0x40, 0x00001234, 10),  # tcp outside
    ('198.18.0.2', 21001, 0x40, 0x00001234, 58),  # udp inside
    ('198.18.129.4', None, 0x40, 0x00001234, 17),  # icmp outside
    ('198.18.130.1', 1098, 0x100, 0x6c627379, 132),  # udp outside
    ('198.18.130.1', 1099, 0x100, 0x6c627379, 95),  # tcp outside
    ('198.18.0.2', 22000, 0x100, 0x6c627379, 223),  # udp inside
    ('198.18.130.1', None, 0x100, 0x6c627379, 58),  # icmp outside
    ('198.18.130.4', 3209, 0x100, 0x6c627379, 114),  # udp outside
    ('198.18.130.4', 3210, 0x100, 0x6c627379, 55),  # tcp outside
    ('198.18.0.2', 22001, 0x100, 0x6c627379, 134),  # udp inside
    ('198.18.130.4', None, 0x100, 0x6c627379, 169),  # icmp outside
    ('198.18.131.1', 1135, 0x400, 0xdeadbeef, 49),  # udp outside
    ('198.18.131.1', 1136, 0x400, 0xdeadbeef, 1019),  # tcp outside
    ('198.18.0.2', 23000, 0x400, 0xdeadbeef, 743),  # udp inside
    ('198.18.131.1', None, 0x400, 0xdeadbeef, 944),  # icmp outside
    ('198.18.131.4', 3246, 0x400, 0xdeadbeef, 966),  # udp outside
    ('198.18.131.4', 3247, 0x400, 0xdeadbeef, 141),  # tcp outside
    ('198.18.0.2', 23001, 0x400, 0xdeadbeef, 531),  # udp inside
    ('198.18.131.4', None, 0x400, 0xdeadbeef, 184),  # icmp outside
    ('198.18.132.1', 1172, 0x1000, 0xffffffff, 3358),  # udp outside
    ('198.18.132.1', 1173, 0x1000, 0xffffffff, 3424),  # tcp outside
    ('198.18.0.2', 24000, 0x1000, 0xffffffff, 28),  # udp inside
    ('198.18.132.1', None, 0x1000, 0xffffffff, 1006),  # icmp outside
    ('198.18.132.4', 3283, 0x1000, 0xffffffff, 3440),  # udp outside
    ('198.18.132.4', 3284, 0x1000, 0xffffffff, 1832),  # tcp outside
    ('198.18.0.2', 24001, 0x1000, 0xffffffff, 3085),  # udp inside
    ('198.18.132.4', None, 0x1000, 0xffffffff, 3629),  # icmp outside
    ('198.18.133.1', 1209, 0xffffffff, 0x9e3779b9, 3382785005),  # udp outside
    ('198.18.133.1', 1210, 0xffffffff, 0x9e3779b9, 1550843143),  # tcp outside
    ('198.18.0.2', 25000, 0xffffffff, 0x9e3779b9, 3207909632),  # udp inside
    ('198.18.133.1', None, 0xffffffff, 0x9e3779b9, 3937419783),  # icmp outside
    ('198.18.133.4', 3320, 0xffffffff, 0x9e3779b9, 3542134715),  # udp outside
    ('198.18.133.4', 3321, 0xffffffff, 0x9e3779b9, 1378930257),  # tcp outside
    ('198.18.0.2', 25001, 0xffffffff, 0x9e3779b9, 3879939343),  # udp inside
    ('198.18.133.4', None, 0xffffffff, 0x9e3779b9, 3541616159),  # icmp outside
    ('2001:db8:1::1', 1024, 0x7, 0x00000000, 0),  # udp outside
    ('2001:db8:1::1', 1025, 0x7, 0x00000000, 1),  # tcp outside
    ('2001:db8:0:1::2', 20000, 0x7, 0x00000000, 3),  # udp inside
    ('2001:db8:1::1', None, 0x7, 0x00000000, 4),  # icmp outside
    ('2001:db8:1::1:2', 3135, 0x7, 0x00000000, 3),  # udp outside
    ('2001:db8:1::1:2', 3136, 0x7, 0x00000000, 1),  # tcp outside
    ('2001:db8:0:1::2', 20001, 0x7, 0x00000000, 1),  # udp inside
    ('2001:db8:1::1:2', None, 0x7, 0x00000000, 6),  # icmp outside
    ('2001:db8:1::100:0:1', 1061, 0x40, 0x00001234, 46),  # udp outside
    ('2001:db8:1::100:0:1', 1062, 0x40, 0x00001234, 44),  # tcp outside
    ('2001:db8:0:1::2', 21000, 0x40, 0x00001234, 16),  # udp inside
    ('2001:db8:1::100:0:1', None, 0x40, 0x00001234, 42),  # icmp outside
    ('2001:db8:1::100:1:2', 3172, 0x40, 0x00001234, 37),  # udp outside
    ('2001:db8:1::100:1:2', 3173, 0x40, 0x00001234, 46),  # tcp outside
    ('2001:db8:0:1::2', 21001, 0x40, 0x00001234, 61),  # udp inside
    ('2001:db8:1::100:1:2', None, 0x40, 0x00001234, 52),  # icmp outside
    ('2001:db8:1::200:0:1', 1098, 0x100, 0x6c627379, 37),  # udp outside
    ('2001:db8:1::200:0:1', 1099, 0x100, 0x6c627379, 254),  # tcp outside
    ('2001:db8:0:1::2', 22000, 0x100, 0x6c627379, 184),  # udp inside
    ('2001:db8:1::200:0:1', None, 0x100, 0x6c627379, 2),  # icmp outside
    ('2001:db8:1::200:1:2', 3209, 0x100, 0x6c627379, 227),  # udp outside
    ('2001:db8:1::200:1:2', 3210, 0x100, 0x6c627379, 38),  # tcp outside
    ('2001:db8:0:1::2', 22001, 0x100, 0x6c627379, 109),  # udp inside
    ('2001:db8:1::200:1:2', None, 0x100, 0x6c627379, 22),  # icmp outside
    ('2001:db8:1::300:0:1', 1135, 0x400, 0xdeadbeef, 989),  # udp outside
    ('2001:db8:1::300:0:1', 1136, 0x400, 0xdeadbeef, 441),  # tcp outside
    ('2001:db8:0:1::2', 23000, 0x400, 0xdeadbeef, 58),  # udp inside
    ('2001:db8:1::300:0:1', None, 0x400, 0xdeadbeef, 138),  # icmp outside
    ('2001:db8:1::300:1:2', 3246, 0x400, 0xdeadbeef, 894),  # udp outside
    ('2001:db8:1::300:1:2', 3247, 0x400, 0xdeadbeef, 234),  # tcp outside
    ('2001:db8:0:1::2', 23001, 0x400, 0xdeadbeef, 7),  # udp inside
    ('2001:db8:1::300:1:2', None, 0x400, 0xdeadbeef, 152),  # icmp outside
    ('2001:db8:1::400:0:1', 1172, 0x1000, 0xffffffff, 4034),  # udp outside
    ('2001:db8:1::400:0:1', 1173, 0x1000, 0xffffffff, 2631),  # tcp outside
    ('2001:db8:0:1::2', 24000, 0x1000, 0xffffffff, 3415),  # udp inside
    ('2001:db8:1::400:0:1', None, 0x1000, 0xffffffff, 166),  # icmp outside
    ('2001:db8:1::400:1:2', 3283, 0x1000, 0xffffffff, 569),  # udp outside
    ('2001:db8:1::400:1:2', 3284, 0x1000, 0xffffffff, 982),  # tcp outside
    ('2001:db8:0:1::2', 24001, 0x1000, 0xffffffff, 2815),  # udp inside
    ('2001:db8:1::400:1:2', None, 0x1000, 0xffffffff, 2120),  # icmp outside
    ('2001:db8:1::500:0:1', 1209, 0xffffffff, 0x9e3779b9, 3547307593),  # udp outside
    ('2001:db8:1::500:0:1', 1210, 0xffffffff, 0x9e3779b9, 1510220791),  # tcp outside
    ('2001:db8:0:1::2', 25000, 0xffffffff, 0x9e3779b9, 1781573877),  # udp inside
    ('2001:db8:1::500:0:1', None, 0xffffffff, 0x9e3779b9, 3064069851),  # icmp outside
    ('2001:db8:1::500:1:2', 3320, 0xffffffff, 0x9e3779b9, 1408859031),  # udp outside
    ('2001:db8:1::500:1:2', 3321, 0xffffffff, 0x9e3779b9, 4000063331),  # tcp outside
    ('2001:db8:0:1::2', 25001, 0xffffffff, 0x9e3779b9, 1675808673),  # udp inside
    ('2001:db8:1::500:1:2', None, 0xffffffff, 0x9e3779b9, 1063560854),  # icmp outside
)


@pytest.mark.parametrize(("addr", "port", "buckets", "seed", "mark"), GOLDEN)
def test_bucket_of_equals_kernel_mark(addr: str, port: int | None, buckets: int, seed: int,
                                      mark: int) -> None:
    assert bucket_of(addr, port, buckets=buckets, seed=seed) == mark
    # Every address form gives the same bucket.
    ip = ipaddress.ip_address(addr)
    assert bucket_of(ip, port, buckets=buckets, seed=seed) == mark
    assert bucket_of(ip.packed, port, buckets=buckets, seed=seed) == mark


def test_golden_vectors_cover_every_key_form() -> None:
    fams = {(":" in a, p is None) for a, p, _, _, _ in GOLDEN}
    assert fams == {(False, False), (False, True), (True, False), (True, True)}
    assert {b for _, _, b, _, _ in GOLDEN} >= {7, 64, 256, 1024, 4096, 0xFFFFFFFF}
    assert len({m for *_, m in GOLDEN}) >= 70  # not degenerate


def test_full_32_bit_hashes_from_the_kernel() -> None:
    raw = [(a, p, s, m) for a, p, b, s, m in GOLDEN if b == 0xFFFFFFFF]
    assert len(raw) >= 16
    for addr, port, seed, mark in raw:
        assert mark != 0  # h - 1 is ambiguous only for h in {0, 1}
        assert jhash(flow_key(addr, port), seed) == mark + 1


def test_lookup3_reference_vectors() -> None:
    # Bob Jenkins' lookup3.c driver5 (hashlittle), which the kernel's jhash equals on
    # little-endian CPUs; the empty key returns the initial value unmixed.
    assert jhash(b"", 0) == 0xDEADBEEF
    assert jhash(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert jhash(b"Four score and seven years ago", 1) == 0xCD628161


def test_key_bytes() -> None:
    assert flow_key("198.18.0.1", 0x1234) == bytes([198, 18, 0, 1, 0x12, 0x34, 0, 0])
    assert flow_key("198.18.0.1", None) == bytes([198, 18, 0, 1])
    assert flow_key("2001:db8::1", 80) == ipaddress.ip_address("2001:db8::1").packed + \
        b"\x00\x50\x00\x00"
    assert len(flow_key("2001:db8::1", None)) == 16


@given(st.lists(st.integers(0, 0xFFFFFFFF), max_size=12), st.integers(0, 0xFFFFFFFF))
def test_jhash_equals_jhash2_on_little_endian_words(words: list[int], seed: int) -> None:
    data = b"".join(struct.pack("<I", w) for w in words)
    assert jhash(data, seed) == jhash2(words, seed)


@given(st.binary(max_size=40), st.integers(0, 0xFFFFFFFF))
def test_jhash_is_32_bit_and_seed_sensitive(data: bytes, seed: int) -> None:
    h = jhash(data, seed)
    assert 0 <= h <= 0xFFFFFFFF
    if not data:
        assert h == (JHASH_INITVAL + seed) & 0xFFFFFFFF


@given(st.integers(0, 0xFFFFFFFF), st.integers(1, 0xFFFFFFFF))
def test_reciprocal_scale_range_and_formula(h: int, n: int) -> None:
    r = reciprocal_scale(h, n)
    assert 0 <= r < n
    assert r == h * n // 2**32


def test_buckets_are_uniform_enough() -> None:
    # 20000 distinct source ports of one client over 64 buckets: each bucket within 25%.
    counts = [0] * 64
    for port in range(20000, 40000):
        counts[bucket_of("198.18.1.1", port, buckets=64, seed=0x6C627379)] += 1
    assert min(counts) > 0.75 * 20000 / 64 and max(counts) < 1.25 * 20000 / 64


def test_nft_expression_text() -> None:
    assert nft_jhash_expr(4, "outside", True, 64, 0x1234) == \
        "jhash ip saddr . th sport mod 64 seed 0x1234"
    assert nft_jhash_expr(4, "inside", True, 7, 0) == "jhash ip daddr . th dport mod 7 seed 0x0"
    assert nft_jhash_expr(6, "outside", False, 256, 0xFFFFFFFF) == \
        "jhash ip6 saddr mod 256 seed 0xffffffff"
    assert nft_jhash_expr(6, "inside", True, 1024, 1) == \
        "jhash ip6 daddr . th dport mod 1024 seed 0x1"


@pytest.mark.parametrize(("args", "kwargs"), [
    (("198.18.0.1", 70000), {"buckets": 64, "seed": 0}),
    (("198.18.0.1", -1), {"buckets": 64, "seed": 0}),
    (("198.18.0.1", 80), {"buckets": 0, "seed": 0}),
    (("198.18.0.1", 80), {"buckets": 64, "seed": 2**32}),
    ((b"\x01\x02\x03", 80), {"buckets": 64, "seed": 0}),
    (("not-an-address", 80), {"buckets": 64, "seed": 0}),
])
def test_bucket_of_rejects_bad_input(args: tuple[object, ...], kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        bucket_of(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args"), [(5, "outside", True, 64, 0), (4, "left", True, 64, 0),
                                    (4, "outside", True, 0, 0), (4, "outside", True, 64, -1)])
def test_nft_expr_rejects_bad_input(args: tuple[int, str, bool, int, int]) -> None:
    with pytest.raises(ValueError):
        nft_jhash_expr(*args)
