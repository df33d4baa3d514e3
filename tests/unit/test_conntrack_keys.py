"""The owner sweep's keys-only dump decoder (``conntrack.keys_of_dump``) against the full
decoder on captured kernel messages: the same keys for the same marks, flags and errors seen."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbsync.kernel import ctnetlink as C
from lbsync.kernel.conntrack import KernelError, keys_of_dump
from tests.unit.test_ctnetlink_oracle import CT_MESSAGES

NEW = [m for m in CT_MESSAGES if int.from_bytes(m[4:6], "little") == C.CT_NEW]
DONE = struct.pack("=IHHII", 20, C.NLMSG_DONE, 2, 1, 0) + b"\0\0\0\0"


def full(buf: bytes) -> list[C.CtEvent]:
    return C.decode(buf, dump=True).events


def test_same_keys_as_the_full_decoder() -> None:
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


def test_done_interrupted_and_errors() -> None:
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


@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_codec_error(data: bytes) -> None:
    with contextlib.suppress(C.CodecError, KernelError):
        keys_of_dump(data, range(1 << 32), set())
