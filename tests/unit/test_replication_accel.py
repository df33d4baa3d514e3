"""The C decoder of replication DATA bodies (``lbsync._ctfast.decode_data``, used by
``wire.decode_body``) against the Python decoder, result for result.

Where C answers (a list), the Python decoder must answer the same list (same classes, equal
fields); where Python raises, C must decline (None). Bodies: what a real sender seals (flow
updates and deletes, digests, resync markers), Hypothesis-built bodies in every msgpack
encoding of the fields (non-canonical integers, bin 8/16/32, str, negative, array16, extra or
missing fields, trailing bytes), and random truncations and bit flips of sealed bodies."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbsync.replication import wire as W
from lbsync.replication.auth import KeyRing
from lbsync.replication.endpoint import ReplicationEndpoint
from lbsync.replication.params import ProtocolParams

NO_ACCEL = os.environ.get("LBSYNC_NO_ACCEL", "") not in ("", "0")
needs_c = pytest.mark.skipif(W._c_decode_data is None, reason="C accelerator disabled")
LIM = W.Limits(buckets=64, max_datagram=1400, max_key=255)


def test_c_decoder_is_active() -> None:
    assert (W._c_decode_data is None) == NO_ACCEL


@contextmanager
def python_only() -> Iterator[None]:
    saved = W._c_decode_data
    W._c_decode_data = None
    try:
        yield
    finally:
        W._c_decode_data = saved


def python_result(body: bytes, dtype: int, lim: W.Limits) -> list[W.Message] | str:
    with python_only():
        try:
            return W.decode_body(body, dtype, lim)
        except W.RemoteProtocolError as exc:
            return f"error {exc.reason}"


def check(body: bytes, lim: W.Limits = LIM) -> bool:
    """C vs Python on one DATA body; True when C decoded it."""
    assert W._c_decode_data is not None
    c = W._c_decode_data(body, lim.buckets, lim.max_key, lim.max_datagram)
    py = python_result(body, W.TYPE_DATA, lim)
    if c is None:
        return False
    assert not isinstance(py, str), (body.hex(), py)
    assert [type(m) for m in c] == [type(m) for m in py]
    assert c == py
    # the public entry point takes the C path and gives the same
    assert W.decode_body(body, W.TYPE_DATA, lim) == py
    return True


def sealed_bodies(n: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    kr = KeyRing({1: b"k" * 32}, 1)
    e = ReplicationEndpoint(node_id=1, incarnation=1, keyring=kr,
                            params=ProtocolParams(buckets=64), now=0.0, rng=rnd)
    for b in range(64):
        e.claim(b, rnd.choice([1, 200, 70000, 2**32 - 1]), 0.0, announce=False)
    for i in range(n):
        b = rnd.randrange(64)
        key = rnd.randbytes(rnd.choice([1, 13, 37, 255]))
        r = rnd.random()
        if r < 0.6:
            e.update_flow(b, key, rnd.randbytes(rnd.choice([0, 31, 90, 200, 300])), 0.0)
        elif r < 0.9:
            e.delete_flow(b, key, 0.0)
        elif r < 0.95:
            e.send_digests([b], 0.0)
        if i % 37 == 0:
            e.flush(0.0)
    e.flush(0.0)
    return [d[W.HEADER_LEN:-W.MAC_LEN] for d in e.datagrams_to_send()
            if d[3] == W.TYPE_DATA]


@needs_c
def test_sealed_bodies() -> None:
    bodies = sealed_bodies(3000, 1)
    taken = sum(check(b) for b in bodies)
    # only datagrams carrying a digest are declined
    assert taken >= len(bodies) // 2
    plain = [b for b in bodies if b"\x95\x07" not in b]
    assert all(W._c_decode_data is not None
               and W._c_decode_data(b, 64, 255, 1400) is not None for b in plain[:50])


@needs_c
def test_truncations_and_bit_flips() -> None:
    rnd = random.Random(7)
    bodies = sealed_bodies(800, 2)
    for _ in range(6000):
        b = bytearray(rnd.choice(bodies))
        r = rnd.random()
        if r < 0.3:
            b = b[:rnd.randrange(len(b) + 1)]
        elif r < 0.8:
            for _k in range(rnd.randint(1, 3)):
                b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        else:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        check(bytes(b))


def _uint(draw: Any, v: int) -> bytes:
    """``v`` in a msgpack integer encoding that decodes to it (canonical or not)."""
    forms = []
    if 0 <= v < 0x80:
        forms += [bytes([v])] * 16
    if 0 <= v < 1 << 8:
        forms.append(b"\xcc" + v.to_bytes(1, "big"))
    if 0 <= v < 1 << 16:
        forms.append(b"\xcd" + v.to_bytes(2, "big"))
    if 0 <= v < 1 << 32:
        forms.append(b"\xce" + v.to_bytes(4, "big"))
    if 0 <= v < 1 << 64:
        forms.append(b"\xcf" + v.to_bytes(8, "big"))
    if draw(st.integers(0, 9)):  # mostly the unsigned forms (the C decoder declines the rest)
        return draw(st.sampled_from(forms)) if forms else msgpack.packb(v)
    if -(1 << 7) <= v < 1 << 7:
        forms.append(b"\xd0" + v.to_bytes(1, "big", signed=True))
    if -(1 << 31) <= v < 1 << 31:
        forms.append(b"\xd2" + v.to_bytes(4, "big", signed=True))
    if -32 <= v < 0:
        forms.append((v & 0xFF).to_bytes(1, "big"))
    return draw(st.sampled_from(forms)) if forms else msgpack.packb(v)


def _bin(draw: Any, v: bytes) -> bytes:
    n = len(v)
    forms = [b"\xc5" + n.to_bytes(2, "big") + v, b"\xc6" + n.to_bytes(4, "big") + v]
    if n < 256:
        forms += [b"\xc4" + bytes([n]) + v] * 24
    forms.append(msgpack.packb(v.decode("latin-1")))  # a str: Python rejects it
    return draw(st.sampled_from(forms))


@st.composite
def message(draw: Any) -> bytes:
    """A flow update or delete, valid or (1 in 24) with one thing off."""
    update = draw(st.booleans())
    kind, bucket, epoch = (1 if update else 2), draw(st.integers(0, 63)), \
        draw(st.sampled_from([0, 1, 2**32 - 1]))
    key = draw(st.sampled_from([b"k", b"x" * 255, b"z" * 37]))
    record = draw(st.sampled_from([b"", b"r" * 90, b"s" * 1300]))
    nfields = 5 if update else 4
    head = bytes([0x90 | nfields])
    if draw(st.integers(0, 23)) == 0:
        what = draw(st.sampled_from(["kind", "bucket", "epoch", "key", "record", "fields",
                                     "head"]))
        if what == "kind":
            kind = draw(st.sampled_from([0, 3, 4, 7, 16, 2 if update else 1, 1 << 20]))
        elif what == "bucket":
            bucket = draw(st.sampled_from([64, 200, -1, 2**64 - 1]))
        elif what == "epoch":
            epoch = draw(st.sampled_from([2**32, 2**40, -1]))
        elif what == "key":
            key = draw(st.sampled_from([b"", b"y" * 256]))
        elif what == "record":
            record = b"t" * 1401
        elif what == "fields":
            nfields = draw(st.sampled_from([3, 4, 5, 6]))
            head = bytes([0x90 | nfields])
        else:
            head = b"\xdc" + nfields.to_bytes(2, "big")
    fields = [_uint(draw, kind), _uint(draw, bucket), _uint(draw, epoch), _bin(draw, key),
              _bin(draw, record), b"\xc0"][:nfields]
    return head + b"".join(fields)


@st.composite
def bodies(draw: Any) -> bytes:
    msgs = draw(st.lists(message(), max_size=17))
    n = len(msgs)
    canonical = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    head = draw(st.sampled_from([canonical] * 6 + [b"\xdc" + n.to_bytes(2, "big"),
                                                  b"\xdd" + n.to_bytes(4, "big")]))
    tail = draw(st.sampled_from([b""] * 8 + [b"\x00", b"\xc0"]))
    return head + b"".join(msgs) + tail


@needs_c
@settings(max_examples=600, deadline=None)
@given(body=bodies())
def test_hypothesis_bodies(body: bytes) -> None:
    check(body)


@needs_c
@pytest.mark.parametrize("lim", [W.Limits(buckets=1), W.Limits(buckets=4096, max_key=16),
                                 W.Limits(buckets=64, max_datagram=100, max_key=255)])
def test_other_limits(lim: W.Limits) -> None:
    for body in sealed_bodies(400, 3):
        check(body, lim)


@needs_c
def test_control_bodies_are_python_only() -> None:
    body = W.encode_body([W.encode_message(W.HighWater(5))])
    assert W.decode_body(body, W.TYPE_CONTROL, LIM) == [W.HighWater(5)]
    assert W._c_decode_data is not None
    assert W._c_decode_data(body, 64, 255, 1400) is None


# -- store digests ------------------------------------------------------------------------

@needs_c
def test_entry_hash_equals_blake2b() -> None:
    from lbsync import _ctfast
    from lbsync.replication.store import entry_hash

    rnd = random.Random(3)
    for n in [*range(0, 300), 1000, 5000, 70_000]:  # every block boundary of small entries
        for kind in (0, 1, 255):
            key = rnd.randbytes(rnd.randint(1, 300))
            record = rnd.randbytes(n)
            assert _ctfast.entry_hash(kind, key, record) == entry_hash(kind, key, record)
    assert _ctfast.entry_hash(0, b"k" * 65536, b"") is None  # the key length is a u16
    assert _ctfast.entry_hash(256, b"k", b"") is None
    assert _ctfast.entry_hash(0, "k", b"") is None  # type: ignore[arg-type]


@needs_c
def test_digest_sums_equal_python() -> None:
    from lbsync.replication import store as S

    assert S._c_table_sum is not None and S._c_delta is not None
    rnd = random.Random(4)
    for _ in range(300):
        keys = [rnd.randbytes(rnd.randint(1, 60)) for _ in range(rnd.randint(0, 40))]
        table = {k: rnd.randbytes(rnd.randint(0, 200)) for k in keys if rnd.random() < 0.7}
        changed: dict[bytes, bytes | None] = {}
        for k in keys:
            r = rnd.random()
            if r < 0.3:
                changed[k] = None
            elif r < 0.5:
                changed[k] = table.get(k, rnd.randbytes(5))
            elif r < 0.7:
                changed[k] = bytes(table[k]) if k in table else None  # equal, not identical
            elif r < 0.9:
                changed[k] = rnd.randbytes(rnd.randint(0, 200))
        kind = rnd.choice([0, 1])
        assert S._c_table_sum(kind, table) == S._py_table_sum(kind, table) & S._U64
        assert S._c_delta(kind, changed, table) == S._py_delta(kind, changed, table) & S._U64
    assert S._c_table_sum(0, {"k": b"r"}) is None  # type: ignore[dict-item]
    assert S._c_delta(0, {b"k": None}, {b"k": "r"}) is None  # type: ignore[dict-item]


@needs_c
def test_store_digests_with_and_without_c() -> None:
    from lbsync.replication import store as S

    rnd = random.Random(5)
    stores = [S.BucketStore(4, max_entries=300), S.BucketStore(4, max_entries=300)]
    saved = S._c_table_sum, S._c_delta
    for step in range(4000):
        kind, bucket = rnd.choice([S.FLOW, S.EXPECTATION]), rnd.randrange(4)
        key = bytes([rnd.randrange(200)])
        if rnd.random() < 0.7:
            record = rnd.randbytes(rnd.randint(0, 150))
            for s in stores:
                s.put(kind, bucket, 1, key, record)
        else:
            for s in stores:
                s.delete(kind, bucket, 1, key)
        if step % 97 == 0:
            stores[0].purge(bucket, [(k, x) for k, x in stores[0].keys(bucket)
                                     if rnd.random() < 0.8])
            stores[1].purge(bucket, [(k, x) for k, x in stores[1].keys(bucket)
                                     if (k, x) in stores[0].keys(bucket)])
        if step % 13 == 0:
            b = rnd.randrange(4)
            with_c = stores[0].digest(b)
            S._c_table_sum = S._c_delta = None
            try:
                without = stores[1].digest(b)
            finally:
                S._c_table_sum, S._c_delta = saved
            assert with_c == without
