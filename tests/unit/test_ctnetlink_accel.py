"""The C accelerator (lbsync._ctfast) against the Python codec, result for result.

Differential tests: the same bytes through the C paths and through the pure-Python code (the C
entry points swapped out for the comparison) give equal events, equal create bytes and equal
standby verdicts, or the same exception class, for captured kernel messages, Hypothesis-built
events and records, and random truncations and bit flips of them. The extension must be
importable unless ``LBSYNC_NO_ACCEL`` is set, so CI proves the C path is what runs.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbsync import node as N
from lbsync.kernel import ctnetlink as C
from lbsync.kernel.flowrecord import (
    AF_INET,
    AF_INET6,
    IPPROTO_DCCP,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    FlowRecord,
    RecordError,
    pack_fields,
)
from tests.unit.test_ctnetlink_codec import records
from tests.unit.test_ctnetlink_oracle import MESSAGES

NO_ACCEL = os.environ.get("LBSYNC_NO_ACCEL", "") not in ("", "0")
needs_c = pytest.mark.skipif(C._ctfast is None, reason="C accelerator disabled")


def test_extension_is_importable_and_active() -> None:
    """Without LBSYNC_NO_ACCEL the C codec must be there: a build that silently fell back to
    Python would pass every other test here and lose the speed. Statistics say which runs
    (``lbsync status --json``: kernel.codec)."""
    import dataclasses

    from lbsync.kernel.conntrack import ConntrackStatistics

    codec = {f.name: f.default for f in dataclasses.fields(ConntrackStatistics)}["codec"]
    assert codec == C.CODEC == ("python" if NO_ACCEL else "c")
    if NO_ACCEL:
        assert C.CODEC == "python" and C._c_decode_ct is None
        return
    import lbsync._ctfast  # noqa: F401  (fails the test if the build is missing)

    assert C.CODEC == "c"
    assert C._c_decode_ct is not None and C._c_create is not None
    assert N._c_standby_check is not None


# -- running a call both ways -----------------------------------------------------------------

@contextmanager
def python_only() -> Iterator[None]:
    saved = C._c_decode_ct, C._c_create, N._c_standby_check
    C._c_decode_ct = C._c_create = N._c_standby_check = None
    try:
        yield
    finally:
        C._c_decode_ct, C._c_create, N._c_standby_check = saved


def outcome(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args, **kw)
    except Exception as e:  # the class is what must match
        return "raised", type(e)


def both(fn: Callable[..., Any], *args: Any,
         **kw: Any) -> tuple[tuple[str, Any], tuple[str, Any]]:
    fast = outcome(fn, *args, **kw)
    with python_only():
        slow = outcome(fn, *args, **kw)
    return fast, slow


def same_decode(buf: bytes, dump: bool = False) -> C.Decoded | None:
    fast, slow = both(C.decode, buf, dump=dump)
    assert fast == slow
    if fast[0] == "ok":
        d: C.Decoded = fast[1]
        assert all(type(ev) is C.CtEvent for ev in d.events)
        return d
    assert fast[1] is C.CodecError
    return None


# -- captured kernel messages -----------------------------------------------------------------

@needs_c
def test_captured_messages_decode_the_same_and_take_the_c_path() -> None:
    taken = 0
    for m in MESSAGES:
        for dump in (False, True):
            same_decode(m, dump)
        events: list[C.CtEvent] = []
        taken += C._ctfast.decode_ct(m, 0, False, events) >= len(m)
    ct = sum(m[5] == C.NFNL_SUBSYS_CTNETLINK for m in MESSAGES)
    assert taken == ct  # every captured conntrack message is decoded in C, none declined
    d = same_decode(b"".join(MESSAGES))
    assert d is not None and len(d.events) == ct and d.expectations


# -- Hypothesis-built events ------------------------------------------------------------------

def nla(atype: int, payload: bytes) -> bytes:
    return C._nla(atype, payload)


def u32a(atype: int, v: int) -> bytes:
    return C._u32attr(atype, v)


u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def event_attrs(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    """(family, attributes) of one conntrack message, kernel-like or a little odd."""
    family = draw(st.sampled_from([AF_INET, AF_INET6]))
    alen = 4 if family == AF_INET else 16
    addr = st.binary(min_size=alen, max_size=alen)
    l4 = draw(st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_DCCP,
                               IPPROTO_ICMP if family == AF_INET else IPPROTO_ICMPV6, 47, 99]))
    o = (draw(addr), draw(addr), draw(u16), draw(u16) if l4 not in (1, 58)
         else draw(st.sampled_from([8, 0, 128, 129])) << 8)
    if l4 in (99,):
        o = (o[0], o[1], 0, 0)
    nat = draw(st.sampled_from([0, IPS_SRC_NAT, IPS_DST_NAT, IPS_SRC_NAT | IPS_DST_NAT]))
    r = (draw(addr), draw(addr), draw(u16), draw(u16)) if nat else (o[1], o[0], o[3], o[2])
    if l4 in (1, 58, 99):
        r = (r[0], r[1], o[2], o[3]) if l4 != 99 else (r[0], r[1], 0, 0)
    status = IPS_CONFIRMED | nat | draw(st.sampled_from(
        [0, IPS_SEEN_REPLY, IPS_SEEN_REPLY | IPS_ASSURED, 0xFFFF]))
    attrs = [C.encode_tuple(C.CTA_TUPLE_ORIG, l4, *o), C.encode_tuple(C.CTA_TUPLE_REPLY, l4, *r)]
    if draw(st.booleans()):
        attrs.append(u32a(C.CTA_ID, draw(u32)))
    attrs.append(u32a(C.CTA_STATUS, status))
    if draw(st.booleans()):
        attrs.append(u32a(C.CTA_TIMEOUT, draw(u32)))
    if draw(st.booleans()):
        attrs.append(u32a(C.CTA_MARK, draw(u32)))
    if draw(st.booleans()):
        attrs.append(nla(C.CTA_ZONE, struct.pack(">H", draw(u16))))
    if l4 == IPPROTO_TCP and draw(st.integers(0, 4)):
        pi = [draw(st.integers(0, 9)), draw(st.integers(0, 14)), draw(st.integers(0, 14)),
              draw(u8), draw(u8)]
        attrs.append(C._protoinfo_attr(IPPROTO_TCP, pi))
    elif l4 in (IPPROTO_SCTP, IPPROTO_DCCP) and draw(st.booleans()):
        third = draw(u32) if l4 == IPPROTO_SCTP else draw(st.integers(0, 2**64 - 1))
        attrs.append(C._protoinfo_attr(l4, [draw(u8), draw(u32 if l4 == IPPROTO_SCTP
                                                          else u8), third]))
    if draw(st.booleans()):
        name = draw(st.sampled_from([b"ftp", b"sip", b"", b"tftp\0junk", b"x" * 40]))
        attrs.append(C._nest(C.CTA_HELP, nla(C.CTA_HELP_NAME, name + b"\0")))
    if draw(st.booleans()):
        attrs.append(nla(C.CTA_LABELS, draw(st.binary(min_size=0, max_size=20))))
    if draw(st.booleans()):
        attrs.append(C._nest(C.CTA_SEQ_ADJ_ORIG, u32a(1, draw(u32)), u32a(2, draw(u32)),
                             u32a(3, draw(u32))))
    if draw(st.booleans()):
        attrs.append(C._nest(C.CTA_SEQ_ADJ_REPLY, u32a(1, draw(u32)), u32a(3, draw(u32))))
    if draw(st.booleans()):
        attrs.append(C.encode_tuple(C.CTA_TUPLE_MASTER, IPPROTO_TCP, draw(addr), draw(addr),
                                    draw(u16), 21))
    if draw(st.booleans()):  # counters, use, timestamps: ignored; type 31: unknown
        attrs.append(nla(C.CTA_USE, b"\0\0\0\1"))
        attrs.append(nla(31, draw(st.binary(max_size=9))))
    if draw(st.integers(0, 3)) == 0:  # not the kernel's order: no prefix fast path
        draw(st.randoms(use_true_random=False)).shuffle(attrs)
    return family, attrs


def ct_message(family: int, attrs: list[bytes], mtype: int, flags: int, portid: int) -> bytes:
    body = b"".join(attrs)
    return struct.pack("=IHHIIBBH", 20 + len(body), mtype, flags, 1, portid, family, 0, 0) + body


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    family, attrs = draw(event_attrs())
    mtype = draw(st.sampled_from([C.CT_NEW, C.CT_DELETE]))
    flags = draw(st.sampled_from([0, C.NLM_F_CREATE, C.NLM_F_CREATE | C.NLM_F_EXCL,
                                  C.NLM_F_MULTI]))
    return ct_message(family, attrs, mtype, flags, draw(u32))


OTHERS = [struct.pack("=IHHII", 20, C.NLMSG_DONE, 2, 78, 0) + b"\0\0\0\0",
          struct.pack("=IHHII", 36, C.NLMSG_ERROR, 0, 77, 0) + struct.pack("=i", -17)
          + struct.pack("=IHHII", 60, C.CT_NEW, 0, 42, 0),
          struct.pack("=IHHII", 16, C.NLMSG_NOOP, 0, 1, 0)]


@given(st.lists(messages() | st.sampled_from(OTHERS + MESSAGES[:4]), min_size=1, max_size=6),
       st.booleans())
@settings(max_examples=400)
def test_generated_events_decode_the_same(msgs: list[bytes], dump: bool) -> None:
    same_decode(b"".join(msgs), dump)


# -- truncations and bit flips ----------------------------------------------------------------

def mutate(rnd: random.Random, msg: bytes) -> bytes:
    buf = bytearray(msg)
    how = rnd.randrange(4)
    if how == 0:
        return bytes(buf[:rnd.randrange(len(buf) + 1)])
    if how == 1:  # an attribute length (they sit on 4-byte boundaries)
        pos = rnd.randrange(16, max(17, len(buf) - 1)) & ~3
        if pos + 2 <= len(buf):
            struct.pack_into("=H", buf, pos, rnd.choice([0, 3, 4, 5, 8, 0xFFFF,
                                                         rnd.randrange(0x10000)]))
        return bytes(buf)
    for _ in range(rnd.randint(1, 4)):
        pos = rnd.randrange(len(buf))
        buf[pos] = rnd.randrange(256) if how == 2 else buf[pos] ^ (1 << rnd.randrange(8))
    return bytes(buf)


def run_mutations(n: int, seed: int) -> int:
    rnd = random.Random(seed)
    corpus = list(MESSAGES)
    # kernel-like built messages too, with every optional attribute present
    for _ in range(200):
        corpus.append(_built(rnd))
    declined = 0
    for _ in range(n):
        msg = mutate(rnd, rnd.choice(corpus))
        if rnd.random() < 0.2:
            msg = rnd.choice(corpus) + msg
        same_decode(msg, rnd.random() < 0.2)
        events: list[C.CtEvent] = []
        declined += C._ctfast.decode_ct(msg, 0, False, events) < len(msg)
    return declined


def _built(rnd: random.Random) -> bytes:
    family = rnd.choice([AF_INET, AF_INET6])
    alen = 4 if family == AF_INET else 16
    a = [rnd.randbytes(alen) for _ in range(4)]
    l4 = rnd.choice([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_DCCP,
                     IPPROTO_ICMP if family == AF_INET else IPPROTO_ICMPV6])
    sp, dp = rnd.randrange(65536), rnd.randrange(65536)
    if l4 in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        dp &= 0xFF00
    attrs = [C.encode_tuple(1, l4, a[0], a[1], sp, dp), C.encode_tuple(2, l4, a[2], a[3], dp, sp),
             u32a(C.CTA_ID, 7), u32a(C.CTA_STATUS, 0x19e), u32a(C.CTA_TIMEOUT, 300),
             u32a(C.CTA_MARK, rnd.randrange(64)), nla(C.CTA_ZONE, b"\0\5"),
             C._nest(C.CTA_HELP, nla(C.CTA_HELP_NAME, b"ftp\0")), nla(C.CTA_LABELS, b"\1" * 16),
             C._nest(C.CTA_SEQ_ADJ_ORIG, u32a(1, 5), u32a(2, 6), u32a(3, 7)),
             C.encode_tuple(C.CTA_TUPLE_MASTER, IPPROTO_TCP, a[0], a[1], 1000, 21)]
    if l4 == IPPROTO_TCP:
        attrs.append(C._protoinfo_attr(l4, [3, 7, 7, 0x23, 0x23]))
    elif l4 in (IPPROTO_SCTP, IPPROTO_DCCP):
        attrs.append(C._protoinfo_attr(l4, [3, 1, 2]))
    return ct_message(family, attrs, rnd.choice([C.CT_NEW, C.CT_DELETE]),
                      rnd.choice([0, C.NLM_F_CREATE]), rnd.randrange(2**32))


@needs_c
def test_mutated_messages_decode_the_same_or_raise_the_same() -> None:
    """~20k random truncations, bit flips and broken lengths: never a crash, and the C path
    gives what Python gives (events, or CodecError)."""
    declined = run_mutations(20_000, seed=6)
    assert 0 < declined < 20_000


@needs_c
@pytest.mark.soak
@pytest.mark.parametrize("seed", range(8))
def test_mutated_messages_soak(seed: int) -> None:
    run_mutations(250_000, seed=100 + seed)


# -- create encoding --------------------------------------------------------------------------

def same_create(record: bytes, seq: int, ack: bool, default_timeout: int = 120) -> None:
    fast, slow = both(C.encode_create, record, seq, ack=ack, default_timeout=default_timeout)
    assert fast == slow


@given(records(), st.sampled_from([0, IPS_SRC_NAT, IPS_DST_NAT, IPS_SRC_NAT | IPS_DST_NAT]),
       st.booleans(), st.booleans(), u32, st.integers(0, 2**32 + 5))
@settings(max_examples=300)
def test_creates_are_byte_identical(rec: FlowRecord, nat: int, plain: bool, ack: bool,
                                    seq: int, default_timeout: int) -> None:
    import dataclasses

    if plain:  # the fast path's shape (zone 0, no helper, labels, seqadj or master)
        rec = dataclasses.replace(rec, zone=0, helper=None, labels=None, seqadj_orig=None,
                                  seqadj_reply=None, master=None)
    rec = dataclasses.replace(rec, status=rec.status | nat)
    packed = rec.pack()
    same_create(packed, seq, ack, default_timeout)
    same_create(packed, seq + 2**32, ack)  # seq past u32: RecordError both ways
    if plain and rec.l4proto in (IPPROTO_TCP, IPPROTO_UDP) and C._ctfast is not None:
        assert C._ctfast.create(packed, seq, 1, 120) is not None


def _fields(rnd: random.Random) -> list[Any]:
    family = rnd.choice([AF_INET, AF_INET6])
    alen = 4 if family == AF_INET else 16
    l4 = rnd.choice([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, 136, 33])
    o = [rnd.randbytes(alen), rnd.randbytes(alen), rnd.randrange(65536), rnd.randrange(65536)]
    r = [o[1], o[0], o[3], o[2]]
    pi = None
    if l4 == IPPROTO_TCP and rnd.random() < 0.8:
        pi = [rnd.choice([1, 2, 3, 4, 8, 9]), 7, 7, 0x23, 0x23]
    return [1, family, l4, o, r, rnd.choice([8, 0x19e, 0x1be, 0xFFFFFFFF]),
            rnd.choice([None, 0, 300, 2**32 - 1]), rnd.randrange(2**32), 0, pi, None, None,
            None, None]


def odd_records(rnd: random.Random) -> Iterator[bytes]:
    """Packed records that are almost the fast path's shape, and garbage near it."""
    f = _fields(rnd)
    yield pack_fields(f)
    variants: list[Callable[[list[Any]], None]] = [
        lambda f: f.__setitem__(1, rnd.choice([0, 3, True, 2.0, -2, b"\2"])),
        lambda f: f.__setitem__(2, rnd.choice([1, 47, 6.0, None, "tcp"])),
        lambda f: f.__setitem__(5, rnd.choice([-1, 2**40, 2**64 - 1, None, False])),
        lambda f: f.__setitem__(6, rnd.choice([-1, 2**32, 2**63, 1.5, b""])),
        lambda f: f.__setitem__(7, rnd.choice([-1, 2**32, "m"])),
        lambda f: f.__setitem__(8, rnd.choice([0, 1, False, None, 0.0, b""])),
        lambda f: f.__setitem__(9, rnd.choice([[3, 7, 7, 0x23], [3, 7, 7, 300, 1], [3] * 6,
                                               b"abcde", [3, 7, 7, 0x23, -1], []])),
        lambda f: f.__setitem__(10, rnd.choice(["ftp", "", b"x"])),
        lambda f: f.__setitem__(11, rnd.choice([b"", b"\1" * 16, []])),
        lambda f: f[3].__setitem__(rnd.randrange(4), rnd.choice([b"\1\2\3", 70000, -1, None,
                                                                  "abcd", b"x" * 16])),
        lambda f: f[4].__setitem__(rnd.randrange(4), rnd.choice([b"\1\2\3", 70000, None])),
        lambda f: f.__setitem__(3, f[3][:3]),
        lambda f: f.append(rnd.choice([None, 1, [1, 2]])),
        lambda f: f.__setitem__(0, rnd.choice([0, 2, None])),
        lambda f: f.__delitem__(13),
    ]
    for _ in range(3):
        g = _fields(rnd)
        rnd.choice(variants)(g)
        try:
            packed = pack_fields(g)
        except (TypeError, ValueError, OverflowError):
            continue
        yield packed
    raw = bytearray(pack_fields(f))
    for _ in range(4):
        b = bytearray(raw)
        pos = rnd.randrange(len(b))
        b[pos] ^= 1 << rnd.randrange(8)
        yield bytes(b)
        yield bytes(raw[:rnd.randrange(len(raw))])
        yield bytes(raw) + bytes([rnd.randrange(256)])


