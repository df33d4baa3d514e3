"""nf_tables set elements over raw netlink: the daemon's hot path for ``@owned`` and ``@alive``.

Claims must land within milliseconds of a decision, and the fencing heartbeat (``@alive``,
elements with a timeout) is refreshed several times a second; spawning ``nft`` for each costs
~5 ms of CPU. So this module speaks NFNL_SUBSYS_NFTABLES directly: one batch per transaction
(BATCH_BEGIN, NEWSETELEM/DELSETELEM..., BATCH_END). The kernel processes a batch inside
``sendmsg()`` and either commits all of it or none, so every answer is queued when ``send``
returns and a transaction is atomic.

Idioms (nftables 1.0.6 has no ``destroy element``):
- remove an element that may be absent: NEWSETELEM then DELSETELEM in the same batch;
- refresh an element's timeout: before Linux 6.10 re-adding an element does not touch its
  timeout, so NEW, DEL, NEW with the timeout (which also re-creates an element that expired
  just before); from 6.10 (commit 4201f3938914, "set element timeout update support") one NEW
  with the timeout updates an existing element, in half the time. Which one holds is asked of
  the kernel once, at the first refresh (:meth:`NftSetSocket.refresh`), not guessed from a
  version string.

Ruleset structure (tables, chains) stays with ``nft -f`` (lbsync.nft); only elements live here.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14
NFPROTO_INET = 1

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_SET_ELEM_EXPIRATION = 5
NFTA_DATA_VALUE = 1

IFNAMSIZ = 16
MAX_ELEMS_PER_MSG = 1024
HEADS_CACHE_MAX = 16  # key lists whose element attributes are kept (see _elem_heads)
PROBE_MIN_MS = 20  # the timeout-update probe needs a timeout it can halve measurably
TABLE = "lbsync"

_NLH = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_TIMEOUT_ATTR_SIZE = _NLA.size + 8


class NftSetError(OSError):
    """A set-element transaction was refused by the kernel (nothing of it was applied)."""


def _attr(atype: int, payload: bytes) -> bytes:
    n = _NLA.size + len(payload)
    return _NLA.pack(n, atype) + payload + b"\0" * ((4 - n % 4) % 4)


def _msg(mtype: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    payload = _NFGEN.pack(family, 0, res_id) + body
    return _NLH.pack(_NLH.size + len(payload), mtype, flags, seq, 0) + payload


def mark_key(value: int) -> bytes:
    """Key bytes of a ``type mark`` element (host byte order, like ``ct mark``)."""
    return struct.pack("=I", value)


def ifname_key(name: str) -> bytes:
    raw = name.encode()
    if len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name too long: {name!r}")
    return raw.ljust(IFNAMSIZ, b"\0")


@dataclass(frozen=True, slots=True)
class ElementOp:
    """One message of a transaction: add or delete ``keys`` of one set (``timeout_ms`` 0: none)."""

    set_name: str
    add: bool
    keys: tuple[bytes, ...]
    timeout_ms: int = 0


class NftSetSocket:
    """A netlink socket for set-element transactions and dumps in the current namespace."""

    def __init__(self, table: str = TABLE) -> None:
        self.table = table
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_NETFILTER)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, 0))
        self._seq = int.from_bytes(os.urandom(2), "big") << 8
        self._heads: dict[tuple[tuple[bytes, ...], bool], tuple[bytes, ...]] = {}
        self.transactions = 0
        self.failures = 0
        self.timeout_update: bool | None = None
        """Whether NEWSETELEM updates an existing element's timeout (None: not asked yet)."""

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NftSetSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _elem_heads(self, keys: tuple[bytes, ...], timed: bool) -> tuple[bytes, ...]:
        """Each element's attributes up to its timeout (which has a fixed size): the lease
        refresh rewrites the same keys many times a second with only the timeout changing, and
        building the attributes in Python was most of its cost. Bounded cache."""
        ck = (keys, timed)
        heads = self._heads.get(ck)
        if heads is None:
            extra = _TIMEOUT_ATTR_SIZE if timed else 0
            heads = tuple(
                _NLA.pack(_NLA.size + len(kattr) + extra, NFTA_LIST_ELEM | NLA_F_NESTED) + kattr
                for k in keys
                for kattr in (_attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED,
                                    _attr(NFTA_DATA_VALUE, k)),))
            if len(self._heads) >= HEADS_CACHE_MAX:
                self._heads.clear()
            self._heads[ck] = heads
        return heads

    def _elem_msg(self, op: ElementOp, seq: int, ack: bool) -> bytes:
        heads = self._elem_heads(op.keys, bool(op.timeout_ms))
        if op.timeout_ms:
            timeout = _attr(NFTA_SET_ELEM_TIMEOUT, struct.pack(">Q", op.timeout_ms))
            elems = timeout.join(heads) + timeout
        else:
            elems = b"".join(heads)
        body = (_attr(NFTA_SET_ELEM_LIST_TABLE, self.table.encode() + b"\0")
                + _attr(NFTA_SET_ELEM_LIST_SET, op.set_name.encode() + b"\0")
                + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elems))
        # Errors are reported whatever the flags; one ACK (on the last message) says "done".
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        mtype = NFT_MSG_NEWSETELEM if op.add else NFT_MSG_DELSETELEM
        if op.add:
            flags |= NLM_F_CREATE
        return _msg((NFNL_SUBSYS_NFTABLES << 8) | mtype, flags, seq, NFPROTO_INET, 0, body)

    def transaction(self, ops: Iterable[ElementOp]) -> None:
        """Apply the messages as one atomic batch; raise NftSetError on refusal (none applied)."""
        # A netlink attribute holds at most 64 KiB: split large element lists into messages.
        todo = [ElementOp(op.set_name, op.add, op.keys[i:i + MAX_ELEMS_PER_MSG], op.timeout_ms)
                for op in ops for i in range(0, len(op.keys), MAX_ELEMS_PER_MSG)]
        if not todo:
            return
        parts = [_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, self._next_seq(), 0,
                      NFNL_SUBSYS_NFTABLES, b"")]
        seqs: list[int] = []
        for i, op in enumerate(todo):
            seq = self._next_seq()
            seqs.append(seq)
            parts.append(self._elem_msg(op, seq, ack=i == len(todo) - 1))
        parts.append(_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, self._next_seq(), 0,
                          NFNL_SUBSYS_NFTABLES, b""))
        self._sock.sendall(b"".join(parts))
        self.transactions += 1
        first_error = 0
        mine = set(seqs)
        # The batch ran inside sendmsg(): every answer is queued already; read until empty.
        while True:
            try:
                data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for mtype, _flags, seq, payload in _split(data):
                if mtype == NLMSG_ERROR and seq in mine:
                    (err,) = struct.unpack_from("=i", payload, 0)
                    if err < 0 and not first_error:
                        first_error = -err
        if first_error:
            self.failures += 1
            raise NftSetError(first_error, f"nft set transaction refused: "
                                           f"{os.strerror(first_error)}")

    # Convenience forms ----------------------------------------------------------------------

    def update_marks(self, set_name: str, add: Iterable[int], remove: Iterable[int]) -> None:
        """Add and remove mark elements in one transaction, tolerating present/absent ones.

        A mark in both ``add`` and ``remove`` ends up removed.
        """
        # Deduplicated: deleting one element twice in a batch fails the batch.
        rm = dict.fromkeys(remove)
        add_k = tuple(mark_key(m) for m in dict.fromkeys(add) if m not in rm)
        rm_k = tuple(mark_key(m) for m in rm)
        self.transaction([ElementOp(set_name, True, add_k + rm_k),
                          ElementOp(set_name, False, rm_k)])

    def refresh(self, set_name: str, keys: Iterable[bytes], timeout_ms: int) -> None:
        """(Re)arm elements with a fresh timeout, atomically, whether they exist or expired."""
        ks = tuple(keys)
        if self.timeout_update:
            self.transaction([ElementOp(set_name, True, ks, timeout_ms)])
            return
        self.transaction([ElementOp(set_name, True, ks, timeout_ms),
                          ElementOp(set_name, False, ks),
                          ElementOp(set_name, True, ks, timeout_ms)])
        if self.timeout_update is None and ks:
            self.timeout_update = self._probe_timeout_update(set_name, ks[0], timeout_ms)

    def _probe_timeout_update(self, set_name: str, key: bytes, timeout_ms: int) -> bool | None:
        """Does re-adding an element update its timeout? Asked once, on an element just armed
        with ``timeout_ms``: it is re-added with half that timeout (safe either way: an element
        may only end earlier) and the kernel's listing of it answers. None: cannot tell yet
        (timeout too short to halve measurably, element gone); asked at a later refresh."""
        shorter = timeout_ms // 2
        if shorter < PROBE_MIN_MS:
            return None
        self.transaction([ElementOp(set_name, True, (key,), shorter)])
        got = self.element_timeouts(set_name).get(key)
        if got is None:
            return None
        updated = abs(got - shorter) < abs(got - timeout_ms)  # jiffies round the listing
        if updated:  # back to the lease written a moment ago
            self.transaction([ElementOp(set_name, True, (key,), timeout_ms)])
        return updated

    def clear(self, set_name: str, keys: Iterable[bytes]) -> None:
        ks = tuple(keys)
        self.transaction([ElementOp(set_name, True, ks), ElementOp(set_name, False, ks)])

    def elements(self, set_name: str) -> list[bytes]:
        """Keys of the set's live elements (expired ones are skipped by the kernel)."""
        return [k for k, _t in self._dump(set_name)]

    def _dump(self, set_name: str) -> list[tuple[bytes, int | None]]:
        """(key, timeout ms or None) of the set's live elements."""
        seq = self._next_seq()
        body = (_attr(NFTA_SET_ELEM_LIST_TABLE, self.table.encode() + b"\0")
                + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0"))
        self._sock.sendall(_msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
                                NLM_F_REQUEST | NLM_F_DUMP, seq, NFPROTO_INET, 0, body))
        elems: list[tuple[bytes, int | None]] = []
        while True:
            data = self._sock.recv(1 << 20)
            for mtype, _flags, mseq, payload in _split(data):
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return elems
                if mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", payload, 0)
                    if err < 0:
                        raise NftSetError(-err, f"cannot list set {set_name}: "
                                                f"{os.strerror(-err)}")
                    continue
                elems.extend(_elems(payload[_NFGEN.size:]))

    def marks(self, set_name: str) -> set[int]:
        return {struct.unpack("=I", k[:4])[0] for k in self.elements(set_name)}

    def element_timeouts(self, set_name: str) -> dict[bytes, int]:
        """Key -> timeout in ms of the set's live elements that have one."""
        return {k: t for k, t in self._dump(set_name) if t is not None}


