"""Receiver core (sans-IO): every peer's stream, delivered in order, applied per bucket.

Rules, per sender (a peer is identified by its node id and incarnation):
- A lower incarnation than the one known is rejected (``old_incarnation``); a higher one resets
  the peer's stream state and requests a full resync from it (its earlier life's records stay).
- First contact: if the sender still holds its whole stream (oldest == 1 and short), we fetch it
  from sequence 1 by NACKs; otherwise we start at its current position and request a resync.
- DATA: a sequence number below the expected one or already buffered is a duplicate, dropped
  before decoding. Out-of-order datagrams are kept in a reorder buffer of ``reorder_datagrams``
  (beyond it they are dropped, counted, and fetched again later). Delivery is in order only.
- Gaps are repaired per repair block of 16 seqs (``fec.py``) by parities, any of which
  rebuilds any one missing datagram of the block, and NACKed per block: a block known in full
  after a delay that shrinks with what we miss of it (the receiver missing most asks first),
  a block still filling after ``nack_block_wait`` at most; a request names every gap of its
  blocks. A node sends at most one NACK datagram per ``nack_interval``, carrying every block
  (of every sender) due before its next slot. Hearing another receiver's request for a block
  (NACK or repair state), or a parity of it, defers ours by ``repair_wait`` plus the ordered
  delay (its burst serves us too).
- Explicit NACK datagrams only for the first ``nack_explicit`` round(s) of a block, and only
  while no other request for it was heard; after that the node's missing gaps ride on the
  CONTROL datagrams its sender sends anyway (heartbeats, tail probes) as ``RepairState``
  messages (:meth:`Receiver.repair_state`), each gap at most once per ``repair_quiet``. A gap
  no such datagram carried for ``nack_fallback`` is NACKed again explicitly (a node that
  sends no heartbeats; counted as ``nack_fallbacks``). Rebuilt datagrams go back
  through the endpoint's whole acceptance path (their own MAC). ``Gone`` skips the gap (the sender
  resyncs the affected buckets). A signed but malformed DATA datagram is skipped the same way
  and a full resync from its sender is requested.
- CONTROL: replay-checked with a bounded window over the control counter.
- Records are applied per bucket through the store's owner_epoch rule, never per sender. A
  resync answer (begin .. end) drops, at its end, the bucket's keys not written since its begin.
- A sender silent for ``silent_after`` is reported once; its records stay.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from lbsync.replication import fec
from lbsync.replication.auth import ReplayWindow
from lbsync.replication.events import (
    BucketResynced,
    DatagramsGone,
    DigestCompared,
    Event,
    MembershipReceived,
    RecordRefused,
    RecordsApplied,
    SenderJoined,
    SenderRestarted,
    SenderResumed,
    SenderSilent,
)
from lbsync.replication.params import ProtocolParams
from lbsync.replication.store import EXPECTATION, FLOW, BucketStore, Outcome
from lbsync.replication.wire import (
    FIRST_SEQ,
    TYPE_DATA,
    U32,
    BucketDigest,
    ExpectationDelete,
    ExpectationUpdate,
    FlowDelete,
    FlowUpdate,
    Gone,
    Header,
    HighWater,
    Limits,
    Membership,
    Message,
    Nack,
    Parity,
    RecordMessage,
    RemoteProtocolError,
    RepairState,
    ResyncBegin,
    ResyncDone,
    ResyncEnd,
    ResyncRequest,
    decode_body,
    encode_message,
    unwrap,
)


def _rank(sender: int, first: int, node: int) -> int:
    """A receiver's place among the receivers of ``sender``'s stream for the repair block at
    ``first``: the same on every node (no ``hash()``), different per block (the duty
    rotates), ties impossible (the node id is the low byte)."""
    x = (sender * 0x9E3779B1 + ((first & U32) // fec.BLOCK) * 0x85EBCA77 + node * 0xC2B2AE3D) \
        & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    return (x & 0xFFFFFF) << 8 | node


def block_ranges(blocks: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first wire seq, count) runs of the seqs a ``RepairState``'s block masks name."""
    out: list[tuple[int, int]] = []
    for first, mask in blocks:
        i = 0
        while mask >> i:
            if mask >> i & 1:
                j = i
                while mask >> j & 1:
                    j += 1
                out.append(((first + i) & U32, j - i))
                i = j
            else:
                i += 1
    return out


