"""The owner sweep's keys-only dump decoder (``conntrack.keys_of_dump``) against the full
decoder on captured kernel messages: the same keys for the same marks, flags and errors seen;
run with the C accelerator and with the Python code, and the two compared on mutated dumps."""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbsync.kernel import ctnetlink as C
from lbsync.kernel.conntrack import KernelError, keys_of_dump
from tests.unit.test_ctnetlink_oracle import CT_MESSAGES

NEW = [m for m in CT_MESSAGES if int.from_bytes(m[4:6], "little") == C.CT_NEW]
DONE = struct.pack("=IHHII", 20, C.NLMSG_DONE, 2, 1, 0) + b"\0\0\0\0"


@pytest.fixture(params=["c", "python"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "python":
        monkeypatch.setattr(C, "_c_keys_of_dump", None)
    elif C._c_keys_of_dump is None:
        pytest.skip("C accelerator not active (LBSYNC_NO_ACCEL); test_ctnetlink_accel fails")
    yield request.param


def full(buf: bytes) -> list[C.CtEvent]:
    return C.decode(buf, dump=True).events


def test_same_keys_as_the_full_decoder(codec: str) -> None:
    assert len(NEW) > 20
    buf = b"".join(NEW)
    events = full(buf)
    marks = {ev.bucket for ev in events} | {12345}
    assert len({ev.key[2:4] for ev in events}) > 1  # zones
    keys: set[bytes] = set()
    assert keys_of_dump(buf, range(1 << 32), keys) == (False, False)
    assert keys == {ev.key for ev in events}
    for mark in marks:
        some: set[bytes] = set()
        keys_of_dump(buf, {mark}, some)
        assert some == {ev.key for ev in events if ev.bucket == mark}


def test_done_interrupted_and_errors(codec: str) -> None:
    keys: set[bytes] = set()
    assert keys_of_dump(NEW[0] + DONE, {0}, keys) == (True, False)
    flagged = bytearray(NEW[0])
    flagged[6:8] = (int.from_bytes(flagged[6:8], "little") | 0x10).to_bytes(2, "little")
    assert keys_of_dump(bytes(flagged), {0}, keys) == (False, True)
    err = (struct.pack("=IHHII", 36, C.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1)
           + struct.pack("=IHHII", 20, 0, 0, 1, 0))
    with pytest.raises(KernelError):
        keys_of_dump(err, {0}, keys)
    with pytest.raises(C.CodecError):
        keys_of_dump(NEW[0][:-3], {0}, keys)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # one codec per run
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_codec_error(codec: str, data: bytes) -> None:
    with contextlib.suppress(C.CodecError, KernelError):
        keys_of_dump(data, range(1 << 32), set())


def _outcome(buf: bytes, marks: object) -> tuple[str, object]:
    keys: set[bytes] = set()
    try:
        res = keys_of_dump(buf, marks, keys)  # type: ignore[arg-type]
    except (C.CodecError, KernelError) as exc:
        return type(exc).__name__, None
    return "ok", (res, frozenset(keys))


def test_c_and_python_agree_on_mutated_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncations, bit flips and byte overwrites of a captured dump: the same keys, flags
    or exception class with the accelerator as without it."""
    if C._c_keys_of_dump is None:
        pytest.fail("C accelerator not active: nothing to compare (see test_ctnetlink_accel)")
    rng = random.Random(7)
    base = b"".join(NEW) + DONE
    marks = range(1 << 32)
    c_fn = C._c_keys_of_dump
    for i in range(3000):
        buf = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            j = rng.randrange(len(buf))
            buf[j] = rng.randrange(256) if i % 2 else buf[j] ^ (1 << rng.randrange(8))
        data = bytes(buf[:rng.randrange(len(buf) + 1)] if i % 5 == 0 else buf)
        monkeypatch.setattr(C, "_c_keys_of_dump", c_fn)
        got_c = _outcome(data, marks)
        monkeypatch.setattr(C, "_c_keys_of_dump", None)
        got_py = _outcome(data, marks)
        assert got_c == got_py, i