@needs_c
def test_odd_and_mutated_records_encode_the_same_or_raise_the_same() -> None:
    rnd = random.Random(66)
    fast_path = 0
    for _ in range(3000):
        for rec in odd_records(rnd):
            seq = rnd.choice([0, 5, 2**31, 2**32 - 1])
            same_create(rec, seq, rnd.random() < 0.5, rnd.choice([120, 0, 2**32 - 1]))
            fast_path += C._ctfast.create(rec, seq, 1, 120) is not None
    assert fast_path > 1000


@needs_c
def test_batches_are_byte_identical_and_fall_back_per_record() -> None:
    rnd = random.Random(7)
    recs = [r for _ in range(300) for r in odd_records(rnd)]
    good = []
    for r in recs:
        try:
            with python_only():
                C.encode_create(r, 1)
            good.append(r)
        except RecordError:  # and nothing else: a bad record is a RecordError
            pass
    for ack_last in (True, False):
        for start in (1, 2**32 - 10):  # the second overflows u32 midway: RecordError both ways
            fast, slow = both(C.encode_create_batch, good, start, ack_last=ack_last,
                              default_timeout=77)
            assert fast == slow
    assert outcome(C.encode_create_batch, [], 1) == ("ok", b"")
    fast, slow = both(C.encode_create_batch, recs, 1)
    assert fast == slow