@dataclass(frozen=True, slots=True)
class ReceiverStatistics:
    """Snapshot of a :class:`Receiver`."""

    peers: int
    datagrams_delivered: int
    records_applied: int
    records_stale: int
    records_refused: int
    duplicates: int
    reorder_buffered: int
    reorder_overflow: int
    gaps_detected: int
    gaps_open: int
    nack_messages: int
    nacked_seqs: int
    nacks_suppressed: int
    parities_received: int
    datagrams_rebuilt: int
    gone_seqs: int
    resync_requests: int
    resyncs_completed: int
    digests_agreed: int
    digests_disagreed: int
    silent_peers: int
    buckets_disagreeing: tuple[int, ...]  # last digest comparison failed (until repaired)
    repair_states_sent: int = 0  # RepairState messages piggybacked on outgoing datagrams
    repair_state_seqs: int = 0  # gaps they named
    repair_states_heard: int = 0  # other receivers' RepairState messages (suppression)
    nack_fallbacks: int = 0  # NACK datagrams because no datagram carried a repair state


class _Gap:
    __slots__ = ("attempts", "carried", "due", "quiet")

    def __init__(self, due: float) -> None:
        self.due = due  # next explicit NACK (carried: the fallback one)
        self.attempts = 0
        # No repair state names it before this: it was just asked for (by us or by another
        # receiver) and the burst may be on its way.
        self.quiet = -1e300
        self.carried = False  # asked for in repair states from now on


class _Peer:
    __slots__ = ("buffer", "ctl", "end", "explicit", "heard", "incarnation", "last_heard",
                 "missing", "next", "node", "parities", "raw", "raw_floor", "restarted",
                 "silent", "synced", "tracked", "whole")

    def __init__(self, node: int, incarnation: int, now: float, window: int) -> None:
        self.node = node
        self.incarnation = incarnation
        self.synced = False
        self.restarted = False
        self.next = FIRST_SEQ  # everything below is delivered or skipped
        self.end = FIRST_SEQ  # one past the highest sequence number known to exist
        self.tracked = FIRST_SEQ  # gaps below this are in ``missing`` (or delivered/buffered)
        self.whole = FIRST_SEQ  # the repair blocks below this are known to exist in full
        self.buffer: dict[int, list[Message]] = {}
        self.missing: dict[int, _Gap] = {}
        # The signed bytes of the datagrams of the repair blocks from ``raw_floor`` on (the
        # known columns when rebuilding missing ones from parities) and the parities held.
        self.raw: dict[int, bytes] = {}
        self.raw_floor = FIRST_SEQ
        self.parities: dict[int, list[tuple[int, int, bytes]]] = {}
        # Per open repair block (first seq): explicit NACK datagrams we sent for it, and the
        # blocks another receiver's request (or a parity) was heard for. Both dropped with the
        # block, so bounded by the reorder window.
        self.explicit: dict[int, int] = {}
        self.heard: set[int] = set()
        self.ctl = ReplayWindow(window)
        self.last_heard = now
        self.silent = False


@dataclass(slots=True)
class _Request:
    target: int
    token: int
    buckets: tuple[int, ...]
    due: float
    attempts: int = 0


@dataclass(slots=True)
class _OpenResync:
    sender: int
    touched: set[tuple[int, bytes]]


