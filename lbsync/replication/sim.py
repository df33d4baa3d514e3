"""Simulation harness: N replication endpoints on a fake network with a virtual clock.

Every node sends and receives. The router is seeded: it drops, duplicates, delays (with jitter,
hence reorders) and partitions, independently per destination (as loss at each receiver's input
would). The clock never ticks: it jumps to the earliest of the next delivery, the next scheduled
action and the earliest endpoint deadline. One seed replays one run exactly.

The router also keeps the books needed by the acceptance figures: original vs retransmitted
DATA datagrams (a retransmission is a DATA datagram whose (sender, incarnation, seq) was sent
before), NACK datagrams, which receivers missed each original datagram, and how many NACK
datagrams named each missed one. In ``unicast`` mode a datagram is sent once per peer, the
copies leaving one after the other; the books count logical datagrams (one per send, whatever
the fan-out) and ``wire_datagrams``. Loss is independent per copy in both modes.

With ``heartbeat`` set, every node also sends the farm's membership heartbeat (an opaque
``Membership`` CONTROL datagram, sized like the real one) every ``heartbeat`` seconds, jittered
down by up to 10 % as the membership core does: the datagrams a farm sends anyway, which carry
the receivers' piggybacked repair states. The books count those repair states apart from NACK
datagrams (``carriers``, ``piggyback_bytes``); a NACK datagram counts everything it names.
"""

from __future__ import annotations

import functools
import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lbsync.replication.auth import KeyRing
from lbsync.replication.endpoint import ReplicationEndpoint
from lbsync.replication.events import RecordsApplied
from lbsync.replication.params import ProtocolParams
from lbsync.replication.store import BucketStore
from lbsync.replication.wire import (
    HEADER,
    HEADER_LEN,
    MAC_LEN,
    TYPE_DATA,
    HighWater,
    Limits,
    Membership,
    Nack,
    Parity,
    RemoteProtocolError,
    RepairState,
    decode_body,
    encode_message,
)

# The membership core's default heartbeat interval (lbsync/membership/timing.py, "default").
HEARTBEAT = 0.040
MEMBERSHIP_SUBKIND = 1

SIM_KEYRING = KeyRing({1: bytes(range(32))}, 1)