# -- the receiver's check ---------------------------------------------------------------------

@needs_c
def test_standby_check_gives_the_python_verdict() -> None:
    rnd = random.Random(5)
    decided = 0
    for _ in range(3000):
        for rec in odd_records(rnd):
            for key in (b"\2\6" + b"\0" * 14, b"\2\x11" + b"\0" * 14, b"", b"\2"):
                fast, slow = both(N._standby_check, key, rec)
                assert fast == slow
                decided += C._ctfast.standby_check(key, rec) is not None
    assert decided > 1000


@given(records())
def test_standby_check_on_valid_records(rec: FlowRecord) -> None:
    packed = rec.pack()
    for key in (rec.key, b"\2\6" + rec.key[2:]):
        fast, slow = both(N._standby_check, key, packed)
        assert fast == slow


# -- the event reader's receive loop ----------------------------------------------------------

@needs_c
def test_recv_events_decodes_each_datagram_as_decode_does() -> None:
    """recv_events on a datagram socketpair (recv works the same on netlink): per datagram,
    the events it appends plus decode() of the ``rest`` it hands back equal decode() of the
    whole datagram; EAGAIN ends the loop with status 0; max_calls bounds the receives."""
    import socket

    rnd = random.Random(9)
    grams = list(MESSAGES) + [_built(rnd) for _ in range(200)]
    grams += [mutate(rnd, rnd.choice(grams)) for _ in range(300)]
    grams += [b"".join(rnd.sample(MESSAGES, 3)) for _ in range(50)] + [b""]
    rnd.shuffle(grams)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    b.setblocking(False)
    buf = bytearray(1 << 17)
    try:
        for start in range(0, len(grams), 40):
            chunk = grams[start:start + 40]
            for g in chunk:
                a.send(g)
            got: list[C.CtEvent] = []
            expected: list[C.CtEvent] = []
            for g in chunk:  # the Python reader: events before a bad message are kept
                with python_only(), suppress(C.CodecError):
                    C.decode(g, C.Decoded(expected, [], []))
            calls = 0
            while True:
                n, status, rest = C._ctfast.recv_events(b.fileno(), buf, 7, got)
                assert n <= 7
                calls += n
                if rest is not None:
                    with python_only(), suppress(C.CodecError):
                        C.decode(rest, C.Decoded(got, [], []))
                elif status == 0:
                    break
                else:
                    assert status == -1 and n == 7
            assert calls == len(chunk)
            assert got == expected
    finally:
        a.close()
        b.close()
