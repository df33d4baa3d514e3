"""One firewall node's components wired together: the adapter layer of lbsyncd.

No protocol or ownership decision is taken here: the replication endpoint
(:mod:`lbsync.replication`) and the membership core (:mod:`lbsync.membership`) decide; this
module stamps ``now`` (the loop's clock), feeds them kernel events, datagrams and timers, and
carries out what they ask for in the kernel:

- **Owner pipeline.** Conntrack events, filtered by mark to the buckets this node owns (the
  filter reads :attr:`Node.owned` live) -> ``update_flow``/``delete_flow``. TCP entries are
  replicated from ESTABLISHED on (a standby copy created as SYN_SENT never recovers:
  DESIGN.md section 4); DESTROYs always.
- **Standby copies.** Applied replicated records are created once in this node's kernel
  (``inject``, exclusive create: an existing entry is never rewritten, its own tracking is at
  least as fresh); replicated deletes remove them. :attr:`Node.in_kernel` remembers, per bucket,
  the keys known to be in the kernel, so the takeover safety pass is a set difference, not a
  100k-entry dump.
- **Ownership in the kernel.** ``@owned`` holds what membership says this node may forward
  (``forwarding(now)``), each element with the majority lease as its timeout: a hung daemon's
  node stops forwarding by itself. Claims are commit-then-claim: the safety pass injects what
  the store has and the kernel lacks, then one nft transaction adds the buckets.
- **Planned stop.** ``leave(grace)``: peers hold our buckets for the grace; the kernel keeps
  forwarding them (lease extended by the grace) and a state file lets the next start resume.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import json
import logging
import math
import os
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgpack

from hashing.ownermap import ALGORITHM_VERSION, NO_OWNER, Member, OwnerMap, View, assign
from lbsync.config import ClusterConfig, NodeConfig
from lbsync.kernel.conntrack import Conntrack
from lbsync.kernel.ctnetlink import KIND_DESTROY, CtEvent, _c_standby_check
from lbsync.kernel.flowrecord import (
    IPPROTO_TCP,
    IPS_SEEN_REPLY,
    TCP_ESTABLISHED,
    TCP_SYN_SENT2,
    FlowRecord,
    RecordError,
    unpack_fields,
)
from lbsync.membership import (
    FenceRequired,
    MapAdopted,
    MapBootstrapNeeded,
    Membership,
    MembershipWireError,
    OwnershipReleased,
    PeerJoined,
    PeerLeaving,
    PeerLost,
    PeerRestarted,
    TakeoverDecided,
    TargetMap,
    Timing,
    Unfenced,
)
from lbsync.membership import decode as decode_membership
from lbsync.nftset import NftSetError, NftSetSocket, mark_key
from lbsync.replication import FLOW, BucketStore, KeyRing, ProtocolParams, ReplicationEndpoint
from lbsync.replication.events import (
    BucketResynced,
    DigestCompared,
    Event,
    MembershipReceived,
    RecordRefused,
    RecordsApplied,
)
from lbsync.replication.transport import (
    CLOCK_GRAIN,
    ReplicationTransport,
    open_multicast,
    open_unicast,
)
from lbsync.replication.wire import FlowDelete, FlowUpdate

log = logging.getLogger(__name__)

STATE_DIR = Path("/var/lib/lbsync")
MEMBERSHIP_SUBKIND = 1
OWNED_SET = "owned"
DIGEST_INTERVAL = 1.0
DIGEST_SLICES = 8
DIGEST_WORK = 2000  # entries a digest callback hashes at most beyond its first bucket (~2 ms)
# Owners compare their buckets' store with a kernel dump this often: a DESTROY can be silent
# (an owned entry whose last packet met `ct event set 0` while its bucket's lease had lapsed
# has no event mask left), and a store entry outliving its kernel entry would be resurrected
# by a takeover and agree in every digest forever.
SWEEP_INTERVAL = 5.0
# ... or less often: a sweep dumps the whole conntrack table (the kernel serialises every entry,
# owned or not: ~3 us each), so the next one waits until the last one's busy time is at most
# this share of the time between them (1M entries: ~3 s busy, a sweep every ~150 s).
SWEEP_CPU_SHARE = 0.02
LEAVE_GRACE = 10.0
# At real-time priority (daemon.sched_policy rr/fifo) a busy loop yields its CPU to tasks of
# the same priority this often (see Node._cpu_yield).
YIELD_BUSY_CHECK = 0.005
YIELD_IDLE_CHECK = 0.05
# ... and, once it has been busy for YIELD_OVERCOMMIT_AFTER without a break while more tasks
# are runnable than the host has CPUs, also sleeps this long each busy check (a duty of ~60 %):
# see Node._cpu_yield
YIELD_OVERCOMMIT_SLEEP = 0.003
YIELD_OVERCOMMIT_AFTER = 0.1
STARTUP_SETTLE = 1.0
# A non-TCP standby copy waits for the owner's record to show a reply (IPS_SEEN_REPLY) or,
# for one-way flows, this long (the replication lag): a copy injected at the owner's NEW event
# misses the first reply, which passes the peer before its injection, and keeps the status
# (and unreplied timeout) of a flow that was never answered until the next reply.
ONE_WAY_DELAY = 0.5
UNPACK_LIMITS = {"max_bin_len": 4096, "max_str_len": 256, "max_array_len": 512,
                 "max_map_len": 64, "max_ext_len": 0}
# TCP states a standby copy may be created in: past the opening handshake (not NONE,
# SYN_SENT, SYN_RECV, SYN_SENT2), i.e. ESTABLISHED through CLOSE.
_TCP_REPLICABLE = frozenset(range(TCP_ESTABLISHED, TCP_SYN_SENT2))


def table_exists() -> bool:
    """True when ``table inet lbsync`` with its ``owned`` set is loaded in this namespace."""
    try:
        with NftSetSocket() as s:
            s.elements(OWNED_SET)
    except (NftSetError, OSError):
        return False
    return True


def load_keyring(path: str) -> KeyRing:
    text = Path(path).read_text("utf-8")
    return KeyRing.parse(text)


class NodeState:
    """Files that survive restarts: the incarnation counter and the planned-stop note."""

    def __init__(self, cfg: ClusterConfig, node_id: int, state_dir: Path = STATE_DIR) -> None:
        self.dir = Path(os.environ.get("LBSYNC_STATE_DIR", str(state_dir)))
        self.base = self.dir / f"{cfg.cluster.name}-{node_id}"

    def next_incarnation(self) -> int:
        """Increment and persist the incarnation (never a clock: a counter)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.base.with_suffix(".incarnation")
        try:
            current = int(path.read_text().strip() or "0")
        except (FileNotFoundError, ValueError):
            current = 0
        nxt = current + 1
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{nxt}\n")
        os.replace(tmp, path)
        return nxt

    def save_leave(self, owned: Iterable[int], until_monotonic: float) -> None:
        path = self.base.with_suffix(".leave")
        path.write_text(json.dumps({"owned": sorted(owned), "until": until_monotonic}))

    def take_leave(self) -> tuple[frozenset[int], float] | None:
        path = self.base.with_suffix(".leave")
        try:
            data = json.loads(path.read_text())
            path.unlink()
            return frozenset(int(b) for b in data["owned"]), float(data["until"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None


@dataclasses.dataclass(frozen=True, slots=True)
class TakeoverLog:
    """One takeover as the daemon carried it out (loop-clock seconds)."""

    dead_node: int
    buckets: tuple[int, ...]
    decided_at: float
    safety_pass_s: float
    injected: int
    claim_s: float
    claimed: int
    refused: int
    claimed_monotonic: float
    """``time.monotonic()`` right after the claim committed (CLOCK_MONOTONIC is shared by all
    namespaces of a host: benchmarks compare it with the instant they killed a node)."""


class Node:
    """Everything one node runs; built by :func:`lbsync.daemon.serve` inside the loop."""

    def __init__(self, *, life: Any, node_id: int) -> None:
        self.life = life
        self.cfg: ClusterConfig = life.cfg
        self.node_id = node_id
        self.me: NodeConfig = self.cfg.node(node_id)
        self.loop = asyncio.get_running_loop()
        self.B = self.cfg.cluster.buckets
        now = self.loop.time()
        self.started = now
        self.state = NodeState(self.cfg, node_id)
        self.incarnation = self.state.next_incarnation()
        self.keyring = load_keyring(self.cfg.cluster.key_file)
        self.params = ProtocolParams.from_config(self.cfg.replication, self.B)
        self.store = BucketStore(self.B, max_entries=self.cfg.store.max_entries)
        self.ep = ReplicationEndpoint(node_id=node_id, incarnation=self.incarnation,
                                      keyring=self.keyring, params=self.params, now=now,
                                      store=self.store, nodes=self.cfg.node_ids)
        self.nft = NftSetSocket()
        resume = self._resume_ownership(now)
        self.ms = Membership(node_id=node_id, nodes=self.cfg.node_ids, buckets=self.B,
                             timing=Timing.from_config(self.cfg.membership),
                             rng=random.Random(), now=now, incarnation=self.incarnation,
                             resume_owned=resume, weight=self.me.weight, ready=False,
                             new_incarnation=lambda _cur: self.state.next_incarnation(),
                             vrrp=self.cfg.keepalived.enabled)
        # Entries per slice of kernel work (events, injections): a slice must stay well under
        # the stall threshold on a loaded node (~40-70k entries/s: 10k per second of stall
        # budget is about a quarter of it), else bulk work fences the node.
        self._slice = max(self.cfg.kernel.batch_entries,
                          min(self.cfg.kernel.slice_entries,
                              int(self.ms.timing.stall * 10_000)))
        self.owned: set[int] = set(resume)
        for b in resume:
            # announced after the kernel dump in run() (_announce_owned)
            self.ep.claim(b, 1, now, announce=False)
        self.kernel = Conntrack(on_events=self._on_kernel_events,
                                on_resync=self._on_kernel_resync,
                                config=dataclasses.replace(self.cfg.kernel,
                                                           slice_entries=self._slice),
                                marks=self.owned, read_budget=self._slice)
        self.in_kernel: list[set[bytes]] = [set() for _ in range(self.B)]
        self._event_backlog: deque[CtEvent] = deque()
        self._events_scheduled = False
        # false: standby copies stay in the store until a takeover commits them
        self.preinject = self.cfg.membership.preinject
        self._to_inject: dict[bytes, int] = {}
        self._to_delete: dict[bytes, int] = {}
        self._one_way: dict[bytes, float] = {}  # key -> when its unanswered record arrived
        self._kernel_work = asyncio.Event()
        self.transport: ReplicationTransport | None = None
        self._ms_timer: asyncio.TimerHandle | None = None
        self._ms_timer_at = -math.inf
        self._kernel_owned: set[int] = set()
        self._lease_written = -math.inf
        self._last_tick = now
        self._resync_asked: set[int] = set()
        self._ready_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.takeovers: deque[TakeoverLog] = deque(maxlen=32)
        self.c: Counter[str] = Counter()
        self.stopping = False
        self._digest_slice = 0
        self._sweep_interval = SWEEP_INTERVAL

    # ------------------------------------------------------------------ lifecycle

    def _resume_ownership(self, now: float) -> frozenset[int]:
        """After a planned stop within its grace, keep forwarding what we owned; otherwise
        start owning nothing (peers took over or will)."""
        note = self.state.take_leave()
        kernel = self.nft.marks(OWNED_SET)
        if note is not None and time.monotonic() < note[1]:
            keep = frozenset(b for b in note[0] if b in kernel and 0 <= b < self.B)
            log.info("node.resume owned=%d", len(keep))
            drop = kernel - keep
        else:
            keep = frozenset()
            drop = kernel
        if drop:
            self.nft.update_marks(OWNED_SET, (), drop)
        return keep

    async def _flush_stale_copies(self) -> None:
        """At start, before anything is replicated to us: conntrack entries of buckets this
        node does not own predate this daemon. If the node was cut off meanwhile (links down,
        then up: a crashed node brought back) their TCP tracking missed packets, and a copy
        kept because it "already exists" (EEXIST) would drop the flow's packets as invalid once
        the bucket is handed back. Delete them; the resync injects the owners' state."""
        table = await self.kernel.requests.dump_all()
        stale = [ev.key for ev in table if ev.bucket < self.B and ev.bucket not in self.owned]
        for i in range(0, len(stale), self._slice):
            await self.kernel.requests.delete(stale[i:i + self._slice])
            await asyncio.sleep(0)
        self.c["stale_copies_flushed"] += len(stale)
        if stale:
            log.info("node.stale_copies_flushed entries=%d", len(stale))

    async def run(self) -> None:
        await self._flush_stale_copies()
        r = self.cfg.replication
        if r.mode == "multicast":
            self.transport = await open_multicast(
                self.ep, group=r.group4, port=r.port, ifname=self.cfg.interfaces.replication,
                buffer=r.socket_buffer, on_event=self._on_replication_event)
        else:
            peers = [n.replication_address for n in self.cfg.nodes if n.id != self.node_id]
            self.transport = await open_unicast(
                self.ep, address=self.me.replication_address, port=r.port, peers=peers,
                buffer=r.socket_buffer, on_event=self._on_replication_event)
        self.kernel.start(self.loop)
        if self.owned:
            await self._announce_owned(sorted(self.owned))
        self._membership_changed()
        self._spawn(self._kernel_writer(), "kernel-writer")
        self._schedule_digests()
        self._schedule_sweep()
        if os.sched_getscheduler(0) in (os.SCHED_RR, os.SCHED_FIFO):
            self._cpu_mark = time.thread_time()
            self._busy_since: float | None = None
            self.loop.call_later(YIELD_IDLE_CHECK, self._cpu_yield)
        self.metrics: Any = None
        if self.cfg.metrics.listen:  # prometheus_client is imported only when enabled
            from lbsync.metrics import start_for_node

            self.metrics = await start_for_node(self)
        log.info("node.started node=%d incarnation=%d buckets=%d", self.node_id,
                 self.incarnation, self.B)
        await self.transport.closed

    async def shutdown(self) -> None:
        """Planned stop: announce a grace, let peers echo it, extend the lease, remember."""
        self.stopping = True
        now = self.loop.time()
        cap = self.ms.leave(LEAVE_GRACE, now)
        self._membership_changed()
        await asyncio.sleep(3 * self.ms.timing.heartbeat)
        now = self.loop.time()
        until = min(cap, now + LEAVE_GRACE) if math.isfinite(cap) else now + LEAVE_GRACE
        owned = self.ms.forwarding(now)
        if owned:
            self._write_owned(owned, until, now)
        self.state.save_leave(owned, time.monotonic() + (until - now))
        self.ep.flush(now)
        if self.transport is not None:
            self.transport.pump()
        for t in list(self._tasks):
            t.cancel()
        if self._ms_timer is not None:
            self._ms_timer.cancel()
        self.kernel.close()
        if self.transport is not None:
            self.transport.close()
        self.nft.close()

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("node.task_failed task=%s error=%r", name, t.exception())
                self.life.request_stop(f"task {name} failed: {t.exception()!r}")

        task.add_done_callback(done)

    # ------------------------------------------------------------------ owner pipeline

    def _on_kernel_events(self, events: list[CtEvent]) -> None:
        # A burst (a 100k-entry commit) arrives as one huge read: queue it and work through it
        # in slices, one per loop iteration, so heartbeats and timers run in between (a long
        # callback is a stall, and a stall fences the node). A read that fits a slice with
        # nothing queued (every read but an overrun's drain) is replicated at once: no extra
        # loop turn and copy per wakeup, which is most of the work per event at low rates.
        if not self._event_backlog and len(events) <= self._slice:
            self._replicate_events(events)
            return
        self._event_backlog.extend(events)
        if not self._events_scheduled:
            self._events_scheduled = True
            self.loop.call_soon(self._drain_kernel_events)

    def _drain_kernel_events(self) -> None:
        self._events_scheduled = False
        backlog = self._event_backlog
        if len(backlog) <= self._slice:
            events = list(backlog)
            backlog.clear()
        else:
            events = [backlog.popleft() for _ in range(self._slice)]
        if backlog:
            self._events_scheduled = True
            self.loop.call_soon(self._drain_kernel_events)
        self._replicate_events(events)

    def _replicate_events(self, events: list[CtEvent]) -> None:
        """Owned buckets' kernel events -> store and replication stream (one slice)."""
        owned, in_kernel, replicable = self.owned, self.in_kernel, _TCP_REPLICABLE
        skipped = 0
        changes: list[tuple[int, bytes, bytes | None]] = []
        change = changes.append
        # tuple unpacking, not attribute reads: this loop runs once per kernel event; the
        # slice's changes go to the sender in one call (ReplicationEndpoint.write_flows)
        for kind, key, bucket, l4proto, tcp_state, _st, record, _pid in events:
            if bucket not in owned:
                continue
            if kind == KIND_DESTROY:
                change((bucket, key, None))
                in_kernel[bucket].discard(key)
            elif l4proto != IPPROTO_TCP or tcp_state in replicable:
                change((bucket, key, record))
                in_kernel[bucket].add(key)
            else:
                skipped += 1
        if changes:
            self.ep.write_flows(changes, self.loop.time())
        if skipped:
            self.c["owner_handshake_skipped"] += skipped
        self.c["owner_events"] += len(events)
        if self.transport is not None:
            self.transport.flush_soon()  # sealed and sent when this burst of callbacks is done

    def _on_kernel_resync(self, table: list[CtEvent]) -> None:
        """After lost events (ENOBUFS): the owned buckets' kernel table is the truth."""
        while self._event_backlog:  # events read before the table: applied first, as before
            self._drain_kernel_events()
        now = self.loop.time()
        by_bucket: dict[int, dict[bytes, bytes]] = {}
        for ev in table:
            if ev.bucket in self.owned:
                by_bucket.setdefault(ev.bucket, {})[ev.key] = ev.record
        for b in list(self.owned):
            present = by_bucket.get(b, {})
            for key in [k for k in self.store.flows(b) if k not in present]:
                self.ep.delete_flow(b, key, now)
            for key, rec in present.items():
                if self.store.get(FLOW, b, key) != rec:
                    self.ep.update_flow(b, key, rec, now)
            self.in_kernel[b] = set(present)
        self.c["kernel_resyncs"] += 1
        if self.transport is not None:
            self.transport.pump()

    async def _announce_owned(self, buckets: list[int]) -> None:
        """A restarted owner re-reads its buckets from its kernel and replicates them."""
        table = await self.kernel.requests.dump_all()
        self._on_kernel_resync(table)
        self.ep.send_digests(buckets, self.loop.time())

    # ------------------------------------------------------------------ standby copies

    def _on_replication_event(self, ev: Event) -> None:
        if isinstance(ev, RecordsApplied):
            owned, in_kernel = self.owned, self.in_kernel
            to_inject, to_delete, one_way = self._to_inject, self._to_delete, self._one_way
            preinject = self.preinject
            for ch in ev.changes:  # once per replicated record: locals, exact type checks
                t = type(ch)
                if t is FlowUpdate:
                    bucket, key = ch.bucket, ch.key
                    if preinject and bucket not in owned and key not in in_kernel[bucket]:
                        to_inject[key] = bucket
                elif t is FlowDelete:
                    bucket, key = ch.bucket, ch.key
                    if bucket in owned:
                        continue
                    to_inject.pop(key, None)
                    if one_way:
                        one_way.pop(key, None)
                    copies = in_kernel[bucket]
                    if key in copies:
                        copies.discard(key)
                        to_delete[key] = bucket
            self._kernel_work.set()
        elif isinstance(ev, MembershipReceived):
            if ev.subkind != MEMBERSHIP_SUBKIND:
                self.c["membership_unknown_subkind"] += 1
                return
            try:
                msg = decode_membership(msgpack.unpackb(ev.payload, **UNPACK_LIMITS))
            except (MembershipWireError, ValueError, TypeError, msgpack.UnpackException):
                self.c["membership_malformed"] += 1
                return
            if msg.node_id != ev.sender:
                self.c["membership_spoofed"] += 1
                return
            self.ms.receive(msg, self.loop.time())
            self._membership_changed()
        elif isinstance(ev, BucketResynced):
            self.c["buckets_resynced"] += 1
            if not ev.agreed:
                self.c["resync_disagreed"] += 1
            self._reconcile_bucket(ev.bucket)
        elif isinstance(ev, DigestCompared):
            self.c["digests_agreed" if ev.agreed else "digests_differed"] += 1
        elif isinstance(ev, RecordRefused):
            self.c["store_refused"] += 1
        else:
            self.c[f"replication_{type(ev).__name__}"] += 1

    def _reconcile_bucket(self, bucket: int) -> None:
        """After a resync replaced a bucket's store content, align the kernel copies."""
        if bucket in self.owned:
            return
        flows = self.store.flows(bucket)
        for key in [k for k in self.in_kernel[bucket] if k not in flows]:
            self.in_kernel[bucket].discard(key)
            self._to_delete[key] = bucket
        for key in flows:
            if self.preinject and key not in self.in_kernel[bucket]:
                self._to_inject[key] = bucket
        self._kernel_work.set()

    async def _kernel_writer(self) -> None:
        """Batched, sliced kernel writes of standby copies (never blocking the loop long)."""
        slice_n = self._slice
        while True:
            await self._kernel_work.wait()
            self._kernel_work.clear()
            while self._to_inject or self._to_delete:
                if self._to_delete:
                    keys = list(self._to_delete)[:slice_n]
                    for k in keys:
                        del self._to_delete[k]
                    res = await self.kernel.requests.delete(keys)
                    self.c["kernel_deleted"] += len(keys)
                    for name, n in (res.errno_counts().items() if res.failed else ()):
                        self.c[f"kernel_delete_{name}"] += n
                if self._to_inject:
                    await self._inject_some(slice_n)
                await asyncio.sleep(0)

    async def _inject_some(self, limit: int, only: Iterable[bytes] | None = None) -> int:
        batch: list[tuple[bytes, int]] = []
        records: list[bytes] = []
        source = list(only) if only is not None else list(itertools.islice(self._to_inject,
                                                                            limit))
        to_inject, one_way, owned = self._to_inject, self._one_way, self.owned
        get = self.store.get
        for key in source:
            bucket = to_inject.pop(key, None)
            if bucket is None:
                continue
            rec = get(FLOW, bucket, key)
            if rec is None or (bucket in owned and only is None):
                continue
            verdict = _standby_check(key, rec)  # one unpack for both checks
            if verdict == _NOT_ESTABLISHED:
                self.c["standby_not_yet_established"] += 1
                continue
            if verdict == _UNANSWERED and only is None:
                now = self.loop.time()
                first = one_way.setdefault(key, now)
                if now - first < ONE_WAY_DELAY:
                    self.c["standby_one_way_deferred"] += 1
                    self.loop.call_at(first + ONE_WAY_DELAY, self._requeue, key, bucket)
                    continue
            if one_way:
                one_way.pop(key, None)
            batch.append((key, bucket))
            records.append(rec)
        if not batch:
            return 0
        res = await self.kernel.requests.inject(records)
        failed = dict(res.failed)
        in_kernel = self.in_kernel
        if not failed:
            for key, bucket in batch:
                in_kernel[bucket].add(key)
        else:
            for i, (key, bucket) in enumerate(batch):
                if failed.get(i, errno.EEXIST) == errno.EEXIST:  # EEXIST: already there
                    in_kernel[bucket].add(key)
        self.c["kernel_injected"] += len(batch) - len(failed)
        for name, n in (res.errno_counts().items() if failed else ()):
            self.c[f"kernel_inject_{name}"] += n
        return len(batch) - len(failed)

    def _requeue(self, key: bytes, bucket: int) -> None:
        """A deferred one-way copy is due: inject it unless it was deleted or injected."""
        if key not in self._one_way:
            return
        if self.store.get(FLOW, bucket, key) is None or bucket in self.owned \
                or key in self.in_kernel[bucket]:
            self._one_way.pop(key, None)
            return
        self._to_inject[key] = bucket
        self._kernel_work.set()

    # ------------------------------------------------------------------ membership

    def _membership_changed(self) -> None:
        now = self.loop.time()
        gap = now - self._last_tick
        if gap > self.ms.timing.stall:
            self.ms.loop_stalled(gap, now)
        self._last_tick = now
        while (ev := self.ms.next_event()) is not None:
            self._on_membership_event(ev, now)
        for _dest, msg in self.ms.datagrams_to_send():
            payload = msgpack.packb(msg.to_wire(), use_bin_type=True)
            self.ep.send_membership(MEMBERSHIP_SUBKIND, payload, now)
        self._sync_kernel_owned(now)
        self._maybe_ready(now)
        if self.transport is not None:
            # from inside the transport's own delivery (a heartbeat received) this only asks
            # that pump for another round; it re-arms the endpoint's timer once
            self.transport.pump()
        # the lease refresh needs waking too: at most one heartbeat after now
        when = max(min(self.ms.get_timer(), now + self.ms.timing.heartbeat), now)
        if self._ms_timer is not None:
            if when == self._ms_timer_at:
                return  # most heartbeats received leave the deadline (our next one) alone
            self._ms_timer.cancel()
        # a clock tick late: uvloop fires timers up to ~1 ms early (see _membership_timer)
        self._ms_timer = self.loop.call_at(when + CLOCK_GRAIN, self._membership_timer)
        self._ms_timer_at = when

    def _membership_timer(self) -> None:
        self._ms_timer = None
        now = self.loop.time()
        if now < self._ms_timer_at:
            # uvloop's millisecond clock fires a third of the timers up to ~1 ms before their
            # deadline. Evaluated then, nothing is due, and re-armed at the deadline the timer
            # fired again at once until the clock ticked: 2-3 full membership evaluations per
            # heartbeat sent. So it is armed a tick late (a heartbeat <= ~1.5 ms late, against
            # the 50 ms of loop lag the default profile tolerates) and, if still early, comes
            # back a tick later.
            self._ms_timer = self.loop.call_later(CLOCK_GRAIN, self._membership_timer)
            self.c["membership_timer_early"] += 1
            return
        self.ms.handle_timer(now)
        self._membership_changed()

    def _on_membership_event(self, ev: Any, now: float) -> None:
        log.info("membership.%s %s", type(ev).__name__,
                 " ".join(f"{k}={v}" for k, v in _fields(ev).items() if k != "new_map"
                          and k != "map"))
        if isinstance(ev, TakeoverDecided):
            self._spawn(self._takeover(ev, now), f"takeover-{ev.dead_node}")
        elif isinstance(ev, MapBootstrapNeeded):
            view = View.of(Member(m.node_id, m.weight, m.drained) for m in ev.members)
            # a rebuild (ownerless buckets) moves as little as possible from the agreed map
            prev = owner_map_from_target(self.ms.map) if self.ms.map is not None else None
            om = assign(view, self.B, prev)
            tm = target_map(om, proposer=self.node_id)
            self.ms.propose_map(tm, now)
        elif isinstance(ev, OwnershipReleased):
            for b in ev.buckets:
                self.owned.discard(b)
                self.ep.release(b)
        elif isinstance(ev, (PeerJoined, PeerRestarted)):
            self._ask_resync(ev.node_id, now)
        elif isinstance(ev, (PeerLost, PeerLeaving, FenceRequired, Unfenced, MapAdopted)):
            pass

    def _ask_resync(self, peer: int, now: float) -> None:
        """Fill the standby store from a peer (all it owns); part of the readiness gate."""
        self.ep.request_resync(peer, (), now)
        self._resync_asked.add(peer)

    def _maybe_ready(self, now: float) -> None:
        if self.ms.ready or self.stopping:
            return
        if now - self.started < STARTUP_SETTLE:
            return
        if self.ep.receiver.pending_resyncs():
            return
        self._ready_at = now
        self.ms.set_local(now, ready=True)
        log.info("node.ready after=%.3f s", now - self.started)

    def _sync_kernel_owned(self, now: float) -> None:
        """Make ``@owned`` equal ``forwarding(now)``, elements timed out at the lease.

        The timeouts are rewritten once the lease has advanced by ``Timing.rewrite`` past
        the written one (T_hb / 2; see there why): writing less often would only make the
        elements expire earlier, never later than a lease a majority gave."""
        want = self.ms.forwarding(now)
        expiry = self.ms.lease_expiry()
        kernel = self._kernel_owned
        if want == kernel and (not want or expiry - self._lease_written
                               <= self.ms.timing.rewrite):
            return  # the common case: nothing to add, remove or re-time
        gone = kernel - want
        try:
            if gone:
                self.nft.update_marks(OWNED_SET, (), gone)
                self.c["owned_removed"] += len(gone)
            new = want - kernel
            stale = expiry - self._lease_written > self.ms.timing.rewrite
            if want and (new or stale):
                self._write_owned(want, expiry, now)
        except NftSetError as exc:
            self.c["nft_errors"] += 1
            log.error("node.owned_sync_failed error=%s", exc)
            return
        self._kernel_owned = set(want)

    def _write_owned(self, buckets: Iterable[int], expiry: float, now: float) -> None:
        keys = [mark_key(b) for b in sorted(buckets)]  # one order: NftSetSocket caches by keys
        if math.isinf(expiry):
            self.nft.update_marks(OWNED_SET, buckets, ())
        else:
            ms = max(1, int((expiry - now) * 1000))
            self.nft.refresh(OWNED_SET, keys, ms)
        self._lease_written = expiry
        self.c["owned_writes"] += 1

    async def _takeover(self, ev: TakeoverDecided, decided: float) -> None:
        """Commit, then claim: inject what the kernel lacks, then one nft transaction."""
        # durations on the high-resolution clock (uvloop's loop.time() ticks in ms)
        p0 = time.perf_counter()
        missing: list[bytes] = []
        for b in ev.buckets:
            ink = self.in_kernel[b]
            for key in self.store.flows(b):
                if key not in ink:
                    self._to_inject[key] = b
                    missing.append(key)
        injected = 0
        slice_n = self._slice
        for i in range(0, len(missing), slice_n):
            injected += await self._inject_some(slice_n, missing[i:i + slice_n])
            await asyncio.sleep(0)  # heartbeats between slices: a 100k commit must not stall
        t1 = self.loop.time()
        p1 = time.perf_counter()
        epoch = ev.new_map.epoch
        try:
            # claimed in the kernel first; the owner pipeline starts with the claim
            self._write_owned(ev.buckets, self.ms.lease_expiry(), t1)
        except NftSetError as exc:
            log.error("node.claim_failed buckets=%d error=%s", len(ev.buckets), exc)
            self.ms.claim_failed(ev.buckets, self.loop.time())
            self._membership_changed()
            return
        t2 = self.loop.time()
        claimed_mono = time.monotonic()
        p2 = time.perf_counter()
        accepted = self.ms.claim_done(ev.buckets, t2)
        for b in ev.buckets:
            if b in accepted:
                self.ep.claim(b, epoch, t2)
                self.owned.add(b)
        refused = set(ev.buckets) - accepted
        self._kernel_owned |= set(accepted)
        if refused:
            self.nft.update_marks(OWNED_SET, (), refused)
        self.takeovers.append(TakeoverLog(ev.dead_node, ev.buckets, decided, p1 - p0, injected,
                                          p2 - p1, len(accepted), len(refused), claimed_mono))
        log.info("node.takeover dead=%d buckets=%d injected=%d safety_ms=%.1f claim_ms=%.1f",
                 ev.dead_node, len(ev.buckets), injected, (p1 - p0) * 1e3, (p2 - p1) * 1e3)
        self._membership_changed()

    def _cpu_yield(self) -> None:
        """While the loop is busy (bulk work: a 100k-entry burst), give the CPU to runnable
        tasks of the same real-time priority every YIELD_BUSY_CHECK (``sched_yield``).

        SCHED_RR hands the CPU over only when the running task blocks or after its 100 ms
        slice: with more busy daemons than CPUs (a lab on one host; conntrackd or keepalived
        at the same priority on a node), a daemon woken for its heartbeat timer waited up to
        100 ms behind another's bulk work, and the fast profile fenced it for a stall (issue
        7). Idle, the check runs every YIELD_IDLE_CHECK only.

        sched_yield only helps tasks of the same priority. When real-time tasks keep a CPU
        busy for most of a second, the kernel's fair server (Linux 6.12+: 50 ms a second for
        SCHED_OTHER tasks that starve, replacing RT throttling) preempts them all for 50 ms at
        once: the lab's three daemons stalled together and fenced themselves. So while the
        host is overcommitted (more runnable tasks than CPUs, /proc/loadavg) a loop busy for
        YIELD_OVERCOMMIT_AFTER without a break (bulk work) also sleeps YIELD_OVERCOMMIT_SLEEP
        per check, leaving the others their share; bulk work then takes longer, heartbeats
        wait at most that long. Shorter busy spells (replication at 20k flows/s, a digest
        slice) do not sleep: the fair server needs ~950 ms of starvation, and a 3 ms sleep in
        the middle of a datagram's records was most of the replication lag's p99 (issue 6)."""
        now = self.loop.time()
        busy_for = 0.0 if self._busy_since is None else now - self._busy_since
        busy, pause = yield_plan(time.thread_time() - self._cpu_mark, busy_for,
                                 _host_overcommitted)
        if not busy:
            self._busy_since = None
        elif self._busy_since is None:
            self._busy_since = now
        if busy:
            os.sched_yield()
            self.c["cpu_yields"] += 1
            if pause:
                time.sleep(pause)
                self.c["cpu_overcommit_sleeps"] += 1
        self._cpu_mark = time.thread_time()
        if not self.stopping:
            self.loop.call_later(YIELD_BUSY_CHECK if busy else YIELD_IDLE_CHECK,
                                 self._cpu_yield)

    # ------------------------------------------------------------------ digests

    def _schedule_sweep(self) -> None:
        def fire() -> None:
            if not self.stopping:
                self._spawn(self._sweep(), "sweep")

        # jittered: daemons started together must not sweep together (a shared host's CPUs)
        self._sweep_interval = sweep_interval(self.kernel.sweeper.last_busy)
        self.loop.call_later(self._sweep_interval * random.uniform(0.8, 1.2), fire)

    async def _sweep(self) -> None:
        """Delete (and replicate the deletes of) owned store entries the kernel no longer
        holds. Entries whose record changed during the dump are left alone (an event
        touched them), and an interrupted dump proves nothing. With no owned entry in the
        store there is nothing to delete, and no dump (a node whose buckets carry no flows
        would otherwise pay for serialising every standby copy of its kernel)."""
        try:
            if not self.owned or self.kernel.resyncing:
                return
            if not any(self.store.count(b) for b in self.owned):
                self.kernel.sweeper.last_busy = 0.0
                self.c["sweeps_skipped_empty"] += 1
                return
            before: dict[int, dict[bytes, bytes]] = {}
            for b in list(self.owned):  # a copy per bucket: no 100k-entry copy in one go
                before[b] = dict(self.store.flows(b))
                await asyncio.sleep(0)
            # One dump on a socket of its own, decoded keys-only on the loop one recv at a time
            # (KeyDumper.dump_keys, which says why not per mark and not in a worker thread).
            present, interrupted = await self.kernel.sweeper.dump_keys(frozenset(before))
            if interrupted:
                return
            n = 0
            for b, flows in before.items():
                if b not in self.owned:
                    continue
                now = self.loop.time()
                for key, rec in flows.items():
                    if key not in present and self.store.get(FLOW, b, key) is rec:
                        self.ep.delete_flow(b, key, now)
                        self.in_kernel[b].discard(key)
                        n += 1
                await asyncio.sleep(0)
            if n:
                self.c["sweep_deleted"] += n
                log.info("node.sweep deleted=%d", n)
                if self.transport is not None:
                    self.transport.pump()
        finally:
            self._schedule_sweep()

    def _schedule_digests(self) -> None:
        """Every owned bucket's digest goes out about once per DIGEST_INTERVAL, in rounds: a
        round takes the owned buckets in order, all in one callback when their digests are
        cheap (the store's digests are incremental: a bucket costs the entries changed since
        its last digest), so they share datagrams and wake-ups: one datagram per bucket per
        second was ~40 % of an idle daemon's CPU (~20 ms/s at 32 owned buckets, sent and
        received), and 1/DIGEST_SLICES of them every 1/DIGEST_SLICES s still 8 wake-ups a
        second on every node and twice that on each peer. After a burst a digest can hash a
        whole bucket (~1.5 us an entry; 100k entries in one callback stalled the loop ~0.1 s,
        three buckets of a 100k-entry node 20-40 ms fenced the fast profile for a stall): a
        callback then stops at DIGEST_WORK entries (at least one bucket) and the round goes on
        after the one-bucket spacing, DIGEST_INTERVAL / len(owned). The next round starts a
        DIGEST_INTERVAL after the previous one began."""
        round_at = self.loop.time()

        def fire() -> None:
            nonlocal round_at
            owned = sorted(self.owned)
            now = self.loop.time()
            if not owned:
                self.loop.call_later(DIGEST_INTERVAL / DIGEST_SLICES, fire)
                return
            n = len(owned)
            if self._digest_slice % n == 0:
                round_at = now
            left = n - self._digest_slice % n  # to the end of this round
            behind = False
            picked: list[int] = []
            work = 0
            while len(picked) < left:
                b = owned[self._digest_slice % n]
                cost = self.store.digest_cost(b)
                if picked and work + cost > DIGEST_WORK:
                    behind = True
                    break
                picked.append(b)
                work += cost
                self._digest_slice += 1
            self.ep.send_digests(picked, now)
            # sealed now, not at the flush timer: no wake-up of its own
            self.ep.flush(now)
            if self.transport is not None:
                self.transport.pump()
            spacing = DIGEST_INTERVAL / max(n, DIGEST_SLICES)
            self.loop.call_later(spacing if behind
                                 else max(spacing, round_at + DIGEST_INTERVAL - now), fire)

        self.loop.call_later(DIGEST_INTERVAL / DIGEST_SLICES, fire)

    # ------------------------------------------------------------------ status

    def statistics(self) -> dict[str, Any]:
        now = self.loop.time()
        ms = self.ms.statistics()
        per_bucket_kernel = [len(s) for s in self.in_kernel]
        return {
            "incarnation": self.incarnation,
            "ready": self.ms.ready,
            "fenced": self.ms.fenced,
            "map_epoch": ms.map_epoch,
            "owned": sorted(self.owned),
            "forwarding": sorted(self.ms.forwarding(now)),
            "target": sorted(self.ms.map.buckets_of(self.node_id)) if self.ms.map else [],
            "lease_left_s": round(self.ms.lease_expiry() - now, 3)
            if math.isfinite(self.ms.lease_expiry()) else None,
            "store_entries": len(self.store),
            "kernel_copies": sum(per_bucket_kernel),
            "pending_inject": len(self._to_inject),
            "pending_delete": len(self._to_delete),
            "sweep": {"interval_s": round(self._sweep_interval, 1),
                      "last_busy_ms": round(self.kernel.sweeper.last_busy * 1e3, 1),
                      "dumps": self.kernel.sweeper.dumps},
            "counters": dict(self.c),
            "membership": _plain(ms),
            "replication": _plain(self.ep.statistics()),
            "kernel": _plain(self.kernel.statistics()),
            "takeovers": [_plain(t) for t in self.takeovers],
            # keepalived's signal (lbsync.ops.Ops runs it when [keepalived] enabled)
            "vrrp": ops.vrrp_statistics() if (ops := getattr(self, "ops", None)) else None,
        }

    def control_handlers(self) -> Mapping[str, Callable[[Mapping[str, Any]], Awaitable[Any]]]:
        async def store(args: Mapping[str, Any]) -> Any:
            buckets = args.get("buckets") or range(self.B)
            return {str(b): sorted(k.hex() for k in self.store.flows(int(b)))
                    for b in buckets if self.store.count(int(b))}

        async def corrupt(args: Mapping[str, Any]) -> Any:
            # test hook: damage one bucket of the standby store behind the daemon's back
            return self.store.clear_bucket(int(args["bucket"]))

        async def records(args: Mapping[str, Any]) -> Any:
            b = int(args["bucket"])
            return {k.hex(): _plain(FlowRecord.unpack(v)) for k, v in self.store.flows(b).items()}

        from lbsync.ops import Ops  # operator commands: map, resync, drill hooks

        return {"store": store, "store-corrupt": corrupt, "store-records": records,
                **Ops(self).handlers()}


def sweep_interval(last_busy: float) -> float:
    """Seconds until the next owner sweep (before jitter): ``SWEEP_INTERVAL``, or longer so
    that a sweep keeping the loop busy ``last_busy`` seconds uses at most ``SWEEP_CPU_SHARE``
    of the time."""
    return max(SWEEP_INTERVAL, last_busy / SWEEP_CPU_SHARE)


_NCPU = os.cpu_count() or 1


def yield_plan(cpu_used: float, busy_for: float,
               overcommitted: Callable[[], bool]) -> tuple[bool, float]:
    """For :meth:`Node._cpu_yield`: (busy, seconds to sleep) after the loop's thread used
    ``cpu_used`` seconds of CPU since the last check, the loop having been busy without a
    break for ``busy_for`` seconds before it. Busy means more than half of a
    YIELD_BUSY_CHECK; a loop busy for at least YIELD_OVERCOMMIT_AFTER on an overcommitted host
    also sleeps YIELD_OVERCOMMIT_SLEEP (``overcommitted`` is asked only then: it reads /proc)."""
    busy = cpu_used > YIELD_BUSY_CHECK / 2
    bulk = busy and busy_for >= YIELD_OVERCOMMIT_AFTER
    return busy, (YIELD_OVERCOMMIT_SLEEP if bulk and overcommitted() else 0.0)


def _host_overcommitted(path: str = "/proc/loadavg", ncpu: int | None = None) -> bool:
    """More runnable tasks than CPUs right now (/proc/loadavg: "running/total"); False when
    the file cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return False
    return running > (_NCPU if ncpu is None else ncpu)


def owner_map_from_target(tm: TargetMap) -> OwnerMap:
    """A ``hashing`` map with the agreed owners, as ``assign``'s ``previous`` (it reads only
    owners, epoch and digest from it)."""
    ids = sorted({o for o in tm.owners if o != NO_OWNER})
    return OwnerMap(version=ALGORITHM_VERSION, buckets=tm.nbuckets, epoch=tm.epoch,
                    prev_hash=bytes(32), view=View.of(Member(i) for i in ids),
                    owners=tuple(tm.owners))


def target_map(om: OwnerMap, *, proposer: int, depth: int | None = None) -> TargetMap:
    """Membership's map form of a ``hashing`` owner map, with successor chains.

    Level 1 of a bucket's chain is ``om.successors()``; level i+1 is the successor in the map
    computed without the owner and the first i successors (``successor_map`` applied in turn),
    so a second failure also lands where ``hashing`` puts it. Maps per distinct dead set are
    cached; the depth is capped (default: 2 levels up to 8 nodes, else 1) to bound the cost.
    """
    n = len(om.view.eligible)
    if depth is None:
        depth = 2 if n <= 8 else 1
    depth = min(depth, max(n - 1, 0))
    cache: dict[frozenset[int], OwnerMap] = {frozenset(): om}
    succ_cache: dict[frozenset[int], tuple[int, ...]] = {}
    chains: list[list[int]] = []
    for b in range(om.buckets):
        dead: frozenset[int] = frozenset()
        m = om
        chain: list[int] = []
        current = om.owners[b]
        while current != NO_OWNER and len(chain) < depth:
            succ = succ_cache.get(dead)
            if succ is None:
                succ = succ_cache[dead] = m.successors()
            nxt = succ[b]
            if nxt == NO_OWNER:
                break
            chain.append(nxt)
            dead = dead | {current}
            cached = cache.get(dead)
            if cached is None:
                cached = cache[dead] = m.successor_map(current)
            m = cached
            current = nxt
        chains.append(chain)
    return TargetMap.build(epoch=max(1, om.epoch), proposer=proposer, owners=om.owners,
                           successors=chains)


# Both checks read the packed array's positions (docs: FlowRecord packed form v1) instead of
# building a FlowRecord: ~0.5 us instead of ~7 us per standby copy on the receivers' hot path.
# A malformed record (a buggy peer) is never injected: False / "unanswered", counted upstream.

_NOT_ESTABLISHED, _INJECTABLE, _UNANSWERED = 0, 1, 2


def _standby_check(key: bytes, record: bytes) -> int:
    """:func:`_injectable` and :func:`_unanswered` with one unpack: _NOT_ESTABLISHED (never
    injected now), _UNANSWERED (injectable, but a non-TCP record not yet answered) or
    _INJECTABLE."""
    if _c_standby_check is not None:  # the C accelerator: the same verdict, or None (undecided)
        verdict = _c_standby_check(key, record)
        if verdict is not None:
            return verdict
    try:
        f = unpack_fields(record)
    except RecordError:
        return _NOT_ESTABLISHED
    if f[2] == IPPROTO_TCP:
        pi = f[9]
        if not (isinstance(pi, list) and pi and pi[0] in _TCP_REPLICABLE):
            return _NOT_ESTABLISHED
    if key[1] == IPPROTO_TCP:
        return _INJECTABLE
    status = f[5]
    return _INJECTABLE if isinstance(status, int) and status & IPS_SEEN_REPLY else _UNANSWERED


def _injectable(record: bytes) -> bool:
    """A standby copy is created only past the TCP handshake (never as SYN_SENT)."""
    try:
        f = unpack_fields(record)
    except RecordError:
        return False
    if f[2] != IPPROTO_TCP:
        return True
    pi = f[9]
    return isinstance(pi, list) and bool(pi) and pi[0] in _TCP_REPLICABLE


def _unanswered(key: bytes, record: bytes) -> bool:
    """A non-TCP record the owner has not yet seen answered (the key's byte 1 is l4proto)."""
    if key[1] == IPPROTO_TCP:
        return False
    try:
        status = unpack_fields(record)[5]
    except RecordError:
        return True
    return not (isinstance(status, int) and status & IPS_SEEN_REPLY)


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

