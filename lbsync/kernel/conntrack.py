"""The conntrack socket adapter: one event socket, one request socket, nothing else.

- **Events**: a ``NETLINK_NETFILTER`` socket subscribed to the conntrack groups, read from
  ``loop.add_reader`` (so it runs under uvloop, which refuses AF_NETLINK transports), with a
  large receive buffer (``SO_RCVBUFFORCE``). Each readable callback drains up to
  ``read_budget`` messages, decodes them (:func:`lbsync.kernel.ctnetlink.decode`), applies the
  caller's filter and hands one list to ``on_events``.
- **Echo suppression in the kernel**: a BPF filter on the event socket drops every message
  whose netlink port id is the request socket's, i.e. the events of our own creates, updates and
  deletes (see :mod:`lbsync.kernel.bpf`).
- **ENOBUFS** on the event socket means events were lost. It is counted; once the queue has
  been read empty (events queued before that point are delivered at once), a re-dump starts and
  events read meanwhile are held (bounded); then ``on_resync`` receives the complete table
  (kernel-filtered by mark when configured) and the held events follow it, so the consumer ends
  with exactly the kernel's table. A further ENOBUFS during the re-dump (or held events past the
  bound) voids it and starts over (see :class:`Conntrack`).
- **Requests**: dumps and batched writes on a separate socket. The kernel processes a write in
  the ``sendmsg`` call; failures come back as ``NLMSG_ERROR`` with the failing seq, which is
  mapped back to the entry's index. Bulk work runs in slices of ``slice_entries`` that yield to
  the loop so heartbeats keep flowing.

No protocol decisions here: what to inject, and when, is the daemon's business.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lbsync.config import KernelConfig
from lbsync.kernel import bpf, ctnetlink
from lbsync.kernel.ctnetlink import (
    _ERRNO,
    _KEY_HEAD,
    _NLA,
    _NLMSG,
    _U16BE,
    _U32BE,
    CODEC,
    CT_NEW,
    KIND_DESTROY,
    KIND_NEW,
    KIND_UPDATE,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_EXP_DESTROY,
    NFNLGRP_CONNTRACK_EXP_NEW,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
    NLMSG_DONE,
    NLMSG_ERROR,
    CodecError,
    CtEvent,
    Decoded,
    ExpectRecord,
    ExpEvent,
    _tuple,
    decode,
    encode_create,
    encode_delete,
    encode_dump_request,
    encode_exp_create,
    encode_exp_dump_request,
    encode_get,
    encode_update,
    iter_messages,
)
from lbsync.kernel.flowrecord import RecordError

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

DEFAULT_GROUPS = (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY)
EXPECT_GROUPS = (NFNLGRP_CONNTRACK_EXP_NEW, NFNLGRP_CONNTRACK_EXP_DESTROY)
RECV_SIZE = 1 << 17
NLM_F_DUMP_INTR = 0x10
DRAIN_CAP = 1 << 16


class KernelError(OSError):
    """The kernel refused a request as a whole (e.g. a dump answered with an error)."""


def open_netfilter_socket(*, rcvbuf: int, sndbuf: int = 0, groups: Sequence[int] = (),
                          nonblocking: bool = False) -> socket.socket:
    """A NETLINK_NETFILTER socket, bound, with forced buffer sizes and the given groups."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
        # errors carry only the failing header, not a copy of our whole request
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.bind((0, 0))
        for g in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, g)
        sock.setblocking(not nonblocking)
    except OSError:
        sock.close()
        raise
    return sock


