"""Datagram authentication: a key ring for rotation, keyed BLAKE2b MACs, a replay window.

Rules:
- Every datagram carries a 16-byte keyed BLAKE2b tag over header and body; the header names the
  key id. Receivers accept any key of the ring, senders sign with the current one, so a key is
  rotated by adding it everywhere, then making it current, then removing the old one.
- The MAC is checked (``hmac.compare_digest``) before any byte of the body is parsed.
- :class:`ReplayWindow` bounds replay state for unsequenced (control) datagrams; the data stream
  needs none beyond the receiver's own expected sequence number and reorder buffer.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from lbsync.replication.wire import MAC_LEN

_PERSON = b"lbsync-repl-v1"


class KeyRingError(ValueError):
    """A key ring is unusable (no current key, key of a bad size, bad text)."""


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Secrets by key id (0..255) and the id used to sign."""

    keys: Mapping[int, bytes]
    current: int

    def __post_init__(self) -> None:
        if self.current not in self.keys:
            raise KeyRingError(f"current key id {self.current} is not in the ring")
        for kid, secret in self.keys.items():
            if not 0 <= kid <= 255:
                raise KeyRingError(f"key id {kid} must be 0..255")
            if not 16 <= len(secret) <= 64:
                raise KeyRingError(f"key {kid} must be 16..64 bytes, not {len(secret)}")

    def sign(self, data: bytes) -> bytes:
        """Tag of ``data`` with the current key."""
        return hashlib.blake2b(data, key=self.keys[self.current], digest_size=MAC_LEN,
                               person=_PERSON).digest()

    def verify(self, key_id: int, data: bytes, tag: bytes) -> bool:
        """True when ``tag`` is ``data``'s tag under key ``key_id`` (unknown id: False)."""
        secret = self.keys.get(key_id)
        if secret is None:
            return False
        want = hashlib.blake2b(data, key=secret, digest_size=MAC_LEN, person=_PERSON).digest()
        return hmac.compare_digest(want, tag)

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """The key file form: ``<id> <hex secret>`` lines and one ``current <id>`` line;
        ``#`` starts a comment."""
        keys: dict[int, bytes] = {}
        current: int | None = None
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            try:
                if parts[0] == "current" and len(parts) == 2:
                    current = int(parts[1])
                elif len(parts) == 2:
                    keys[int(parts[0])] = bytes.fromhex(parts[1])
                else:
                    raise ValueError("expected '<id> <hex>' or 'current <id>'")
            except ValueError as exc:
                raise KeyRingError(f"line {lineno}: {exc}") from None
        if current is None:
            raise KeyRingError("no 'current <id>' line")
        return cls(keys, current)


class ReplayWindow:
    """Sliding anti-replay window over a 32-bit counter (RFC 4303 style), unwrapped."""

    __slots__ = ("_bits", "_highest", "size")

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._highest = -1
        self._bits = 0

    def check_and_set(self, counter: int) -> bool:
        """True (and remembered) if ``counter`` was never seen and is inside the window."""
        if counter > self._highest:
            shift = counter - self._highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self.size) - 1) \
                if shift < self.size else 1
            self._highest = counter
            return True
        offset = self._highest - counter
        if offset >= self.size:
            return False
        mask = 1 << offset
        if self._bits & mask:
            return False
        self._bits |= mask
        return True

    @property
    def highest(self) -> int:
        return self._highest
