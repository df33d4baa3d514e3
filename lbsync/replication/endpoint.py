"""One node's replication endpoint (sans-IO): authentication, its sender and its receiver.

The caller (the asyncio transport, the simulation) feeds datagrams and time in and takes
datagrams, one deadline and events out, like aioquic's ``QuicConnection``::

    ep.datagram_received(data, now)     # authenticate, then hand to the receiver
    ep.update_flow(bucket, key, record, now)
    ep.handle_timer(now)                # when now >= ep.get_timer()
    for d in ep.datagrams_to_send(): transmit d to the whole group (or every unicast peer)
    while (e := ep.next_event()) is not None: ...

Every datagram goes to every peer: NACKs are heard by the other receivers (suppression),
retransmissions reach every receiver that missed the same datagram.

Acceptance order for a datagram (nothing is parsed before it is authenticated): size cap,
fixed header (magic, version, type, flags, sender), MAC with the named key, own-node check,
incarnation and replay/duplicate check, then msgpack decoding with limits. Any failure is one
counted reason in ``statistics().rejected``; no exception leaves :meth:`datagram_received`.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from lbsync.replication.auth import KeyRing
from lbsync.replication.events import Event
from lbsync.replication.params import ProtocolParams
from lbsync.replication.receiver import Receiver, ReceiverStatistics, block_ranges
from lbsync.replication.sender import Sender, SenderStatistics
from lbsync.replication.store import EXPECTATION, FLOW, BucketStore, Outcome, StoreStatistics
from lbsync.replication.wire import (
    HEADER_LEN,
    MAC_LEN,
    OVERHEAD,
    LocalProtocolError,
    Membership,
    Nack,
    RemoteProtocolError,
    RepairState,
    ResyncRequest,
    parse_header,
)


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    """Snapshot of a :class:`ReplicationEndpoint`."""

    node_id: int
    incarnation: int
    datagrams_received: int
    rejected: Mapping[str, int]
    sender: SenderStatistics
    receiver: ReceiverStatistics
    store: StoreStatistics


class ReplicationEndpoint:
    """Sender, receiver and the per-bucket store of one node."""

    def __init__(self, *, node_id: int, incarnation: int, keyring: KeyRing,
                 params: ProtocolParams, now: float, rng: random.Random | None = None,
                 store: BucketStore | None = None, nodes: Iterable[int] = ()) -> None:
        """``nodes``: the farm's configured node ids, if known (the receiver's choice of
        designated NACKers uses them before it has heard every node)."""
        self.node_id = node_id
        self.incarnation = incarnation
        self.params = params
        self.keyring = keyring
        self.store = store if store is not None else BucketStore(params.buckets)
        if self.store.buckets != params.buckets:
            raise LocalProtocolError("store and params disagree on the bucket count")
        self._rng = rng if rng is not None else random.Random()
        self.sender = Sender(node_id=node_id, incarnation=incarnation, keyring=keyring,
                             params=params, store=self.store, now=now)
        self.receiver = Receiver(node_id=node_id, params=params, store=self.store,
                                 rng=self._rng, now=now, nodes=nodes)
        # Our missing gaps ride on the CONTROL datagrams we send anyway.
        self.sender.piggyback = self.receiver.repair_state
        self._events: deque[Event] = deque()
        self._rejected: Counter[str] = Counter()
        self.datagrams_received = 0

    # -- ownership and local changes ---------------------------------------------------------

    def claim(self, bucket: int, owner_epoch: int, now: float, *, announce: bool = True
              ) -> None:
        """This node owns ``bucket`` from now on, under ``owner_epoch``; with ``announce`` its
        content is streamed to the peers (paced), so they reconcile with it."""
        self.sender.claim(bucket, owner_epoch, now, announce=announce)

    def release(self, bucket: int) -> None:
        self.sender.release(bucket)

    def update_flow(self, bucket: int, key: bytes, record: bytes, now: float) -> Outcome:
        return self.sender.update(FLOW, bucket, key, record, now)

    def delete_flow(self, bucket: int, key: bytes, now: float) -> Outcome:
        return self.sender.delete(FLOW, bucket, key, now)

    def write_flows(self, changes: Iterable[tuple[int, bytes, bytes | None]],
                    now: float) -> int:
        """``update_flow`` (record given) or ``delete_flow`` (record None) of each
        ``(bucket, key, record)``, in order, in one call; the number of records queued."""
        return self.sender.write(FLOW, changes, now)

    def update_expectation(self, bucket: int, key: bytes, record: bytes,
                           now: float) -> Outcome:
        return self.sender.update(EXPECTATION, bucket, key, record, now)

    def delete_expectation(self, bucket: int, key: bytes, now: float) -> Outcome:
        return self.sender.delete(EXPECTATION, bucket, key, now)

    def send_digests(self, buckets: Iterable[int], now: float) -> int:
        """Queue in-stream digests of owned buckets (peers compare and repair)."""
        return self.sender.queue_digests(buckets, now)

    def send_membership(self, subkind: int, payload: bytes, now: float) -> None:
        """Send an opaque membership message now (unsequenced, authenticated)."""
        if not 0 <= subkind <= 255 or len(payload) > self.params.max_datagram - OVERHEAD - 32:
            raise LocalProtocolError("membership subkind 0..255 and a payload that fits")
        self.sender.queue_control(Membership(subkind, payload))
        self._after(now)

    def request_resync(self, target: int, buckets: Iterable[int], now: float) -> None:
        """Ask ``target`` to stream ``buckets`` (empty: all it owns), e.g. after a digest check."""
        self.receiver.request_resync(target, buckets, now)

    def flush(self, now: float) -> None:
        self.sender.flush(now)

    # -- I/O ---------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, now: float) -> None:
        self.datagrams_received += 1
        try:
            self._receive(data, now)
        except RemoteProtocolError as exc:
            self._rejected[exc.reason] += 1
        r = self.receiver
        while r.rebuilt:  # rebuilt from parities: authenticated and accepted like any datagram
            rebuilt, r.rebuilt = r.rebuilt, []
            for d in rebuilt:
                try:
                    self._receive(d, now)
                except RemoteProtocolError as exc:
                    self._rejected[exc.reason] += 1
        self._after(now)

    def _receive(self, data: bytes, now: float) -> None:
        if not OVERHEAD < len(data) <= self.params.max_datagram:
            raise RemoteProtocolError("size")
        h = parse_header(data)
        if h.key_id not in self.keyring.keys:
            raise RemoteProtocolError("unknown_key")
        if not self.keyring.verify(h.key_id, data[:-MAC_LEN], data[-MAC_LEN:]):
            raise RemoteProtocolError("bad_mac")
        if h.sender == self.node_id:
            raise RemoteProtocolError("own_node")
        for m in self.receiver.datagram(h, data[HEADER_LEN:-MAC_LEN], now, data):
            if isinstance(m, Nack):
                self.sender.on_nack(m.incarnation, m.ranges, now)
            elif isinstance(m, RepairState):
                self.sender.on_repair_state(m.incarnation, block_ranges(m.blocks), now)
            elif isinstance(m, ResyncRequest):
                self.sender.on_resync_request(h.sender, m.token, m.buckets, now)

    def get_timer(self) -> float | None:
        """The earliest deadline of sender and receiver."""
        t = self.sender.get_timer()
        r = self.receiver.get_timer()
        if t is None or (r is not None and r < t):
            return r
        return t

    def handle_timer(self, now: float) -> None:
        self.receiver.handle_timer(now)
        self.sender.handle_timer(now)
        self._after(now)

    def datagrams_to_send(self) -> list[bytes]:
        return self.sender.datagrams()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def _after(self, now: float) -> None:
        r = self.receiver
        if r.control:
            for m in r.control:
                self.sender.queue_control(m)
            r.control = []
        self.sender.flush_control(now)
        if r.events:
            self._events.extend(r.events)
            r.events = []
        if self.sender.events:
            self._events.extend(self.sender.events)
            self.sender.events = []

    def statistics(self) -> EndpointStatistics:
        return EndpointStatistics(
            self.node_id, self.incarnation, self.datagrams_received,
            MappingProxyType(dict(self._rejected)), self.sender.statistics(),
            self.receiver.statistics(), self.store.statistics())