class Receiver:
    """All peers' incoming streams for one node; control messages to send go to ``control``."""

    def __init__(self, *, node_id: int, params: ProtocolParams, store: BucketStore,
                 rng: random.Random, now: float, nodes: Iterable[int] = ()) -> None:
        self.node_id = node_id
        self._p = params
        # The farm's configured nodes: until ``silent_after`` into our life, one we have not
        # heard yet still counts in the choice of a block's designated NACKers (below).
        self._nodes = tuple(set(nodes) - {node_id})
        self._born = now
        self._store = store
        self._rng = rng
        self._limits = Limits(buckets=params.buckets, max_datagram=params.max_datagram,
                              max_key=params.max_key)
        self._peers: dict[int, _Peer] = {}
        self._requests: list[_Request] = []
        # Resync request tokens: a random start, not 0. A peer's ResyncDone names the requester
        # by node id and token only; counted from 0 again after a restart, our new life's first
        # request would be taken as done by the answer to our former life's first request.
        self._token = rng.getrandbits(32)
        self._open: dict[int, _OpenResync] = {}
        self._nack_slot = now  # no NACK datagram before this (one per nack_interval)
        self._gaps_due: float | None = None
        self._gaps_dirty = False
        self.control: list[Message] = []
        self.events: list[Event] = []
        # DATA datagrams rebuilt from parities: the endpoint authenticates and feeds them back.
        self.rebuilt: list[bytes] = []
        self.datagrams_delivered = 0
        self.records_applied = 0
        self.records_stale = 0
        self.records_refused = 0
        self.duplicates = 0
        self.reorder_overflow = 0
        self.gaps_detected = 0
        self.nack_messages = 0
        self.nacked_seqs = 0
        self.nacks_suppressed = 0
        self.repair_states_sent = 0
        self.repair_state_seqs = 0
        self.repair_states_heard = 0
        self.nack_fallbacks = 0
        self.parities_received = 0
        self.datagrams_rebuilt = 0
        self.gone_seqs = 0
        self.resync_requests = 0
        self.resyncs_completed = 0
        self.digests_agreed = 0
        self.digests_disagreed = 0
        self.digest_state: dict[int, bool] = {}  # bucket -> last comparison agreed

    # -- entry points ------------------------------------------------------------------------

    def datagram(self, h: Header, body: bytes, now: float, data: bytes = b"") -> list[Message]:
        """Process an authenticated datagram (``data``: all its bytes, kept for rebuilding
        lost ones from parities); returns the control messages addressed to this node's sender
        (NACKs, resync requests). Raises :class:`RemoteProtocolError`."""
        peer = self._peer(h, now)
        if h.type == TYPE_DATA:
            self._data(peer, h, body, now, data)
            return []
        counter = unwrap(h.seq, max(peer.ctl.highest, 1))
        if not peer.ctl.check_and_set(counter):
            raise RemoteProtocolError("replayed")
        return self._control(peer, decode_body(body, h.type, self._limits), h, now)

    def request_resync(self, target: int, buckets: Iterable[int], now: float) -> None:
        """Ask ``target`` for ``buckets`` (empty: all it owns), retried until it is done."""
        wanted = tuple(sorted(set(buckets)))
        for r in self._requests:
            if r.target == target and (not r.buckets or r.buckets == wanted):
                return  # already asked for these (or for everything)
        if not wanted:
            self._requests = [r for r in self._requests if r.target != target]
        self._token = (self._token + 1) & U32
        self._requests.append(_Request(target, self._token, wanted,
                                       now + self._rng.uniform(0, self._p.nack_delay)))

    # -- peers -------------------------------------------------------------------------------

    def _peer(self, h: Header, now: float) -> _Peer:
        peer = self._peers.get(h.sender)
        if peer is None:
            peer = _Peer(h.sender, h.incarnation, now, self._p.control_window)
            self._peers[h.sender] = peer
            self.events.append(SenderJoined(h.sender, h.incarnation))
        elif h.incarnation < peer.incarnation:
            raise RemoteProtocolError("old_incarnation")
        elif h.incarnation > peer.incarnation:
            old = peer.incarnation
            peer = _Peer(h.sender, h.incarnation, now, self._p.control_window)
            self._peers[h.sender] = peer
            self._requests = [r for r in self._requests if r.target != h.sender]
            self.events.append(SenderRestarted(h.sender, old, h.incarnation))
            peer.restarted = True
            self.request_resync(h.sender, (), now)
        if peer.silent:
            peer.silent = False
            self.events.append(SenderResumed(peer.node))
        peer.last_heard = now
        return peer

    def _sync(self, peer: _Peer, last: int, oldest: int, now: float) -> None:
        """First contact with a stream: where to start it (``last`` = highest seq known)."""
        peer.synced = True
        if not peer.restarted and oldest == FIRST_SEQ \
                and last - FIRST_SEQ < self._p.reorder_datagrams:
            return  # the sender still holds its whole stream: fetch it from the start
        # Start at the current position; a full resync (requested here, or already on the
        # incarnation change) covers everything before it.
        peer.next = peer.end = peer.tracked = last + 1
        if not peer.restarted:
            self.request_resync(peer.node, (), now)

    # -- DATA --------------------------------------------------------------------------------

    def _data(self, peer: _Peer, h: Header, body: bytes, now: float, data: bytes) -> None:
        if not peer.synced:
            self._sync(peer, h.seq - 1, h.oldest, now)
        seq = unwrap(h.seq, peer.next)
        if seq < peer.next or seq in peer.buffer:
            self.duplicates += 1
            raise RemoteProtocolError("duplicate")
        if seq >= peer.next + self._p.reorder_datagrams:
            self.reorder_overflow += 1
            if seq + 1 > peer.end:
                peer.end = seq + 1
            self._deliver(peer, now)  # the numbers below it that fit the window become gaps
            raise RemoteProtocolError("reorder_overflow")
        if data:
            peer.raw[seq] = data
        try:
            messages = decode_body(body, h.type, self._limits)
        except RemoteProtocolError:
            # Signed by a cluster key but undecodable: a buggy peer. Skip the number for good
            # (a retransmission would carry the same bytes) and resync everything it owns.
            self.request_resync(peer.node, (), now)
            self._accept(peer, seq, [], now)
            raise
        self._accept(peer, seq, messages, now)

    def _accept(self, peer: _Peer, seq: int, messages: list[Message], now: float) -> None:
        peer.buffer[seq] = messages
        peer.missing.pop(seq, None)
        if seq + 1 > peer.end:
            peer.end = seq + 1
        self._deliver(peer, now)

    def _deliver(self, peer: _Peer, now: float) -> None:
        buf = peer.buffer
        while peer.next in buf:
            messages = buf.pop(peer.next)
            peer.next += 1
            self.datagrams_delivered += 1
            if messages:
                self._apply(peer.node, messages, now)
        floor = peer.next - (peer.next - FIRST_SEQ) % fec.BLOCK
        if floor > peer.raw_floor:
            self._forget_blocks(peer, floor)
        if peer.tracked < peer.next:
            peer.tracked = peer.next
        limit = min(peer.end, peer.next + self._p.reorder_datagrams)
        block = fec.BLOCK
        whole = peer.end - (peer.end - FIRST_SEQ) % block
        nack_delay = self._p.nack_delay
        uniform = self._rng.uniform
        if whole > peer.whole:
            # Blocks now known in full: their gaps are asked for together, after the
            # suppression delay (a gap of an unfinished block waits for the rest of it).
            missing = peer.missing
            if missing:
                lo = max(peer.whole, peer.next)
                lo -= (lo - FIRST_SEQ) % block
                for first in range(lo, min(whole, peer.tracked), block):
                    gaps = [missing[s] for s in range(first, first + block) if s in missing]
                    if not gaps:
                        continue
                    due = now + self._ordered(peer, first)
                    for gap in gaps:
                        if gap.attempts == 0 and gap.due > due:
                            gap.due = due
                            self._gaps_dirty = True
            peer.whole = whole
        if peer.tracked < limit:
            for seq in range(peer.tracked, limit):
                if seq not in buf:
                    due = now + uniform(0, nack_delay)
                    if seq >= whole:
                        due += self._p.nack_block_wait
                    peer.missing[seq] = _Gap(due)
                    self.gaps_detected += 1
            peer.tracked = limit
            self._gaps_dirty = True

    def _forget_blocks(self, peer: _Peer, floor: int) -> None:
        """Drop the raw datagrams and parities of the repair blocks wholly below ``floor``."""
        if floor - peer.raw_floor <= 2 * fec.BLOCK:
            raw, parities = peer.raw, peer.parities
            for s in range(peer.raw_floor, floor):
                raw.pop(s, None)
            for s in range(peer.raw_floor, floor, fec.BLOCK):
                parities.pop(s, None)
        else:
            peer.raw = {s: d for s, d in peer.raw.items() if s >= floor}
            peer.parities = {s: p for s, p in peer.parities.items() if s >= floor}
        if peer.explicit:
            peer.explicit = {s: n for s, n in peer.explicit.items() if s >= floor}
        if peer.heard:
            peer.heard = {s for s in peer.heard if s >= floor}
        peer.raw_floor = floor

    # -- parities ------------------------------------------------------------------------

    def _parity(self, peer: _Peer, m: Parity, now: float) -> None:
        self.parities_received += 1
        first = unwrap(m.first, peer.next)
        if (first - FIRST_SEQ) % fec.BLOCK or first < peer.raw_floor \
                or first >= peer.next + self._p.reorder_datagrams:
            return  # not a block boundary, an old block, or beyond the reorder window
        stop = first + m.count
        if stop > peer.end:  # the parity reveals datagrams we did not know of (a lost tail)
            peer.end = stop
            self._deliver(peer, now)
        held = peer.parities.setdefault(first, [])
        if len(held) >= 2 * fec.BLOCK or any(r == m.row for r, _c, _p in held):
            return
        held.append((m.row, m.count, m.payload))
        if not self._rebuild(peer, first):
            peer.heard.add(first)
            # A repair of this block is under way (asked by us or by another receiver): let
            # the rest of its burst arrive before asking again.
            wait = now + self._p.repair_wait + self._ordered(peer, first)
            missing = peer.missing
            for s in range(first, first + fec.BLOCK):
                gap = missing.get(s)
                if gap is not None:
                    self._defer(gap, wait)

    def _ordered(self, peer: _Peer, first: int) -> float:
        """Delay before asking for a block: the more we miss of it, the sooner, so that the
        receiver missing most asks first and the others, hearing it, wait for its burst."""
        block = fec.BLOCK
        missing = peer.missing
        need = sum(1 for s in range(first, first + block) if s in missing)
        need -= len(peer.parities.get(first, ()))
        need = min(max(need, 1), block)
        return self._p.nack_delay * (block - need + self._rng.random()) / block

    def _rebuild(self, peer: _Peer, first: int) -> bool:
        held = peer.parities[first]
        raw = peer.raw
        columns = max(c for _r, c, _p in held)
        unknown = [i for i in range(columns) if first + i not in raw]
        wanted = [i for i in unknown
                  if first + i >= peer.next and first + i not in peer.buffer]
        if not wanted:
            if not unknown:
                del peer.parities[first]
            return True
        if len(held) < len(unknown):
            return False
        known = {i: raw[first + i] for i in range(columns) if first + i in raw}
        out = fec.solve(known, unknown, held)
        if out is None:
            return False
        del peer.parities[first]
        for i in wanted:
            self.rebuilt.append(out[i])
        self.datagrams_rebuilt += len(wanted)
        return True

    # -- applying ----------------------------------------------------------------------------

    def _apply(self, sender: int, messages: list[Message], now: float) -> None:
        store = self._store
        opened = self._open
        applied: list[RecordMessage] = []
        for m in messages:
            t = type(m)
            if t is FlowUpdate or t is ExpectationUpdate:
                assert isinstance(m, FlowUpdate | ExpectationUpdate)
                kind = FLOW if t is FlowUpdate else EXPECTATION
                r = store.put(kind, m.bucket, m.owner_epoch, m.key, m.record)
            elif t is FlowDelete or t is ExpectationDelete:
                assert isinstance(m, FlowDelete | ExpectationDelete)
                kind = FLOW if t is FlowDelete else EXPECTATION
                r = store.delete(kind, m.bucket, m.owner_epoch, m.key)
            else:
                self._apply_marker(sender, m, now)
                continue
            if r is Outcome.APPLIED:
                applied.append(m)
                if opened:
                    o = opened.get(m.bucket)
                    if o is not None:
                        o.touched.add((kind, m.key))
            elif r is Outcome.STALE:
                self.records_stale += 1
            else:
                self.records_refused += 1
                self.events.append(RecordRefused(sender, m.bucket, m.key))
        if applied:
            self.records_applied += len(applied)
            self.events.append(RecordsApplied(sender, tuple(applied)))

    def _apply_marker(self, sender: int, m: Message, now: float) -> None:
        store = self._store
        if isinstance(m, ResyncBegin):
            if store.raise_epoch(m.bucket, m.owner_epoch) is Outcome.APPLIED:
                self._open[m.bucket] = _OpenResync(sender, set())
        elif isinstance(m, ResyncEnd):
            if store.raise_epoch(m.bucket, m.owner_epoch) is not Outcome.APPLIED:
                return
            o = self._open.pop(m.bucket, None)
            purged = 0
            if o is not None and o.sender == sender:
                purged = store.purge(m.bucket, o.touched)
            agreed = store.digest(m.bucket) == (m.count, m.digest)
            self.resyncs_completed += 1
            self._digest_result(sender, m.bucket, agreed, now)
            self.events.append(BucketResynced(sender, m.bucket, purged, agreed))
        elif isinstance(m, BucketDigest):
            if m.bucket in self._open or \
                    store.raise_epoch(m.bucket, m.owner_epoch) is not Outcome.APPLIED:
                return  # mid-resync or from a former owner: not comparable
            agreed = store.digest(m.bucket) == (m.count, m.digest)
            self._digest_result(sender, m.bucket, agreed, now)
            self.events.append(DigestCompared(sender, m.bucket, agreed))
        elif isinstance(m, ResyncDone) and m.requester == self.node_id:
            self._requests = [r for r in self._requests
                              if not (r.target == sender and r.token == m.token)]

    def _digest_result(self, sender: int, bucket: int, agreed: bool, now: float) -> None:
        self.digest_state[bucket] = agreed
        if agreed:
            self.digests_agreed += 1
            return
        self.digests_disagreed += 1
        if self._p.auto_repair:
            self.request_resync(sender, (bucket,), now)

    # -- CONTROL -----------------------------------------------------------------------------

    def _control(self, peer: _Peer, messages: list[Message], h: Header,
                 now: float) -> list[Message]:
        mine: list[Message] = []
        for m in messages:
            if isinstance(m, HighWater):
                self._high_water(peer, m.last_seq, h.oldest, now)
            elif isinstance(m, Nack):
                if m.target == self.node_id:
                    mine.append(m)
                else:
                    self._overheard(m.target, m.incarnation, m.ranges, now)
            elif isinstance(m, RepairState):
                if m.target == self.node_id:
                    mine.append(m)
                else:
                    self.repair_states_heard += 1
                    self._overheard(m.target, m.incarnation, block_ranges(m.blocks), now)
            elif isinstance(m, Parity):
                self._parity(peer, m, now)
            elif isinstance(m, Gone):
                self._gone(peer, m, now)
            elif isinstance(m, ResyncRequest):
                if m.target == self.node_id:
                    mine.append(m)
            elif isinstance(m, Membership):
                self.events.append(MembershipReceived(peer.node, peer.incarnation, m.subkind,
                                                      m.payload))
        return mine

    def _high_water(self, peer: _Peer, wire_last: int, wire_oldest: int, now: float) -> None:
        if not peer.synced:
            self._sync(peer, wire_last, wire_oldest, now)
        last = unwrap(wire_last, peer.next)
        if last + 1 > peer.end:
            peer.end = last + 1
        self._deliver(peer, now)

    def _overheard(self, target: int, incarnation: int, ranges: Iterable[tuple[int, int]],
                   now: float) -> None:
        """Another receiver's request (NACK or repair state) for ``target``: its sender answers
        each repair block named with a burst of parities, which rebuild ours of that block too
        (any parity serves any receiver). So our own request for such a block waits for that
        burst: ``repair_wait`` plus the need-ordered delay. If the burst leaves us short, or
        never comes (the request was lost on its way to the sender), we ask then, before those
        who miss less, in a repair state (the block was asked for: no NACK datagram)."""
        peer = self._peers.get(target)
        if peer is None or peer.incarnation != incarnation or not peer.missing:
            return
        block = fec.BLOCK
        low = peer.next - (peer.next - FIRST_SEQ) % block
        high = peer.next + self._p.reorder_datagrams
        firsts: set[int] = set()
        for wire_start, count in ranges:
            origin = unwrap(wire_start, peer.next)
            start = max(origin, low)
            stop = min(origin + count, high)
            start -= (start - FIRST_SEQ) % block
            firsts.update(range(start, stop, block))
        missing = peer.missing
        for first in firsts:
            mine = [missing[s] for s in range(first, first + block) if s in missing]
            if not mine:
                continue
            peer.heard.add(first)
            wait = now + self._p.repair_wait + self._ordered(peer, first)
            for gap in mine:
                self._defer(gap, wait)
                self.nacks_suppressed += 1

    def _defer(self, gap: _Gap, wait: float) -> None:
        """The gap's block is being repaired (a request or a parity heard): no request of ours
        before ``wait``, and, once in repair states, the fallback NACK counts from then."""
        if gap.quiet < wait:
            gap.quiet = wait
        due = wait + self._p.nack_fallback if gap.carried else wait
        if gap.due < due:
            gap.due = due
            self._gaps_dirty = True

    def _gone(self, peer: _Peer, m: Gone, now: float) -> None:
        skipped = 0
        for wire_start, count in m.ranges:
            origin = unwrap(wire_start, peer.next)
            # Count from the range's own start: clipped to ``next`` first, it would skip
            # datagrams past the range (not gone, and their buckets not resynced).
            start = max(origin, peer.next)
            stop = min(origin + count, peer.end)
            if start >= stop:
                continue
            if start == peer.next:
                # Deliver what we hold inside the range in order, skip the rest at once.
                for seq in sorted(s for s in peer.buffer if s < stop):
                    messages = peer.buffer.pop(seq)
                    self.datagrams_delivered += 1
                    if messages:
                        self._apply(peer.node, messages, now)
                skipped += stop - peer.next
                peer.next = stop
                for s in [s for s in peer.missing if s < stop]:
                    del peer.missing[s]
            else:
                for seq in range(start, min(stop, peer.next + self._p.reorder_datagrams)):
                    if seq not in peer.buffer:
                        peer.buffer[seq] = []
                        peer.missing.pop(seq, None)
                        skipped += 1
        if skipped:
            self.gone_seqs += skipped
            self.events.append(DatagramsGone(peer.node, skipped, m.buckets))
            self._deliver(peer, now)

    # -- timers ------------------------------------------------------------------------------

    def _retry(self, attempts: int) -> float:
        base = min(self._p.nack_retry * (1 << min(attempts - 1, 16)), self._p.nack_retry_max)
        return base * self._rng.uniform(1.0, 1.5)

    def _nack(self, peer: _Peer, now: float, horizon: float) -> None:
        """Explicit NACKs for the blocks with a gap due before ``horizon``: a block not yet
        NACKed ``nack_explicit`` times by us and not asked for by anyone else we heard; the
        others' gaps turn to repair states (and a NACK only if none carried them for
        ``nack_fallback``)."""
        p = self._p
        missing = peer.missing
        block = fec.BLOCK
        firsts = sorted({s - (s - FIRST_SEQ) % block for s, g in missing.items()
                         if g.due <= horizon})
        named: list[int] = []
        for first in firsts:
            seqs = [s for s in range(first, first + block) if s in missing]
            gaps = [missing[s] for s in seqs]
            rounds = peer.explicit.get(first, 0)
            if rounds < p.nack_explicit and first not in peer.heard \
                    and self._designated(peer, first, now):
                rounds += 1
                peer.explicit[first] = rounds
                last = rounds >= p.nack_explicit
            elif any(g.carried and g.due <= now for g in gaps):
                self.nack_fallbacks += 1  # no repair state left for nack_fallback
                last = True
            else:
                for g in gaps:
                    if g.due <= now and not g.carried:
                        g.carried = True
                        g.due = now + p.nack_fallback
                continue
            # Every gap of the block: the sender sizes its parity burst by the number named.
            named.extend(seqs)
            for g in gaps:
                g.attempts += 1
                g.quiet = now + p.repair_quiet
                if last:
                    g.carried = True
                    g.due = now + p.nack_fallback
                else:
                    g.due = now + self._retry(g.attempts)
        if not named:
            return
        ranges: list[tuple[int, int]] = []
        for s in named:
            if ranges and ranges[-1][0] + ranges[-1][1] == s:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
            else:
                ranges.append((s, 1))
        limit = self._limits.max_ranges
        for i in range(0, len(ranges), limit):
            chunk = tuple((s & U32, c) for s, c in ranges[i:i + limit])
            self.control.append(Nack(peer.node, peer.incarnation, chunk))
            self.nack_messages += 1
        self.nacked_seqs += len(named)

    def _designated(self, peer: _Peer, first: int, now: float) -> bool:
        """Whether this node is one of the ``nack_designated`` receivers of ``peer``'s stream
        allowed an explicit NACK for the block at ``first``: those with the lowest
        :func:`_rank` among the nodes heard and not silent, and, during our first
        ``silent_after``, the configured nodes not heard yet (at a stream's start a receiver
        that has not heard every other node would otherwise count itself in too often: three
        NACKs for one gap). Every receiver computes the same set once it has heard every
        live node. The others' requests ride on their heartbeats."""
        k = self._p.nack_designated
        if k <= 0:
            return True
        candidates = [n for n, other in self._peers.items() if not other.silent]
        if now - self._born < self._p.silent_after:
            candidates += [n for n in self._nodes if n not in self._peers]
        mine = _rank(peer.node, first, self.node_id)
        lower = sum(1 for n in candidates
                    if n != peer.node and _rank(peer.node, first, n) < mine)
        return lower < k

    def repair_state(self, now: float, room: int) -> list[bytes]:
        """``RepairState`` messages (encoded, at most ``room`` bytes in all) for a CONTROL
        datagram our sender is sending anyway: per peer, every gap of each repair block with a
        gap that is due, or asked for before and still missing, unless asked for within
        ``repair_quiet`` (by us or by a receiver we heard). The gaps named count as asked now."""
        p = self._p
        block = fec.BLOCK
        out: list[bytes] = []
        for peer in self._peers.values():
            missing = peer.missing
            if not missing or room < 16:
                continue
            firsts = sorted({s - (s - FIRST_SEQ) % block for s, g in missing.items()
                             if (g.carried or g.due <= now) and g.quiet <= now})
            if not firsts:
                continue
            # Worst case per block: 5 bytes of seq and 3 of mask; 12 for the message's frame.
            firsts = firsts[:min(self._limits.max_ranges, (room - 12) // 8)]
            if not firsts:
                continue
            blocks: list[tuple[int, int]] = []
            quiet, fallback = now + p.repair_quiet, now + p.nack_fallback
            for first in firsts:
                mask = 0
                for s in range(first, first + block):
                    g = missing.get(s)
                    if g is not None:
                        mask |= 1 << (s - first)
                        g.quiet = quiet
                        g.carried = True
                        if g.due < fallback:
                            g.due = fallback
                            self._gaps_dirty = True
                        self.repair_state_seqs += 1
                blocks.append((first & U32, mask))
            part = encode_message(RepairState(peer.node, peer.incarnation, tuple(blocks)))
            out.append(part)
            room -= len(part)
            self.repair_states_sent += 1
        return out

    def get_timer(self) -> float | None:
        t: float | None = None
        if self._gaps_dirty:
            # Cached: scanning every gap after every datagram would be quadratic under heavy
            # loss. Removing a gap leaves the cache early, which is harmless (the timer fires,
            # finds nothing due, and the next call recomputes).
            self._gaps_due = min((g.due for p in self._peers.values()
                                  for g in p.missing.values()), default=None)
            self._gaps_dirty = False
        if self._gaps_due is not None:
            t = max(self._gaps_due, self._nack_slot)
        for peer in self._peers.values():
            if not peer.silent:
                d = peer.last_heard + self._p.silent_after
                if t is None or d < t:
                    t = d
        for r in self._requests:
            if t is None or r.due < t:
                t = r.due
        return t

    def handle_timer(self, now: float) -> None:
        self._gaps_dirty = True
        # When any gap is due, every gap (of any sender) due within the next nack_delay rides
        # along: one NACK datagram instead of several.
        anything_due = now >= self._nack_slot and any(
            g.due <= now for p in self._peers.values() for g in p.missing.values())
        horizon = now + self._p.nack_interval
        sent = self.nack_messages
        for peer in self._peers.values():
            if anything_due and peer.missing:
                self._nack(peer, now, horizon)
            if not peer.silent and now >= peer.last_heard + self._p.silent_after:
                peer.silent = True
                self.events.append(SenderSilent(peer.node, peer.last_heard))
        if self.nack_messages != sent:
            self._nack_slot = horizon
        for r in self._requests:
            if r.due <= now:
                self.control.append(ResyncRequest(r.target, r.token, r.buckets))
                self.resync_requests += 1
                r.attempts += 1
                r.due = now + min(self._p.resync_timeout * (1 << min(r.attempts - 1, 16)),
                                  self._p.resync_timeout_max)

    # -- introspection -----------------------------------------------------------------------

    def peer_position(self, node: int) -> tuple[int, int, int] | None:
        """(incarnation, next expected seq, open gaps) of a peer, or None."""
        peer = self._peers.get(node)
        if peer is None:
            return None
        return peer.incarnation, peer.next, len(peer.missing)

    def pending_resyncs(self) -> int:
        return len(self._requests)

    def statistics(self) -> ReceiverStatistics:
        peers = self._peers.values()
        return ReceiverStatistics(
            len(self._peers), self.datagrams_delivered, self.records_applied,
            self.records_stale, self.records_refused, self.duplicates,
            sum(len(p.buffer) for p in peers), self.reorder_overflow, self.gaps_detected,
            sum(len(p.missing) for p in peers), self.nack_messages, self.nacked_seqs,
            self.nacks_suppressed, self.parities_received, self.datagrams_rebuilt,
            self.gone_seqs, self.resync_requests,
            self.resyncs_completed, self.digests_agreed, self.digests_disagreed,
            sum(1 for p in peers if p.silent),
            tuple(sorted(b for b, ok in self.digest_state.items() if not ok)),
            self.repair_states_sent, self.repair_state_seqs, self.repair_states_heard,
            self.nack_fallbacks)