@dataclass(slots=True)
class SimBooks:
    """Traffic accounting of one simulation run."""

    originals: int = 0
    retransmissions: int = 0  # repair datagrams: plain retransmissions and parities
    parities: int = 0
    nack_datagrams: int = 0
    control_datagrams: int = 0
    wire_datagrams: int = 0
    dropped: int = 0
    duplicated: int = 0
    records_applied: int = 0
    missed: dict[tuple[int, int, int], set[int]] = field(default_factory=dict)
    nacks_per_gap: Counter[tuple[int, int, int]] = field(default_factory=Counter)
    # Each NACK datagram's cost shared among the datagrams it names (1/k to each of k).
    nack_share: dict[tuple[int, int, int], float] = field(default_factory=dict)
    heartbeats: int = 0
    # CONTROL datagrams without a NACK that carried repair states (sent anyway: heartbeats,
    # tail probes, parities...), by what else they carried, and the repair states' bytes.
    carriers: Counter[str] = field(default_factory=Counter)
    piggyback_bytes: int = 0

    def gaps(self) -> int:
        """Original DATA datagrams missed by at least one receiver."""
        return len(self.missed)

    def repair_overhead(self) -> float:
        """(retransmitted + NACK datagrams) / datagrams missed by at least one receiver."""
        g = self.gaps()
        return (self.retransmissions + self.nack_datagrams) / g if g else 0.0

    def nack_per_gap(self) -> tuple[float, int, int]:
        """(mean, 99th percentile, max) over missed datagrams of the NACK datagrams that
        named each (all repair rounds)."""
        g = self.gaps()
        if not g:
            return 0.0, 0, 0
        counts = sorted(self.nacks_per_gap.get(k, 0) for k in self.missed)
        return sum(counts) / g, counts[min(g - 1, (99 * g) // 100)], counts[-1]

    def nack_histogram(self) -> Counter[int]:
        """Missed datagrams by the number of NACK datagrams that named them."""
        return Counter(self.nacks_per_gap.get(k, 0) for k in self.missed)

    def nack_share_max(self) -> float:
        """The largest NACK cost of one missed datagram, each NACK datagram shared equally
        among the datagrams it names."""
        return max((self.nack_share.get(k, 0.0) for k in self.missed), default=0.0)


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """Outcome of :func:`run_scenario`."""

    seed: int
    converged: bool
    heal_time: float
    deadline: float
    converge_time: float | None  # after the last change (or the heal), virtual seconds
    entries: int
    divergence: tuple[str, ...]
    overhead: float
    nack_mean: float
    nack_p99: int
    nack_max: int
    gaps: int
    originals: int
    retransmissions: int
    nack_datagrams: int
    nack_over3: int = 0  # missed datagrams named by more than 3 NACK datagrams
    nack_histogram: tuple[tuple[int, int], ...] = ()  # (NACK datagrams, missed datagrams)
    nack_share_max: float = 0.0
    parities: int = 0  # of the retransmissions
    heartbeats: int = 0
    carriers: int = 0  # datagrams sent anyway that carried repair states
    piggyback_bytes: int = 0  # repair state bytes on them
    nack_fallbacks: int = 0  # NACK datagrams sent because no carrier left for nack_fallback


class Simulation:
    """Endpoints ``1..n`` (or the given ids) on a seeded fake network."""

    def __init__(self, *, nodes: int | Sequence[int], params: ProtocolParams, seed: int,
                 loss: float = 0.0, duplicate: float = 0.0, delay: float = 0.0002,
                 jitter: float = 0.0003, mode: Literal["multicast", "unicast"] = "multicast",
                 keyring: KeyRing = SIM_KEYRING, max_entries: int = 2_000_000,
                 heartbeat: float | None = None) -> None:
        ids = list(range(1, nodes + 1)) if isinstance(nodes, int) else list(nodes)
        self.params = params
        self.seed = seed
        self.rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.delay = delay
        self.jitter = jitter
        self.mode = mode
        self.keyring = keyring
        self.now = 0.0
        self.books = SimBooks()
        self.endpoints: dict[int, ReplicationEndpoint] = {}
        self.incarnations: dict[int, int] = {}
        self.owners: dict[int, tuple[int, int]] = {}  # bucket -> (node, owner_epoch)
        self.blocked: set[tuple[int, int]] = set()
        self.down: set[int] = set()
        # Optional per-datagram rule: None drops it, a number adds that much delay.
        self.filter: Callable[[int, int, bytes], float | None] | None = None
        self.last_change = 0.0
        self.events_seen: Counter[str] = Counter()
        self._max_entries = max_entries
        self._heap: list[tuple[float, int, int, bytes | Callable[[], None]]] = []
        self._n = 0
        self._timers: dict[int, float | None] = {}
        self._seen: set[tuple[int, int, int]] = set()
        self._limits = Limits(buckets=params.buckets, max_datagram=params.max_datagram)
        self.node_ids = tuple(ids)
        for node in ids:
            self.incarnations[node] = 1
            self.endpoints[node] = self._new_endpoint(node, BucketStore(
                params.buckets, max_entries=max_entries))
        self.heartbeat = heartbeat
        # A heartbeat names every peer (membership/messages.py): ~60 + 12 per peer bytes.
        self._hb_size = 60 + 12 * (len(ids) - 1)
        if heartbeat is not None:
            for node in ids:
                self.at(self.rng.random() * heartbeat, functools.partial(self._beat, node))

    def _beat(self, node: int) -> None:
        assert self.heartbeat is not None
        if node not in self.down:
            self.endpoints[node].send_membership(MEMBERSHIP_SUBKIND,
                                                 self.rng.randbytes(self._hb_size), self.now)
            self.books.heartbeats += 1
            self._poll(node)
        self.at(self.now + self.heartbeat * (1 - 0.1 * self.rng.random()),
                functools.partial(self._beat, node))

    def _new_endpoint(self, node: int, store: BucketStore) -> ReplicationEndpoint:
        ep = ReplicationEndpoint(
            node_id=node, incarnation=self.incarnations[node], keyring=self.keyring,
            params=self.params, now=self.now,
            rng=random.Random(self.seed * 1009 + node * 31 + self.incarnations[node]),
            store=store, nodes=self.node_ids)
        self._timers[node] = ep.get_timer()
        return ep

    # -- scenario controls -------------------------------------------------------------------

    def at(self, t: float, action: Callable[[], None]) -> None:
        """Run ``action`` at virtual time ``t``."""
        self._n += 1
        heapq.heappush(self._heap, (t, self._n, 0, action))

    def claim(self, node: int, bucket: int, owner_epoch: int) -> None:
        self.endpoints[node].claim(bucket, owner_epoch, self.now)
        old = self.owners.get(bucket)
        if old is not None and old[0] != node:
            self.endpoints[old[0]].release(bucket)
        self.owners[bucket] = (node, owner_epoch)
        self._poll(node)

    def update(self, node: int, bucket: int, key: bytes, record: bytes) -> None:
        self.endpoints[node].update_flow(bucket, key, record, self.now)
        self.last_change = self.now
        self._poll(node)

    def delete(self, node: int, bucket: int, key: bytes) -> None:
        self.endpoints[node].delete_flow(bucket, key, self.now)
        self.last_change = self.now
        self._poll(node)

    def partition(self, *groups: Iterable[int]) -> None:
        """Only nodes of the same group hear each other."""
        sets = [set(g) for g in groups]
        self.blocked = {(a, b) for a in self.endpoints for b in self.endpoints
                        if a != b and not any(a in s and b in s for s in sets)}

    def heal(self) -> None:
        self.blocked = set()
        self.loss = 0.0
        self.duplicate = 0.0

    def restart(self, node: int) -> None:
        """The node's daemon restarts: a higher incarnation, its owned buckets rebuilt from its
        kernel (here: its store's owned buckets), its standby copies gone."""
        old = self.endpoints[node]
        store = BucketStore(self.params.buckets, max_entries=self._max_entries)
        self.incarnations[node] += 1
        ep = self._new_endpoint(node, store)
        for bucket, epoch in old.sender.owned.items():
            ep.claim(bucket, epoch, self.now)
            flows, expects = old.store.snapshot(bucket)
            for key, record in flows.items():
                store.put(0, bucket, epoch, key, record)
            for key, record in expects.items():
                store.put(1, bucket, epoch, key, record)
        self.endpoints[node] = ep
        self._poll(node)

    # -- the clock ---------------------------------------------------------------------------

    def _poll(self, node: int) -> None:
        ep = self.endpoints[node]
        for data in ep.datagrams_to_send():
            self._transmit(node, data)
        while (e := ep.next_event()) is not None:
            self.events_seen[type(e).__name__] += 1
            if isinstance(e, RecordsApplied):
                self.books.records_applied += len(e.changes)
        self._timers[node] = ep.get_timer()

    def _transmit(self, src: int, data: bytes) -> None:
        if src in self.down:
            return
        books = self.books
        dtype = data[3]
        ident: tuple[int, int, int] | None = None
        if dtype == TYPE_DATA:
            _m, _v, _t, _s, _k, _f, inc, seq, _o = HEADER.unpack_from(data)
            ident = (src, inc, seq)
            if ident in self._seen:
                books.retransmissions += 1
                ident = None  # only originals are gaps
            else:
                self._seen.add(ident)
                books.originals += 1
        else:
            books.control_datagrams += 1
            self._count_nacks(data)
        rng = self.rng
        # Unicast: the copies leave one after the other (10 us apart); multicast: together.
        serial = 1e-5 if self.mode == "unicast" else 0.0
        for i, dst in enumerate(self.endpoints):
            if dst == src:
                continue
            books.wire_datagrams += 1
            extra = 0.0 if self.filter is None else self.filter(src, dst, data)
            if (extra is None or (src, dst) in self.blocked or dst in self.down
                    or rng.random() < self.loss):
                books.dropped += 1
                if ident is not None:
                    books.missed.setdefault(ident, set()).add(dst)
                continue
            copies = 2 if rng.random() < self.duplicate else 1
            if copies == 2:
                books.duplicated += 1
            for _ in range(copies):
                t = self.now + self.delay + extra + i * serial + rng.random() * self.jitter
                self._n += 1
                heapq.heappush(self._heap, (t, self._n, dst, data))

    def _count_nacks(self, data: bytes) -> None:
        try:
            messages = decode_body(data[HEADER_LEN:-MAC_LEN], data[3], self._limits)
        except RemoteProtocolError:
            return
        named: set[tuple[int, int, int]] = set()
        stated: set[tuple[int, int, int]] = set()
        state_bytes = 0
        nack = False
        for m in messages:
            if isinstance(m, Parity):
                self.books.retransmissions += 1
                self.books.parities += 1
            elif isinstance(m, Nack):
                nack = True
                for start, count in m.ranges:
                    for seq in range(start, start + count):
                        named.add((m.target, m.incarnation, seq & 0xFFFFFFFF))
            elif isinstance(m, RepairState):
                state_bytes += len(encode_message(m))
                for first, mask in m.blocks:
                    for i in range(16):
                        if mask >> i & 1:
                            stated.add((m.target, m.incarnation, (first + i) & 0xFFFFFFFF))
        if stated and not nack:
            # Sent anyway: what else it carried says why it left.
            why = ("parity" if any(isinstance(m, Parity) for m in messages)
                   else "heartbeat" if any(isinstance(m, Membership) for m in messages)
                   else "probe" if all(isinstance(m, HighWater | RepairState)
                                       for m in messages)
                   else "other")
            self.books.carriers[why] += 1
            self.books.piggyback_bytes += state_bytes
        if nack:
            named |= stated  # a NACK datagram counts for everything it asks for
            books = self.books
            books.nack_datagrams += 1
            books.nacks_per_gap.update(named)
            share = 1.0 / len(named)
            for k in named:
                books.nack_share[k] = books.nack_share.get(k, 0.0) + share

    def next_deadline(self) -> float | None:
        t = self._heap[0][0] if self._heap else None
        for node, d in self._timers.items():
            if d is not None and node not in self.down and (t is None or d < t):
                t = d
        return t

    def step(self, limit: float) -> bool:
        """Advance to the next deadline if it is <= ``limit``; False when there is none."""
        t = self.next_deadline()
        if t is None or t > limit:
            return False
        self.now = max(self.now, t)
        while self._heap and self._heap[0][0] <= self.now:
            _t, _n, dst, item = heapq.heappop(self._heap)
            if isinstance(item, bytes):
                if dst in self.down:
                    continue
                self.endpoints[dst].datagram_received(item, self.now)
                self._poll(dst)
            else:
                item()
        for node, d in list(self._timers.items()):
            if d is not None and d <= self.now and node not in self.down:
                self.endpoints[node].handle_timer(self.now)
                self._poll(node)
        return True

    def run_until(self, t: float) -> None:
        while self.step(t):
            pass
        self.now = max(self.now, t)

    # -- the invariant -----------------------------------------------------------------------

    def divergence(self, limit: int = 10) -> list[str]:
        """Where a node's copy of a bucket differs from its owner's (empty: converged)."""
        out: list[str] = []
        for bucket, (owner, _epoch) in sorted(self.owners.items()):
            truth = self.endpoints[owner].store.snapshot(bucket)
            for node, ep in self.endpoints.items():
                if node == owner or node in self.down:
                    continue
                mine = ep.store.snapshot(bucket)
                if mine != truth:
                    missing = len(truth[0].keys() - mine[0].keys())
                    extra = len(mine[0].keys() - truth[0].keys())
                    out.append(f"node {node} bucket {bucket}: {missing} missing, {extra} extra, "
                               f"{len(truth[0])} at owner {owner}")
                    if len(out) >= limit:
                        return out
        return out

    def converged(self) -> bool:
        for bucket, (owner, _epoch) in self.owners.items():
            want = self.endpoints[owner].store.digest(bucket)
            for node, ep in self.endpoints.items():
                if node != owner and node not in self.down and ep.store.digest(bucket) != want:
                    return False
        return not self.divergence(1)

    def entries(self) -> int:
        return sum(self.endpoints[o].store.count(b) for b, (o, _e) in self.owners.items())


def random_record(rng: random.Random, size: int = 96) -> bytes:
    return rng.randbytes(size)


def schedule_traffic(sim: Simulation, *, rng: random.Random, duration: float, ops: int,
                     keys_per_node: int, burst: int = 40, start: float = 0.0) -> None:
    """Bursts of creates, updates and deletes by every owner on its own buckets, at random
    times in ``[start, start + duration)``."""
    owned: dict[int, list[int]] = {}
    for bucket, (node, _e) in sim.owners.items():
        owned.setdefault(node, []).append(bucket)
    for node, buckets in owned.items():
        live: dict[bytes, int] = {}
        remaining = ops
        while remaining > 0:
            n = min(remaining, rng.randint(1, burst))
            remaining -= n
            t = start + rng.random() * duration
            plan: list[tuple[str, int, bytes, bytes]] = []
            for _ in range(n):
                r = rng.random()
                if live and r < 0.2:
                    key = rng.choice(list(live))
                    plan.append(("del", live.pop(key), key, b""))
                elif live and r < 0.5:
                    key = rng.choice(list(live))
                    plan.append(("upd", live[key], key, random_record(rng)))
                else:
                    key = b"n%d-k%d" % (node, rng.randrange(keys_per_node))
                    bucket = live.get(key, rng.choice(buckets))
                    live[key] = bucket
                    plan.append(("upd", bucket, key, random_record(rng)))

            def burst_action(node: int = node,
                             plan: list[tuple[str, int, bytes, bytes]] = plan) -> None:
                for op, bucket, key, record in plan:
                    if sim.owners.get(bucket, (0, 0))[0] != node:
                        continue  # bucket moved away meanwhile
                    if op == "del":
                        sim.delete(node, bucket, key)
                    else:
                        sim.update(node, bucket, key, record)
            sim.at(t, burst_action)


def _nack_tail(sim: Simulation) -> dict[str, Any]:
    books = sim.books
    hist = books.nack_histogram()
    return {"nack_over3": sum(v for k, v in hist.items() if k > 3),
            "nack_histogram": tuple(sorted(hist.items())),
            "nack_share_max": books.nack_share_max(), "parities": books.parities,
            "heartbeats": books.heartbeats, "carriers": books.carriers.total(),
            "piggyback_bytes": books.piggyback_bytes,
            "nack_fallbacks": sum(ep.receiver.nack_fallbacks
                                  for ep in sim.endpoints.values())}


def run_scenario(*, seed: int, params: ProtocolParams, nodes: int = 3, loss: float = 0.0,
                 duplicate: float = 0.0, jitter: float = 0.0003,
                 mode: Literal["multicast", "unicast"] = "multicast", ops: int = 300,
                 traffic: float = 1.0, heal: bool = True, sample: float = 0.01,
                 heartbeat: float | None = HEARTBEAT) -> ScenarioResult:
    """Every node owns ``buckets/nodes`` buckets and changes them for ``traffic`` seconds on a
    lossy network; the network heals at T_h = end of traffic (unless ``heal`` is False: loss
    continues); convergence is required by T_h + 2*T_max + resync time, where the resync time
    is ``resync_timeout`` (one lost request) plus every entry at ``resync_rate``."""
    sim = Simulation(nodes=nodes, params=params, seed=seed, loss=loss, duplicate=duplicate,
                     jitter=jitter, mode=mode, heartbeat=heartbeat)
    rng = random.Random(seed ^ 0x5EED)
    ids = sorted(sim.endpoints)
    for b in range(params.buckets):
        sim.claim(ids[b % len(ids)], b, 1)
    schedule_traffic(sim, rng=rng, duration=traffic, ops=ops, keys_per_node=ops // 2)
    t_heal = traffic
    sim.run_until(t_heal)
    if heal:
        sim.heal()
    entries = sim.entries()
    deadline = t_heal + 2 * params.idle_max + params.resync_timeout + \
        entries / params.resync_rate
    converge_at: float | None = None
    t = t_heal
    while t < deadline:
        t = min(deadline, t + sample)
        sim.run_until(t)
        if sim.converged():
            converge_at = sim.now
            break
    sim.run_until(deadline)
    converged = sim.converged()
    mean, p99, mx = sim.books.nack_per_gap()
    return ScenarioResult(
        seed=seed, converged=converged, heal_time=t_heal, deadline=deadline,
        converge_time=None if converge_at is None else converge_at - max(sim.last_change, 0),
        entries=entries, divergence=tuple(sim.divergence()), overhead=sim.books.repair_overhead(),
        nack_mean=mean, nack_p99=p99, nack_max=mx, gaps=sim.books.gaps(),
        originals=sim.books.originals, retransmissions=sim.books.retransmissions,
        nack_datagrams=sim.books.nack_datagrams, **_nack_tail(sim))



def run_stream(*, seed: int, params: ProtocolParams, receivers: int, loss: float,
               mode: Literal["multicast", "unicast"] = "multicast", records: int = 5000,
               rate: float = 20_000.0, duplicate: float = 0.0, jitter: float = 0.0003,
               settle: float = 5.0, heartbeat: float | None = HEARTBEAT) -> ScenarioResult:
    """One owner streams ``records`` flow updates at ``rate``/s to ``receivers`` peers while
    loss stays on (repairs are lost too); ends when every peer holds the owner's state or
    ``settle`` seconds after the stream, whichever comes first."""
    sim = Simulation(nodes=receivers + 1, params=params, seed=seed, loss=loss,
                     duplicate=duplicate, jitter=jitter, mode=mode, heartbeat=heartbeat)
    rng = random.Random(seed ^ 0xFEED)
    for b in range(params.buckets):
        sim.claim(1, b, 1)
    step = 1.0 / rate
    batch = max(1, int(rate * 0.001))  # one action per virtual millisecond
    for i in range(0, records, batch):
        plan = [(rng.randrange(params.buckets), b"k%d" % (i + j), random_record(rng))
                for j in range(min(batch, records - i))]

        def action(plan: list[tuple[int, bytes, bytes]] = plan) -> None:
            for bucket, key, record in plan:
                sim.update(1, bucket, key, record)
        sim.at(i * step, action)
    end = records * step
    sim.run_until(end)
    converge_at: float | None = None
    t = end
    while t < end + settle:
        t += 0.01
        sim.run_until(t)
        if sim.converged():
            converge_at = sim.now
            break
    mean, p99, mx = sim.books.nack_per_gap()
    return ScenarioResult(
        seed=seed, converged=converge_at is not None, heal_time=end, deadline=end + settle,
        converge_time=None if converge_at is None else converge_at - sim.last_change,
        entries=sim.entries(), divergence=tuple(sim.divergence()),
        overhead=sim.books.repair_overhead(), nack_mean=mean, nack_p99=p99, nack_max=mx,
        gaps=sim.books.gaps(), originals=sim.books.originals,
        retransmissions=sim.books.retransmissions, nack_datagrams=sim.books.nack_datagrams,
        **_nack_tail(sim))