def keys_of_dump(buf: bytes, marks: Container[int], keys: set[bytes]) -> tuple[bool, bool]:
    """Add to ``keys`` the key of every conntrack entry in ``buf`` (one ``recv`` of a dump)
    whose mark is in ``marks``; returns (NLMSG_DONE seen, the kernel flagged the dump
    interrupted). The sweep's decoder: it reads the original tuple, the mark and the zone and
    nothing else (no record is built), so an entry costs a few attribute headers, not a full
    :func:`~lbsync.kernel.ctnetlink.decode` (~4x cheaper; entries of other buckets cheaper still).
    Keys are exactly those of :class:`~lbsync.kernel.ctnetlink.CtEvent`. Raises
    :class:`~lbsync.kernel.ctnetlink.CodecError` on a malformed buffer and
    :class:`KernelError` when the kernel refused the dump."""
    c_keys = ctnetlink._c_keys_of_dump  # the C accelerator, when built (docs/kernel.md)
    if c_keys is not None:
        res = c_keys(buf, marks, keys)
        if res is not None:
            return res
        # declined (malformed, a kernel error, an odd attribute): the Python code decides
    nlh = _NLMSG.unpack_from
    nla = _NLA.unpack_from
    u32 = _U32BE.unpack_from
    pos, n = 0, len(buf)
    done = interrupted = False
    try:
        while pos < n:
            if n - pos < 16:
                raise CodecError("truncated netlink header")
            mlen, mtype, mflags, _seq, _portid = nlh(buf, pos)
            if mlen < 16 or pos + mlen > n:
                raise CodecError("netlink message length out of bounds")
            end = pos + mlen
            if mflags & NLM_F_DUMP_INTR:
                interrupted = True
            if mtype == CT_NEW:
                if mlen < 20:
                    raise CodecError("truncated nfgenmsg")
                family = buf[pos + 16]
                orig = -1
                orig_end = mark = zone = 0
                p = pos + 20
                while p < end:
                    alen, atype = nla(buf, p)
                    if alen < 4 or p + alen > end:
                        raise CodecError("attribute length out of bounds")
                    atype &= 0x3FFF
                    if atype == 1:  # CTA_TUPLE_ORIG
                        orig, orig_end = p + 4, p + alen
                    elif atype == 8:  # CTA_MARK
                        mark = u32(buf, p + 4)[0]
                    elif atype == 18:  # CTA_ZONE
                        zone = _U16BE.unpack_from(buf, p + 4)[0]
                    p += (alen + 3) & ~3
                if orig < 0:
                    raise CodecError("conntrack message without its original tuple")
                if mark in marks:
                    l4, src, dst, sport, dport = _tuple(buf, orig, orig_end)
                    keys.add(_KEY_HEAD.pack(family, l4, zone, sport, dport) + src + dst)
            elif mtype == NLMSG_DONE:
                done = True
            elif mtype == NLMSG_ERROR:
                if mlen < 20:
                    raise CodecError("truncated NLMSG_ERROR")
                err = -_ERRNO.unpack_from(buf, pos + 16)[0]
                if err:
                    raise KernelError(err, f"dump refused: {errno.errorcode.get(err)}")
            pos += (mlen + 3) & ~3
    except (struct.error, IndexError) as e:
        raise CodecError(f"truncated message: {e}") from None
    return done, interrupted