def _split(data: bytes) -> Iterable[tuple[int, int, int, bytes]]:
    off = 0
    while off + _NLH.size <= len(data):
        length, mtype, flags, seq, _pid = _NLH.unpack_from(data, off)
        if length < _NLH.size or off + length > len(data):
            raise NftSetError(errno.EPROTO, "truncated netlink message")
        yield mtype, flags, seq, data[off + _NLH.size: off + length]
        off += (length + 3) & ~3


def _attrs(buf: bytes) -> Iterable[tuple[int, bytes]]:
    off = 0
    while off + _NLA.size <= len(buf):
        n, atype = _NLA.unpack_from(buf, off)
        if n < _NLA.size or off + n > len(buf):
            raise NftSetError(errno.EPROTO, "truncated netlink attribute")
        yield atype & 0x3FFF, buf[off + _NLA.size: off + n]
        off += (n + 3) & ~3


def _elems(body: bytes) -> list[tuple[bytes, int | None]]:
    out: list[tuple[bytes, int | None]] = []
    for atype, val in _attrs(body):
        if atype != NFTA_SET_ELEM_LIST_ELEMENTS:
            continue
        for etype, elem in _attrs(val):
            if etype != NFTA_LIST_ELEM:
                continue
            key: bytes | None = None
            timeout: int | None = None
            for ktype, kval in _attrs(elem):
                if ktype == NFTA_SET_ELEM_KEY:
                    for dtype, dval in _attrs(kval):
                        if dtype == NFTA_DATA_VALUE:
                            key = dval
                elif ktype == NFTA_SET_ELEM_TIMEOUT and len(kval) == 8:
                    (timeout,) = struct.unpack(">Q", kval)
            if key is not None:
                out.append((key, timeout))
    return out
