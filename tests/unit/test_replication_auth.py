"""Key ring, MAC and the control replay window."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbsync.replication.auth import KeyRing, KeyRingError, ReplayWindow


def test_sign_verify_and_rotation() -> None:
    old = KeyRing({1: b"a" * 32}, 1)
    both = KeyRing({1: b"a" * 32, 2: b"b" * 32}, 2)
    data = b"datagram bytes"
    assert old.verify(1, data, old.sign(data))
    assert both.verify(1, data, old.sign(data))  # rotation: old signatures still accepted
    assert not old.verify(2, data, both.sign(data))  # unknown key id
    assert not both.verify(1, data, both.sign(data))  # signed with key 2, not 1
    assert not old.verify(1, data + b"x", old.sign(data))
    assert len(old.sign(data)) == 16


@pytest.mark.parametrize(("keys", "current"), [({1: b"x" * 8}, 1), ({1: b"x" * 32}, 2),
                                               ({300: b"x" * 32}, 300), ({1: b"x" * 65}, 1)])
def test_bad_rings_are_refused(keys: dict[int, bytes], current: int) -> None:
    with pytest.raises(KeyRingError):
        KeyRing(keys, current)


def test_parse_key_file() -> None:
    ring = KeyRing.parse("# cluster keys\n1 " + "ab" * 32 + "\n2 " + "cd" * 16 + "\ncurrent 2\n")
    assert ring.current == 2 and ring.keys[1] == bytes([0xAB]) * 32
    for bad in ("1 zz\ncurrent 1", "1 " + "ab" * 32, "a b c", "current x"):
        with pytest.raises(KeyRingError):
            KeyRing.parse(bad)


@given(st.lists(st.integers(0, 5000), max_size=300))
def test_replay_window_accepts_each_counter_once(counters: list[int]) -> None:
    w = ReplayWindow(64)
    seen: set[int] = set()
    highest = -1
    for c in counters:
        fresh = c not in seen and (c > highest or highest - c < 64)
        assert w.check_and_set(c) == fresh
        if fresh:
            seen.add(c)
            highest = max(highest, c)