class KeyDumper:
    """The owner sweep's socket: one dump at a time, keys only, on the loop in slices.

    A socket of its own, kept open: dumps never wait behind the request socket's writes (a
    takeover's commit, standby injections), and no socket is created or closed per sweep
    (closing a netlink socket waits for the host-wide netlink table, which took 0.3 s while
    100k conntrack events were being broadcast)."""

    def __init__(self, *, rcvbuf: int = 8 << 20, duty: float = 0.25) -> None:
        if not 0 < duty <= 1:
            raise ValueError("duty must be in (0, 1]")
        self._duty = duty
        self._rcvbuf = rcvbuf
        self._sock = open_netfilter_socket(rcvbuf=rcvbuf)
        self._sock.settimeout(30.0)
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._lock = asyncio.Lock()
        self.dumps = 0
        self.last_busy = 0.0
        """Seconds the last dump kept the loop busy (its ``recv`` calls, in which the kernel
        builds the dump, and their decoding), pauses not counted."""

    def close(self) -> None:
        self._sock.close()

    async def dump_keys(self, marks: Container[int]) -> tuple[set[bytes], bool]:
        """Keys of this namespace's entries whose mark is in ``marks``, from ONE dump; and
        whether the dump is unreliable (flagged interrupted by the kernel, or a part could not
        be decoded: the caller then concludes nothing).

        One ``recv`` (the kernel builds one skb of the dump inside it: ~0.4 ms and ~140
        entries) and its keys-only decoding (~2 us an entry) at a time, then a pause that keeps
        the dump's share of the CPU at ``duty`` (100k entries: ~0.5 s of CPU spread over ~2 s):
        a sweep is a safety net, and on a host whose daemons run at the same real-time
        priority a busy loop keeps its CPU from the others for whole 100 ms round-robin slices.
        One unfiltered dump, not one per mark: every dump walks the whole host-wide
        conntrack hash, whatever its filter (~45 ms each on a host holding other farms'
        entries). (It ran in a worker thread before: at real-time priority that thread held a
        CPU, and the GIL, for whole 100 ms round-robin slices, and a 100k-entry sweep stalled
        every daemon on the host.)"""
        async with self._lock:
            self._sock.send(encode_dump_request(1))
            keys: set[bytes] = set()
            interrupted = False
            done = False
            rest = (1.0 - self._duty) / self._duty
            busy = 0.0
            try:
                while not done:
                    t0 = time.perf_counter()
                    n = self._sock.recv_into(self._buf)
                    try:
                        done, intr = keys_of_dump(self._view[:n].tobytes(), marks, keys)
                    except KernelError:
                        return keys, True  # refused: the error ended the dump
                    except CodecError:
                        # an undecodable part proves nothing; a fresh socket drops the rest
                        self._sock.close()
                        self._sock = open_netfilter_socket(rcvbuf=self._rcvbuf)
                        self._sock.settimeout(30.0)
                        return keys, True
                    finally:
                        busy += time.perf_counter() - t0
                    interrupted = interrupted or intr
                    if not done:
                        await asyncio.sleep((time.perf_counter() - t0) * rest)
                return keys, interrupted
            finally:
                # counted once ended: the status shows the last ended dump's busy time
                self.dumps += 1
                self.last_busy = busy


# -- statistics --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventStatistics:
    """Snapshot of the event reader's counters."""

    recv_calls: int
    messages: int
    new: int
    update: int
    destroy: int
    expectations: int
    delivered: int
    filtered: int
    echoes: int
    enobufs: int
    decode_errors: int
    resyncs: int
    held_overflows: int


@dataclass(frozen=True, slots=True)
class RequestStatistics:
    """Snapshot of the request socket's counters; ``errors`` maps errno name -> count."""

    dumps: int
    dumped_entries: int
    dump_interrupted: int
    batches: int
    created: int
    deleted: int
    updated: int
    write_errors: int
    encode_errors: int
    decode_errors: int
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of a batched write: ``failed`` holds (index into the input, errno)."""

    attempted: int
    succeeded: int
    failed: tuple[tuple[int, int], ...]

    def errno_counts(self) -> dict[str, int]:
        return dict(Counter(errno.errorcode.get(e, str(e)) for _, e in self.failed))


class KernelTable(Protocol):
    """What the daemon needs from a kernel's conntrack table; :class:`ConntrackRequests`
    implements it, tests and simulations may pass a fake."""

    def dump(self, *, family: int = 0, mark: int | None = None,
             mark_mask: int = 0xFFFFFFFF) -> AsyncIterator[list[CtEvent]]: ...

    async def dump_all(self, *, family: int = 0, mark: int | None = None,
                       mark_mask: int = 0xFFFFFFFF) -> list[CtEvent]: ...

    async def inject(self, records: Sequence[bytes], *,
                     default_timeout: int = 120) -> WriteResult: ...

    async def delete(self, keys: Sequence[bytes]) -> WriteResult: ...

    async def update(self, keys: Sequence[bytes], *, timeout: int | None = None,
                     mark: int | None = None, tcp_state: int | None = None) -> WriteResult: ...

    async def create_expectations(self, exps: Sequence[ExpectRecord]) -> WriteResult: ...

    async def get(self, keys: Sequence[bytes]) -> list[CtEvent | None]: ...

    def statistics(self) -> RequestStatistics: ...


# -- request socket ----------------------------------------------------------------------------


class ConntrackRequests:
    """The request socket: dumps and batched creates/updates/deletes, in slices
    (a :class:`KernelTable`)."""

    def __init__(self, *, config: KernelConfig | None = None, rcvbuf: int = 8 << 20) -> None:
        self._cfg = config or KernelConfig()
        self._sock = open_netfilter_socket(rcvbuf=rcvbuf, sndbuf=4 << 20)
        self._sock.settimeout(10.0)
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._seq = 1
        self._lock = asyncio.Lock()
        self._n = Counter[str]()
        self._errors = Counter[str]()

    @property
    def portid(self) -> int:
        pid: int = self._sock.getsockname()[0]
        return pid

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self, n: int) -> int:
        s = self._seq
        self._seq = (self._seq + n) & 0x7FFFFFFF or 1
        if self._seq < s:  # wrapped: restart so a batch's seqs stay contiguous
            s, self._seq = 1, n + 1
        return s

    def statistics(self) -> RequestStatistics:
        n = self._n
        return RequestStatistics(
            dumps=n["dumps"], dumped_entries=n["dumped_entries"],
            dump_interrupted=n["dump_interrupted"], batches=n["batches"], created=n["created"],
            deleted=n["deleted"], updated=n["updated"], write_errors=n["write_errors"],
            encode_errors=n["encode_errors"], decode_errors=n["decode_errors"],
            errors=dict(self._errors))

    # dumps ------------------------------------------------------------------------------------

    async def dump(self, *, family: int = 0, mark: int | None = None,
                   mark_mask: int = 0xFFFFFFFF) -> AsyncIterator[list[CtEvent]]:
        """Dump the table (kernel-filtered by ``ct mark & mark_mask == mark`` if given) in
        slices of about ``slice_entries``, yielding to the loop between slices."""
        async with self._lock:
            seq = self._next_seq(1)
            self._sock.send(encode_dump_request(seq, family=family, mark=mark,
                                                mark_mask=mark_mask))
            self._n["dumps"] += 1
            out = Decoded([], [], [])
            done = False
            try:
                while True:
                    done = self._recv_dump(out)
                    if len(out.events) >= self._cfg.slice_entries or done:
                        batch, out.events = out.events, []
                        self._n["dumped_entries"] += len(batch)
                        if batch:
                            yield batch
                        if done:
                            return
                        await asyncio.sleep(0)
            except (GeneratorExit, asyncio.CancelledError):
                # a consumer that stops early must not leave the rest of this dump queued for
                # the next request to misread
                while not done:
                    done = self._recv_dump(out)
                    if len(out.events) >= self._cfg.slice_entries:
                        out.events.clear()
                        await asyncio.sleep(0)
                raise

    def _recv_dump(self, out: Decoded) -> bool:
        n = self._sock.recv_into(self._buf)
        data = self._view[:n].tobytes()
        try:
            decode(data, out, dump=True)
        except CodecError:
            self._n["decode_errors"] += 1
            log.warning("ctnetlink.dump_decode_error bytes=%d", len(data))
        # NLM_F_DUMP_INTR: the table changed while this chunk was being built (counted only:
        # events arriving meanwhile carry the changes)
        if len(data) >= 8 and int.from_bytes(data[6:8], sys.byteorder) & NLM_F_DUMP_INTR:
            self._n["dump_interrupted"] += 1
        for ack in out.acks:
            if ack.error:
                out.acks.clear()
                raise KernelError(ack.error, f"dump refused: {errno.errorcode.get(ack.error)}")
        return out.done

    async def dump_all(self, *, family: int = 0, mark: int | None = None,
                       mark_mask: int = 0xFFFFFFFF) -> list[CtEvent]:
        entries: list[CtEvent] = []
        async for batch in self.dump(family=family, mark=mark, mark_mask=mark_mask):
            entries.extend(batch)
        return entries

    async def dump_expectations(self, *, family: int = 0) -> list[ExpectRecord]:
        async with self._lock:
            seq = self._next_seq(1)
            self._sock.send(encode_exp_dump_request(seq, family=family))
            out = Decoded([], [], [])
            while not self._recv_dump(out):
                pass
            return [e.expect for e in out.expectations]

    async def get(self, keys: Sequence[bytes]) -> list[CtEvent | None]:
        """The current entries named by ``keys`` (None where absent), in batches. For state no
        event reports, e.g. a helper's sequence adjustment (docs/kernel.md)."""
        found: list[CtEvent | None] = [None] * len(keys)
        async with self._lock:
            for start in range(0, len(keys), self._cfg.batch_entries):
                stop = min(len(keys), start + self._cfg.batch_entries)
                seq0 = self._next_seq(stop - start)
                last = seq0 + stop - start - 1
                self._sock.send(b"".join(encode_get(keys[i], seq0 + i - start, ack=i == stop - 1)
                                         for i in range(start, stop)))
                finished = False
                while not finished:
                    n = self._sock.recv_into(self._buf)
                    for msg in iter_messages(self._view[:n].tobytes()):
                        seq = int.from_bytes(msg[8:12], sys.byteorder)
                        try:
                            d = decode(msg, dump=True)
                        except CodecError:
                            self._n["decode_errors"] += 1
                            continue
                        if d.events and seq0 <= seq <= last:
                            found[start + seq - seq0] = d.events[0]
                        if any(a.seq == last for a in d.acks):
                            finished = True
                if stop < len(keys):
                    await asyncio.sleep(0)
        return found

    # writes -----------------------------------------------------------------------------------

    async def inject(self, records: Sequence[bytes], *, default_timeout: int = 120) -> WriteResult:
        """Create one entry per packed record (EEXIST if present: never overwritten)."""
        def enc(i: int, seq: int, ack: bool) -> bytes:
            return encode_create(records[i], seq, ack=ack, default_timeout=default_timeout)
        return await self._write(len(records), enc, "created")

    async def delete(self, keys: Sequence[bytes]) -> WriteResult:
        """Delete the entries named by ``keys`` (ENOENT for absent ones)."""
        def enc(i: int, seq: int, ack: bool) -> bytes:
            return encode_delete(keys[i], seq, ack=ack)
        return await self._write(len(keys), enc, "deleted")

    async def update(self, keys: Sequence[bytes], *, timeout: int | None = None,
                     mark: int | None = None, tcp_state: int | None = None) -> WriteResult:
        """Change timeout, mark and/or TCP state of existing entries (ENOENT if absent)."""
        def enc(i: int, seq: int, ack: bool) -> bytes:
            return encode_update(keys[i], seq, timeout=timeout, mark=mark,
                                 tcp_state=tcp_state, ack=ack)
        return await self._write(len(keys), enc, "updated")

    async def create_expectations(self, exps: Sequence[ExpectRecord]) -> WriteResult:
        def enc(i: int, seq: int, ack: bool) -> bytes:
            return encode_exp_create(exps[i], seq, ack=ack)
        return await self._write(len(exps), enc, "expectations_created")

    async def _write(self, n: int, enc: Callable[[int, int, bool], bytes],
                     counter: str) -> WriteResult:
        failed: list[tuple[int, int]] = []
        batch = self._cfg.batch_entries
        per_slice = max(self._cfg.slice_entries, batch)
        since_yield = 0
        async with self._lock:
            start = 0
            while start < n:
                stop = min(n, start + batch)
                seq0 = self._next_seq(stop - start)
                parts: list[bytes] = []
                index_of: dict[int, int] = {}
                last_seq = -1
                for i in range(start, stop):
                    seq = seq0 + (i - start)
                    try:
                        parts.append(enc(i, seq, i == stop - 1))
                        index_of[seq] = i
                        last_seq = seq
                    except (RecordError, ValueError, OverflowError):
                        self._n["encode_errors"] += 1
                        failed.append((i, errno.EINVAL))
                if parts:
                    if last_seq != seq0 + (stop - 1 - start):
                        # the entry meant to carry the ACK failed to encode: ask on the last sent
                        parts[-1] = enc(index_of[last_seq], last_seq, True)
                    self._send_batch(b"".join(parts), last_seq, index_of, failed)
                    self._n["batches"] += 1
                since_yield += stop - start
                start = stop
                if since_yield >= per_slice and start < n:
                    since_yield = 0
                    await asyncio.sleep(0)
        ok = n - len(failed)
        self._n[counter] += ok
        self._n["write_errors"] += len(failed)
        failed.sort()
        return WriteResult(n, ok, tuple(failed))

    def _send_batch(self, data: bytes, last_seq: int, index_of: dict[int, int],
                    failed: list[tuple[int, int]]) -> None:
        self._sock.send(data)
        # The kernel handled every message inside send(); read answers until the last one's.
        while True:
            n = self._sock.recv_into(self._buf)
            try:
                out = decode(self._view[:n].tobytes())
            except CodecError:
                self._n["decode_errors"] += 1
                continue
            finished = False
            for ack in out.acks:
                if ack.error:
                    i = index_of.get(ack.seq)
                    if i is not None:
                        failed.append((i, ack.error))
                        self._errors[errno.errorcode.get(ack.error, str(ack.error))] += 1
                if ack.seq == last_seq:
                    finished = True
            if finished:
                return


# -- event socket ------------------------------------------------------------------------------


class ConntrackEvents:
    """The event socket, read from the loop; see the module docstring."""

    def __init__(self, *, on_events: Callable[[list[CtEvent]], None],
                 on_overrun: Callable[[], None] | None = None,
                 on_drained: Callable[[], None] | None = None,
                 on_expectations: Callable[[list[ExpEvent]], None] | None = None,
                 config: KernelConfig | None = None,
                 groups: Sequence[int] = DEFAULT_GROUPS,
                 marks: Container[int] | None = None, mark_mask: int = 0xFFFFFFFF,
                 accept: Callable[[CtEvent], bool] | None = None,
                 drop_portids: Sequence[int] = (), own_portids: Sequence[int] = (),
                 read_budget: int = 4096) -> None:
        cfg = config or KernelConfig()
        self._on_events = on_events
        self._on_overrun = on_overrun
        self._on_drained = on_drained
        # set on ENOBUFS (or by the owner): call on_drained when the queue is next seen empty
        self.drain_wanted = False
        self._on_exp = on_expectations
        self._marks = marks
        self._mask = mark_mask
        self._accept = accept
        self._budget = read_budget
        self._own = frozenset(own_portids) | frozenset(drop_portids)
        self._sock = open_netfilter_socket(rcvbuf=cfg.event_buffer, groups=groups,
                                           nonblocking=True)
        if drop_portids:
            bpf.attach_drop_portids(self._sock, drop_portids)
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.recv_calls = self.messages = self.delivered = self.filtered = 0
        self.echoes = self.enobufs = self.decode_errors = self.expectations = 0
        self._kinds = [0, 0, 0, 0, 0]

    def fileno(self) -> int:
        return self._sock.fileno()

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self.read_ready)

    def close(self) -> None:
        if self._loop is not None and not self._sock._closed:  # type: ignore[attr-defined]
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def statistics(self, *, resyncs: int = 0, held_overflows: int = 0) -> EventStatistics:
        k = self._kinds
        return EventStatistics(
            recv_calls=self.recv_calls, messages=self.messages, new=k[KIND_NEW],
            update=k[KIND_UPDATE], destroy=k[KIND_DESTROY], expectations=self.expectations,
            delivered=self.delivered, filtered=self.filtered, echoes=self.echoes,
            enobufs=self.enobufs, decode_errors=self.decode_errors, resyncs=resyncs,
            held_overflows=held_overflows)

    def read_ready(self) -> None:
        """Drain up to ``read_budget`` receives; called by the loop when readable."""
        out = Decoded([], [], [])
        recv_events = ctnetlink._c_recv_events
        if recv_events is not None:
            overrun, drained = self._read_c(out, recv_events)
        else:
            overrun, drained = self._read_py(out)
        self._deliver(out, overrun, drained)

    def _read_c(self, out: Decoded,
                recv_events: Callable[[int, bytearray, int, list[CtEvent]],
                                      tuple[int, int, bytes | None]]) -> tuple[bool, bool]:
        """The receive loop through the C accelerator: several receives per call, each buffer
        decoded in C as :func:`decode` would; a buffer holding a message the C decoder declines
        comes back from that message on and goes through :func:`decode` (issue 6: the Python
        loop cost ~1 us per event beside the recv itself)."""
        fd, buf = self._sock.fileno(), self._buf
        calls = 0
        limit = self._budget
        overrun = drained = False
        try:
            while calls < limit:
                got, err, rest = recv_events(fd, buf, limit - calls, out.events)
                calls += got
                if rest is not None:
                    try:
                        decode(rest, out)
                    except CodecError:
                        self.decode_errors += 1
                        log.warning("ctnetlink.event_decode_error bytes=%d", len(rest))
                elif err == 0:  # EAGAIN: read empty
                    drained = True
                    break
                elif err == errno.ENOBUFS:  # as in _read_py
                    self.enobufs += 1
                    overrun = True
                    self.drain_wanted = True
                    limit = calls + max(self._budget, DRAIN_CAP)
                elif err > 0:
                    raise OSError(err, os.strerror(err))
        finally:
            self.recv_calls += calls
        return overrun, drained

    def _read_py(self, out: Decoded) -> tuple[bool, bool]:
        # recv_into a reused buffer: a fresh 128 KiB bytes object per event would cost a
        # malloc/free pair (mmap-sized) per message
        recv_into = self._sock.recv_into
        buf, view = self._buf, self._view
        calls = 0
        limit = self._budget
        overrun = drained = False
        try:
            while calls < limit:
                try:
                    n = recv_into(buf)
                    data = view[:n].tobytes()
                except BlockingIOError:
                    drained = True
                    break
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        self.enobufs += 1
                        overrun = True
                        self.drain_wanted = True
                        # what is queued now predates the loss: read it all before a
                        # re-dump starts (bounded, in case the stream never pauses)
                        limit = calls + max(self._budget, DRAIN_CAP)
                        continue
                    raise
                calls += 1
                try:
                    decode(data, out)
                except CodecError:
                    self.decode_errors += 1
                    log.warning("ctnetlink.event_decode_error bytes=%d", len(data))
        finally:
            self.recv_calls += calls
        return overrun, drained

    def _deliver(self, out: Decoded, overrun: bool, drained: bool) -> None:
        events = out.events
        self.messages += len(events) + len(out.expectations)
        kinds = self._kinds
        own = self._own
        marks, mask, accept = self._marks, self._mask, self._accept
        keep: list[CtEvent] = []
        for ev in events:
            kinds[ev.kind] += 1
            if own and ev.portid in own:
                self.echoes += 1
                continue
            if marks is not None and (ev.bucket & mask) not in marks:
                continue
            if accept is not None and not accept(ev):
                continue
            keep.append(ev)
        self.filtered += len(events) - len(keep)
        self.delivered += len(keep)
        if out.expectations:
            self.expectations += len(out.expectations)
            if self._on_exp is not None:
                self._on_exp(out.expectations)
        # Everything read in this call was queued before the queue was last seen empty, hence
        # before any re-dump that starts after it: deliver first, the re-dump supersedes it.
        if keep:
            self._on_events(keep)
        if overrun and self._on_overrun is not None:
            self._on_overrun()
        if drained and self.drain_wanted:
            self.drain_wanted = False
            if self._on_drained is not None:
                self._on_drained()


# -- the two together --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConntrackStatistics:
    """Event reader and request socket snapshots together, and which codec runs the hot paths
    ("c": the lbsync._ctfast accelerator, "python": without it; docs/kernel.md)."""

    events: EventStatistics
    requests: RequestStatistics
    codec: str = CODEC


class Conntrack:
    """Event socket + request socket, with echo suppression and ENOBUFS -> re-dump.

    ``on_events`` gets filtered events; ``on_resync`` gets the complete (mark-filtered) table
    after an overrun, before any event that arrived during the re-dump.
    """

    def __init__(self, *, on_events: Callable[[list[CtEvent]], None],
                 on_resync: Callable[[list[CtEvent]], None] | None = None,
                 on_expectations: Callable[[list[ExpEvent]], None] | None = None,
                 config: KernelConfig | None = None, groups: Sequence[int] = DEFAULT_GROUPS,
                 mark: int | None = None, mark_mask: int = 0xFFFFFFFF,
                 marks: Container[int] | None = None,
                 accept: Callable[[CtEvent], bool] | None = None,
                 suppress_echoes: bool = True, max_held: int = 1 << 20,
                 read_budget: int = 4096) -> None:
        self._cfg = config or KernelConfig()
        self.requests: ConntrackRequests = ConntrackRequests(config=self._cfg)
        self.sweeper = KeyDumper()
        pid = self.requests.portid
        self._user_on_events = on_events
        self._on_resync = on_resync
        self._dump_mark = mark
        self._dump_mask = mark_mask
        self._held: list[CtEvent] | None = None
        self._max_held = max_held
        self._again = False
        self._clean_restart = False
        self._pending = False
        self._task: asyncio.Task[None] | None = None
        self.resyncs = 0
        self.held_overflows = 0
        self.events = ConntrackEvents(
            on_events=self._deliver, on_overrun=self._overrun, on_drained=self._drained,
            on_expectations=on_expectations,
            config=self._cfg, groups=groups, marks=marks, mark_mask=mark_mask, accept=accept,
            drop_portids=(pid,) if suppress_echoes else (), own_portids=(pid,),
            read_budget=read_budget)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.events.start(loop)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.events.close()
        self.requests.close()
        self.sweeper.close()

    def statistics(self) -> ConntrackStatistics:
        return ConntrackStatistics(
            self.events.statistics(resyncs=self.resyncs, held_overflows=self.held_overflows),
            self.requests.statistics())

    @property
    def resyncing(self) -> bool:
        """True from an overrun until the re-dumped table has been delivered."""
        return self._held is not None or self._pending

    async def wait_resynced(self) -> None:
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def _deliver(self, events: list[CtEvent]) -> None:
        held = self._held
        if held is None:
            self._user_on_events(events)
            return
        if len(held) + len(events) > self._max_held:
            # cannot keep the suffix: treat it as a loss (dump again after the next drain)
            self.held_overflows += 1
            held.clear()
            self._again = True
            self._clean_restart = False
            self.events.drain_wanted = True
            return
        held.extend(events)

    # The re-dump protocol. Events are full states, so the consumer ends exact if it gets the
    # table dumped at T and then every event queued after some point P <= T, with no gap after
    # P. P is a moment the event queue was seen empty after the loss ("drained"): events read
    # before P are delivered at once (the table supersedes them), events read after P are
    # held during the dump and replayed after the table. A loss during the dump voids it.

    def _overrun(self) -> None:
        log.warning("ctnetlink.enobufs count=%d", self.events.enobufs)
        if self._task is not None:
            self._again = True
            self._clean_restart = False
        else:
            self._pending = True

    def _drained(self) -> None:
        if self._task is None:
            if self._pending:
                self._pending = False
                self._held = []
                self._task = asyncio.get_running_loop().create_task(self._resync())
        elif self._again and self._held is not None:
            self._held.clear()
            self._clean_restart = True

    async def _resync(self) -> None:
        try:
            while True:
                self.resyncs += 1
                table = await self.requests.dump_all(mark=self._dump_mark,
                                                     mark_mask=self._dump_mask)
                if not self._again:
                    held, self._held = self._held or [], None
                    if self._on_resync is not None:
                        self._on_resync(table)
                    if held:
                        self._user_on_events(held)
                    return
                self._again = False
                if self._clean_restart:
                    self._clean_restart = False
                    continue  # held restarted at a drain after the loss: dump again now
                # not drained since the loss: deliver directly until it is, then start over
                self._held = None
                self._pending = True
                self.events.drain_wanted = True
                return
        finally:
            self._task = None


if TYPE_CHECKING:  # mypy proves the request socket satisfies the protocol the daemon uses
    _table: KernelTable = ConntrackRequests()
