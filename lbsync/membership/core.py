"""Membership, failure detection, self-fencing and claim decisions: a sans-IO state machine.

The daemon feeds it heartbeats from peers (``receive``), wakes it at ``get_timer()``
(``handle_timer``), sends what ``datagrams_to_send()`` returns and acts on ``next_event()``.
Every time-dependent method takes ``now`` (monotonic seconds from the loop); jitter comes from
the injected ``random.Random``. Nothing here reads a clock or touches a socket.

Rules (docs/membership.md explains them at length):

1. **Heartbeats.** Every voter multicasts a heartbeat every T_hb (jittered down, never late):
   incarnation, seq, map epoch/proposer/digest, owned-bucket bitmap, ready/fenced/drained flags,
   weight, remaining leave grace, and per other node: incarnation heard, ``age_ms`` since heard,
   ``echo_seq`` (last seq heard, 0 if the sender refuses to vouch) and ``lost_incarnation``.
2. **Lease (self-fencing).** A node may forward only while *backed*: a strict majority of the
   voters (itself included; a witness is a voter) has echoed one of its heartbeats sent less
   than T_fence ago (or, for a heartbeat that announced a leave grace, less than that grace).
   Lease times are the node's own send times, so network delay can only shorten a lease. When
   backing is lost, or the loop stalled for more than T_stall, ``FenceRequired``; when backed
   again by echoes of heartbeats sent after the stall, ``Unfenced`` (restore ``@owned``).
   ``lease_expiry()`` is the instant forwarding must stop by itself if the daemon hangs (the
   daemon writes it as the timeout of the ``@owned`` elements).
3. **Declaring a peer lost** (``PeerLost``), only while backed: the peer has been silent for
   T_dead here, its leave grace (if any) is over, and every live voter's latest report,
   extrapolated to now, also says silent for T_dead (or lost). A declaration is a promise and is
   sticky: the declarer stops echoing the peer (no lease from it) until the peer announces it
   owns nothing (released). T_fence < T_dead, so every lease the declarer gave has expired.
4. **Release.** A node that is fenced and sees a voter's report declaring its incarnation lost
   drops its ownership for good (``OwnershipReleased``) and continues as a new incarnation
   (+1) owning nothing; it gets buckets back only by rejoining (readiness gate, handoff or
   a rebuilt map: issue 8). An unfenced node ignores such reports: it is backed by a
   majority that did not declare it, so no majority can have.
5. **Claim** (``TakeoverDecided``), only while backed, ready and holding a map: a node D is
   *dead* when a strict majority of voters has declared D's owning incarnation lost (each
   voter's latest report, plus this node). The agreed map without the dead nodes
   (``TargetMap.without``: each dead bucket to the first non-dead member of its chain) becomes
   the new map (epoch + 1); this node decides the buckets whose last reported owner is dead and
   whose new target is itself. Declarers refuse leases, so the dead node is fenced by then.
   Buckets nobody ever reported owning (bootstrap) are claimed only when every non-dead node
   reports the same map digest. The daemon runs the safety pass, claims, and calls
   ``claim_done``.
6. **Maps.** Highest ``(epoch, -proposer)`` wins; a node that sees a better map in a heartbeat
   asks for it (``MapRequest``/``MapOffer``) and adopts it (``MapAdopted``). A node without a map
   decides nothing. When no node has a map, the lowest-id node that hears every configured node
   and is backed asks the daemon for one (``MapBootstrapNeeded``).
7. **Restarts and planned stops.** A new incarnation that reports owning nothing voids the old
   one at once (its kernel set was emptied at start); one that resumes buckets is accepted only
   while its leave grace runs, otherwise it is declared lost and must release. A node that
   ``leave()``s announces a grace: peers do not declare it before the grace ends, and its lease
   (hence its kernel ``@owned`` timeouts) extends to the grace only as far as peers echoed it.
3b. **keepalived's verdict** (``vrrp_verdict``; docs/keepalived.md). When this node's keepalived
   took over peer X's VRRP instance (X stopped advertising on the management link), rule 3
   applies to X with T_fence instead of T_dead: this node's own silence from X, and every
   other live voter's report, need only reach T_fence (or say lost). Nothing else changes:
   grace, incarnations, the sticky declaration, the majority for a claim. Safe because every
   lease this node gave X ends by ``last_heard(X) + T_fence`` (X's lease counts X's own send
   times of heartbeats this node echoed, all sent before it last heard X); T_dead - T_fence
   is margin against false declarations, not a safety term. Only X's first live successor
   gets the verdict, so with ``vrrp=True`` (the cluster runs keepalived) a node that sees a
   live voter's report declaring X's incarnation lost applies T_fence to X as well, on its
   own silence and its own lease book. A verdict with X's heartbeats still arriving removes
   nobody. ``vrrp_verdict(X, dead=False)`` (X advertises again) withdraws it.
8. **Voters.** Majorities are counted over the configured nodes plus the witness, less the
   nodes a majority declared dead that the agreed map no longer holds, dropped one at a time
   (never below two voters): old and new majorities always intersect, and a dropped node can
   never be backed again in its declared incarnation. So four nodes survive two deaths one
   after the other (not at once). A node counts again once an agreed map holds it.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from lbsync.membership.messages import (
    Heartbeat,
    MapOffer,
    MapRequest,
    MembershipMessage,
    PeerReport,
)
from lbsync.membership.ownermap import (
    MAX_NODE_ID,
    NO_OWNER,
    TargetMap,
    bitmap_from_buckets,
    buckets_from_bitmap,
)
from lbsync.membership.timing import Timing

SENT_HISTORY = 256
"""Own heartbeats whose send time is remembered (echoes of older ones give no lease)."""
TAKEOVER_HISTORY = 32
EVENT_QUEUE_MAX = 4096
OUTBOX_MAX = 1024
MAX_AGE_MS = 0xFFFFFFFF


class MembershipError(Exception):
    """Local misuse of the membership core (a bug in the caller)."""


# ------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """Fires when a peer is heard for the first time, or readmitted after releasing."""

    node_id: int
    incarnation: int


@dataclass(frozen=True, slots=True)
class PeerRestarted:
    """Fires when a peer's heartbeat carries a higher incarnation than the one known."""

    node_id: int
    old_incarnation: int
    new_incarnation: int


@dataclass(frozen=True, slots=True)
class PeerLeaving:
    """Fires when a peer announces a planned stop; it will not be declared lost before
    ``grace`` seconds from now."""

    node_id: int
    incarnation: int
    grace: float


@dataclass(frozen=True, slots=True)
class PeerLost:
    """Fires when this node declares a peer's incarnation lost (rule 3; sticky)."""

    node_id: int
    incarnation: int
    silent_for: float


@dataclass(frozen=True, slots=True)
class FenceRequired:
    """Fires when this node must stop forwarding: empty ``@owned`` now. ``reason`` is
    ``no_majority`` or ``stall``."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unfenced:
    """Fires when this node may forward again: set ``@owned`` to ``owned``."""

    owned: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OwnershipReleased:
    """Fires when a fenced node learns a voter declared it lost: ``buckets`` are gone for good
    (keep them out of ``@owned``); the node owns nothing until it rejoins."""

    buckets: tuple[int, ...]
    declared_by: int
    incarnation: int = 0
    """The incarnation this node continues as (persist it: a restart must go above it)."""


@dataclass(frozen=True, slots=True)
class MapAdopted:
    """Fires when the agreed map changes (a better map from ``source``, or our own takeover or
    proposed map). Target ownership only: actual ownership is unchanged."""

    map: TargetMap
    source: int


@dataclass(frozen=True, slots=True)
class MapBootstrapNeeded:
    """Fires once when no node has a map and this node should propose the first one: compute
    it with ``hashing.assign`` from ``members`` and call ``propose_map``."""

    members: tuple[MemberInfo, ...]


@dataclass(frozen=True, slots=True)
class TakeoverDecided:
    """Fires when this node inherits ``buckets`` last owned by a dead node. The daemon runs the
    safety pass for them (inject what the store has and the kernel lacks), claims them in one
    nft transaction, then calls ``claim_done`` (or ``claim_failed``)."""

    dead_node: int
    dead_incarnation: int
    buckets: tuple[int, ...]
    new_map: TargetMap


Event = (PeerJoined | PeerRestarted | PeerLeaving | PeerLost | FenceRequired | Unfenced
         | OwnershipReleased | MapAdopted | MapBootstrapNeeded | TakeoverDecided)


# ------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A member as heartbeats describe it (input of ``hashing.assign``)."""

    node_id: int
    weight: int
    drained: bool
    ready: bool


@dataclass(frozen=True, slots=True)
class TakeoverRecord:
    """One takeover as this node lived it (times are this node's ``now``)."""

    dead_node: int
    dead_incarnation: int
    buckets: tuple[int, ...]
    last_heard_at: float | None
    """When this node last heard the dead node (None: never, e.g. bootstrap claims)."""
    declared_at: float
    decided_at: float
    claimed_at: float | None


@dataclass(frozen=True, slots=True)
class PeerStatus:
    node_id: int
    state: str
    incarnation: int
    silent_for: float | None
    """Seconds since last heard (None: never heard)."""
    lost_incarnation: int
    owned: int
    ready: bool
    fenced: bool


@dataclass(frozen=True, slots=True)
class MembershipStatistics:
    """Immutable snapshot for status and metrics."""

    node_id: int
    incarnation: int
    fenced: bool
    fence_reason: str
    released: bool
    ready: bool
    backers: int
    voters: int
    map_epoch: int
    map_proposer: int
    owned: int
    pending_claims: int
    peers: tuple[PeerStatus, ...]
    heartbeats_sent: int
    heartbeats_received: int
    heartbeats_stale: int
    messages_from_strangers: int
    bitmap_errors: int
    peers_lost: int
    fences: int
    stalls: int
    releases: int
    takeovers: int
    maps_adopted: int
    map_requests_sent: int
    lost_reports_ignored: int
    claims_refused: int
    events_dropped: int
    datagrams_dropped: int
    vrrp_verdicts: int
    """keepalived verdicts received (a peer stopped advertising; rule 3b)."""
    vrrp_verdicts_withdrawn: int
    peers_lost_by_vrrp: int
    """Declarations before T_dead of silence, made on this node's own keepalived verdict."""
    peers_lost_following: int
    """Declarations before T_dead of silence, following a voter's declaration (rule 3b)."""
    takeover_records: tuple[TakeoverRecord, ...]
    vrrp_dead: tuple[int, ...] = ()


# ------------------------------------------------------------------------------------------
# Peer liveness: a transition table; a (state, input) pair not listed is a bug.


class PeerState(enum.Enum):
    UNKNOWN = "unknown"
    ALIVE = "alive"
    LEAVING = "leaving"
    LOST = "lost"


class PeerInput(enum.Enum):
    HEARD = "heard"
    HEARD_LEAVING = "heard_leaving"
    HEARD_RELEASED = "heard_released"
    DECLARED = "declared"


_PEER_TRANSITIONS: dict[tuple[PeerState, PeerInput], PeerState] = {
    (PeerState.UNKNOWN, PeerInput.HEARD): PeerState.ALIVE,
    (PeerState.UNKNOWN, PeerInput.HEARD_RELEASED): PeerState.ALIVE,
    (PeerState.UNKNOWN, PeerInput.HEARD_LEAVING): PeerState.LEAVING,
    (PeerState.ALIVE, PeerInput.HEARD): PeerState.ALIVE,
    (PeerState.ALIVE, PeerInput.HEARD_RELEASED): PeerState.ALIVE,
    (PeerState.ALIVE, PeerInput.HEARD_LEAVING): PeerState.LEAVING,
    (PeerState.ALIVE, PeerInput.DECLARED): PeerState.LOST,
    (PeerState.LEAVING, PeerInput.HEARD): PeerState.ALIVE,
    (PeerState.LEAVING, PeerInput.HEARD_RELEASED): PeerState.ALIVE,
    (PeerState.LEAVING, PeerInput.HEARD_LEAVING): PeerState.LEAVING,
    (PeerState.LEAVING, PeerInput.DECLARED): PeerState.LOST,
    # A declaration is sticky: heard again, the peer stays lost until it has released.
    (PeerState.LOST, PeerInput.HEARD): PeerState.LOST,
    (PeerState.LOST, PeerInput.HEARD_LEAVING): PeerState.LOST,
    (PeerState.LOST, PeerInput.HEARD_RELEASED): PeerState.ALIVE,
}


class SelfState(enum.Enum):
    FENCED = "fenced"
    FORWARDING = "forwarding"


class SelfInput(enum.Enum):
    BACKED = "backed"
    UNBACKED = "unbacked"


_SELF_TRANSITIONS: dict[tuple[SelfState, SelfInput], SelfState] = {
    (SelfState.FENCED, SelfInput.BACKED): SelfState.FORWARDING,
    (SelfState.FENCED, SelfInput.UNBACKED): SelfState.FENCED,
    (SelfState.FORWARDING, SelfInput.BACKED): SelfState.FORWARDING,
    (SelfState.FORWARDING, SelfInput.UNBACKED): SelfState.FENCED,
}


@dataclass(slots=True)
class _Peer:
    node_id: int
    state: PeerState = PeerState.UNKNOWN
    incarnation: int = 0
    last_seq: int = 0
    last_heard: float = -math.inf
    grace_until: float = -math.inf
    lost_incarnation: int = 0
    last_hb: Heartbeat | None = None
    reports: dict[int, PeerReport] = field(default_factory=dict)
    owned: frozenset[int] = frozenset()
    map_request_at: float = -math.inf


def _majority(n: int) -> int:
    return n // 2 + 1


class Membership:
    """One node's membership core (see the module docstring for the rules)."""

    def __init__(
        self, *, node_id: int, nodes: Iterable[int], buckets: int, timing: Timing,
        rng: random.Random, now: float, incarnation: int, witness: int | None = None,
        role: Literal["node", "witness"] = "node", resume_owned: Iterable[int] = (),
        weight: int = 1, ready: bool = False,
        new_incarnation: Callable[[int], int] | None = None, vrrp: bool = False,
    ) -> None:
        node_ids = tuple(sorted(set(nodes)))
        if not 1 <= node_id <= MAX_NODE_ID:
            raise MembershipError("node_id must be 1..255")
        if any(not 1 <= n <= MAX_NODE_ID for n in node_ids):
            raise MembershipError("node ids must be 1..255")
        if witness is not None and (witness in node_ids or not 1 <= witness <= MAX_NODE_ID):
            raise MembershipError("the witness needs its own id 1..255, not a node's")
        if role == "node" and node_id not in node_ids:
            raise MembershipError(f"node {node_id} is not a configured node")
        if role == "witness" and node_id != witness:
            raise MembershipError("a witness runs with node_id == witness")
        if incarnation < 1:
            raise MembershipError("incarnation must be >= 1 (e.g. boot-persistent counter)")
        if not 1 <= buckets <= 4096:
            raise MembershipError("buckets must be 1..4096")
        self.node_id = node_id
        self.incarnation = incarnation
        # After a release: a fresh incarnation above the current one. The daemon passes its
        # persisted counter so that a later restart never reuses the number.
        self._new_incarnation = new_incarnation or (lambda cur: cur + 1)
        self.role = role
        self.nodes = node_ids
        self.witness = witness
        self._all_voters: tuple[int, ...] = node_ids + ((witness,) if witness is not None
                                                        else ())
        self._removed: set[int] = set()
        self._voters = self._all_voters
        self.nbuckets = buckets
        self.timing = timing
        # derived timings read on every call (Timing computes them per access)
        self._t_stall = timing.stall
        self._t_fence = timing.fence
        self._t_dead = timing.dead
        self._rng = rng
        self._start = now
        self._last_call = now
        self.weight = weight
        self.drained = False
        self.ready = ready and role == "node"
        self._peers = {n: _Peer(n) for n in self._all_voters if n != node_id}
        self._map: TargetMap | None = None
        self._seq = 0
        self._sent: dict[int, tuple[float, float]] = {}
        self._min_lease_seq = 1
        # lease_expiry() cached between changes of what it depends on (None: recompute). Every
        # write of those inputs calls _leases_changed(); the sim harness checks the cache
        # against a recomputation after every interaction.
        self._lease: float | None = None
        self._next_hb = now
        self._send_now = True
        self._state = SelfState.FENCED
        self._fence_reason = "starting"
        self._owned: set[int] = set(resume_owned) if role == "node" else set()
        self._pending: dict[int, tuple[int, int]] = {}
        self._released = False
        self._leave_at: float | None = None
        self._leave_grace = 0.0
        self._lost_declared: dict[int, float] = {}
        self._reported_owner: dict[int, tuple[int, int]] = {}
        self._bootstrap_asked = False
        self._rebuild_asked = b""
        self._bitmap_cache: tuple[frozenset[int], bytes] = (
            frozenset(), bitmap_from_buckets((), buckets))
        self._view_id = 0
        self._events: deque[Event] = deque()
        self._outbox: deque[tuple[int | None, MembershipMessage]] = deque()
        self._records: deque[TakeoverRecord] = deque(maxlen=TAKEOVER_HISTORY)
        self._open_records: dict[int, TakeoverRecord] = {}
        self._reported: dict[tuple[int, int], frozenset[int]] = {}
        self._map_mine: frozenset[int] = frozenset()
        self._map_nodes: frozenset[int] = frozenset()
        self._pending_retry_at = -math.inf
        # Rule 3b: peers keepalived says stopped advertising; whether to follow a voter's
        # declaration at T_fence (the cluster runs keepalived).
        self.vrrp = vrrp
        self._vrrp_dead: set[int] = set()
        self._c: dict[str, int] = dict.fromkeys(
            ("heartbeats_sent", "heartbeats_received", "heartbeats_stale",
             "messages_from_strangers", "bitmap_errors", "peers_lost", "fences", "stalls",
             "releases", "takeovers", "maps_adopted", "map_requests_sent",
             "lost_reports_ignored", "claims_refused", "events_dropped", "datagrams_dropped",
             "vrrp_verdicts", "vrrp_verdicts_withdrawn", "peers_lost_by_vrrp",
             "peers_lost_following"), 0)
        for b in self._owned:
            if not 0 <= b < buckets:
                raise MembershipError(f"resumed bucket {b} out of range")

    # -------------------------------------------------------------- daemon-facing queries

    @property
    def map(self) -> TargetMap | None:
        return self._map

    @property
    def voters(self) -> tuple[int, ...]:
        """The voters majorities are counted over: the configured nodes (and the witness),
        less dead nodes the agreed map has dropped (rule 8)."""
        return self._voters

    @property
    def fenced(self) -> bool:
        return self._state is SelfState.FENCED

    @property
    def owned(self) -> frozenset[int]:
        """Actual ownership (claimed buckets), whether fenced or not."""
        return frozenset(self._owned)

    def forwarding(self, now: float) -> frozenset[int]:
        """What ``@owned`` may hold at ``now``: owned buckets while backed, else nothing."""
        if self._state is SelfState.FENCED or now >= self.lease_expiry():
            return frozenset()
        return frozenset(self._owned)

    def lease_expiry(self) -> float:
        """Instant at which this node loses majority backing unless new echoes arrive: the
        timeout to give ``@owned`` elements, so a hung daemon fences itself in the kernel."""
        lease = self._lease
        if lease is None:
            lease = self._lease = self._lease_expiry_uncached()
        return lease

    def _leases_changed(self) -> None:
        """An input of ``lease_expiry`` changed: the voters, this node's incarnation or
        ``_min_lease_seq``, the send-time history, a peer's state or its last heartbeat."""
        self._lease = None

    def _lease_expiry_uncached(self) -> float:
        voters = self.voters
        need = _majority(len(voters)) - (1 if self.node_id in voters else 0)
        if need <= 0:
            return math.inf
        leases = sorted((self._lease_from(v) for v in self._peers if v in voters),
                        reverse=True)
        if len(leases) < need:
            return -math.inf
        return leases[need - 1]

    def ready_view(self) -> tuple[MemberInfo, ...]:
        """Ready, live, non-witness members as heartbeats describe them (for hashing.assign)."""
        out = []
        if self.role == "node" and self.ready:
            out.append(MemberInfo(self.node_id, self.weight, self.drained, True))
        for p in self._peers.values():
            hb = p.last_hb
            if (p.state in (PeerState.ALIVE, PeerState.LEAVING) and hb is not None
                    and not hb.witness and hb.ready):
                out.append(MemberInfo(p.node_id, hb.weight, hb.drained, True))
        return tuple(sorted(out, key=lambda m: m.node_id))

    # -------------------------------------------------------------- sans-IO plumbing

    def get_timer(self) -> float:
        """The next instant ``handle_timer`` must be called."""
        # Candidates at or before the last call were evaluated then; what else changes the
        # outcome is a message, which triggers its own evaluation.
        cands = [self._pending_retry_at]
        if self._state is SelfState.FORWARDING:
            cands.append(self.lease_expiry())
        cands.extend(self._declare_at(p) for p in self._peers.values()
                     if p.state in (PeerState.ALIVE, PeerState.LEAVING))
        return min([self._next_hb, *(c for c in cands if c > self._last_call)])

    def handle_timer(self, now: float) -> None:
        self._tick(now)
        if now >= self._next_hb:
            self._send_now = True
        self._update(now)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[tuple[int | None, MembershipMessage]]:
        """(destination node id, or None for every peer, message) pairs, oldest first."""
        out = list(self._outbox)
        self._outbox.clear()
        return out

    def receive(self, msg: MembershipMessage, now: float) -> None:
        """A decoded membership message from the replication channel (authenticated there)."""
        self._tick(now)
        sender = msg.node_id
        if sender == self.node_id or sender not in self._peers:
            self._c["messages_from_strangers"] += 1
            return
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(msg, now)
        elif isinstance(msg, MapRequest):
            if self._map is not None:
                self._queue(sender, MapOffer(node_id=self.node_id, map=self._map))
        else:
            self._on_map_offer(msg, now)
        self._update(now)

    # -------------------------------------------------------------- daemon commands

    def set_local(self, now: float, *, ready: bool | None = None, weight: int | None = None,
                  drained: bool | None = None) -> None:
        """Readiness gate and operator state, announced from the next heartbeat (sent now)."""
        self._tick(now)
        if ready is not None:
            if ready and self.role != "node":
                raise MembershipError("a witness is never ready")
            self.ready = ready
        if weight is not None:
            self.weight = weight
        if drained is not None:
            self.drained = drained
        self._send_now = True
        self._update(now)

    def propose_map(self, new_map: TargetMap, now: float) -> None:
        """Install a map the daemon computed (bootstrap, rebuild, rebalance). It is renumbered
        to outrank ours if needed (epoch = ours + 1). Without recorded incarnations, the
        members' current ones are recorded."""
        self._tick(now)
        if not new_map.incarnations:
            known = {self.node_id: self.incarnation} | {
                n: p.incarnation for n, p in self._peers.items()
                if p.state in (PeerState.ALIVE, PeerState.LEAVING)}
            members = {n for k in range(new_map.nbuckets) for n in new_map.chain(k)}
            new_map = new_map.with_incarnations(
                (n, known[n]) for n in members if n in known)
        if new_map.nbuckets != self.nbuckets:
            raise MembershipError("map has the wrong number of buckets")
        if self._map is not None and new_map.rank <= self._map.rank:
            new_map = TargetMap(epoch=self._map.epoch + 1, proposer=self.node_id,
                                owners=new_map.owners, successors=new_map.successors,
                                incarnations=new_map.incarnations)
        self._adopt(new_map, self.node_id)
        self._update(now)

    def claim_done(self, buckets: Iterable[int], now: float) -> frozenset[int]:
        """The daemon committed these buckets to ``@owned``. Returns those accepted; any other
        (no longer pending, or we fenced meanwhile) must be removed from ``@owned`` again."""
        self._tick(now)
        accepted = set()
        for b in buckets:
            if b in self._pending and self._state is SelfState.FORWARDING:
                dead = self._pending.pop(b)
                self._owned.add(b)
                accepted.add(b)
                rec = self._open_records.get(dead[0])
                if rec is not None and b in rec.buckets:
                    self._close_record(rec, b, now)
            else:
                self._c["claims_refused"] += 1
                self._pending.pop(b, None)
        self._send_now = True
        self._update(now)
        return frozenset(accepted)

    def claim_failed(self, buckets: Iterable[int], now: float) -> None:
        """The daemon could not claim these; they may be decided again later."""
        self._tick(now)
        for b in buckets:
            self._pending.pop(b, None)
        self._pending_retry_at = now + self.timing.heartbeat
        self._update(now)

    def handoff_release(self, buckets: Iterable[int], now: float) -> frozenset[int]:
        """Planned handoff, old owner: stop owning ``buckets`` now (the daemon removes them from
        ``@owned`` right after, before the new owner claims). The regular next heartbeat stops
        reporting them: not sooner, so the new owner's take (after the seal) normally comes
        before the bucket looks orphaned. Returns those that were owned."""
        self._tick(now)
        gone = frozenset(b for b in buckets if b in self._owned)
        self._owned.difference_update(gone)
        return gone

    def handoff_claimed(self, buckets: Iterable[int], now: float) -> frozenset[int]:
        """Planned handoff, new owner: the daemon committed ``buckets`` to ``@owned`` after their
        old owner released them. Accepted only while forwarding (backed); the daemon must
        remove any other from ``@owned`` again."""
        self._tick(now)
        if self._state is SelfState.FENCED or self.role != "node":
            return frozenset()
        got = frozenset(b for b in buckets if 0 <= b < self.nbuckets)
        self._owned.update(got)
        for b in got:
            self._pending.pop(b, None)
        self._send_now = True
        self._update(now)
        return got

    def reported_owned(self) -> dict[int, frozenset[int]]:
        """Per peer not declared lost (witness excluded): the buckets its last heartbeat
        reported owning, fenced or not (actual ownership as this node knows it)."""
        return {p.node_id: p.owned for p in self._peers.values()
                if p.last_hb is not None and not p.last_hb.witness
                and p.state is not PeerState.LOST}

    def leave(self, grace: float, now: float) -> float:
        """Announce a planned stop with ``grace`` seconds during which peers hold our buckets.
        Returns the lease expiry reachable with it once peers echo (a cap for ``@owned``)."""
        self._tick(now)
        if grace <= 0:
            raise MembershipError("grace must be > 0")
        self._leave_at = now
        self._leave_grace = grace
        self._send_now = True
        self._update(now)
        return now + grace

    def loop_stalled(self, gap: float, now: float) -> None:
        """The daemon measured a loop stall of ``gap`` seconds (also detected from ``now``)."""
        if gap > self.timing.stall:
            self._stall(now)
        self._tick(now)
        self._update(now)

    def vrrp_verdict(self, peer: int, dead: bool, now: float) -> None:
        """keepalived on this node took over ``peer``'s VRRP instance (``dead``: the peer
        stopped advertising) or gave it back (``dead=False``): rule 3b. Idempotent."""
        self._tick(now)
        if peer == self.node_id or peer not in self._peers or peer not in self.nodes:
            raise MembershipError(f"vrrp_verdict: {peer} is not a peer node")
        if dead and peer not in self._vrrp_dead:
            self._vrrp_dead.add(peer)
            self._c["vrrp_verdicts"] += 1
        elif not dead and peer in self._vrrp_dead:
            self._vrrp_dead.discard(peer)
            self._c["vrrp_verdicts_withdrawn"] += 1
        self._update(now)

    @property
    def vrrp_dead(self) -> frozenset[int]:
        """Peers keepalived currently says stopped advertising (rule 3b)."""
        return frozenset(self._vrrp_dead)

    # -------------------------------------------------------------- internals: input

    def _tick(self, now: float) -> None:
        if now - self._last_call > self._t_stall:
            self._stall(now)
        self._last_call = max(self._last_call, now)

    def _stall(self, now: float) -> None:
        self._c["stalls"] += 1
        # Only echoes of heartbeats sent after the stall back us again.
        self._min_lease_seq = self._seq + 1
        self._leases_changed()
        if self._state is SelfState.FORWARDING:
            self._set_self(SelfInput.UNBACKED, "stall")
        self._send_now = True

    def _on_heartbeat(self, hb: Heartbeat, now: float) -> None:
        p = self._peers[hb.node_id]
        if hb.incarnation < p.incarnation or (hb.incarnation == p.incarnation
                                                and hb.seq <= p.last_seq):
            self._c["heartbeats_stale"] += 1
            return
        if hb.witness != (hb.node_id == self.witness):
            self._c["messages_from_strangers"] += 1
            return
        try:
            if p.last_hb is not None and p.last_hb.owned == hb.owned:
                owned = p.owned  # the common case: nothing changed, skip the decode
            else:
                owned = buckets_from_bitmap(hb.owned, self.nbuckets) if hb.owned \
                    else frozenset()
        except ValueError:
            self._c["bitmap_errors"] += 1
            return
        self._c["heartbeats_received"] += 1
        restarted = p.incarnation != 0 and hb.incarnation > p.incarnation
        old_inc = p.incarnation
        in_grace = p.state is PeerState.LEAVING and now < p.grace_until
        p.incarnation = hb.incarnation
        p.last_seq = hb.seq
        p.last_heard = now
        p.last_hb = hb
        p.reports = {r.node_id: r for r in hb.peers}
        self._leases_changed()
        p.owned = owned
        self._track_reported_owner(hb.node_id, hb.incarnation, owned)
        if restarted:
            self._events_put(PeerRestarted(hb.node_id, old_inc, hb.incarnation))
            if owned and not in_grace:
                # Resuming buckets without a grace we hold: it must release first.
                if p.state is not PeerState.LOST:
                    self._declare(p, now, hb.incarnation)
                else:
                    p.lost_incarnation = hb.incarnation
            elif not owned and p.lost_incarnation < old_inc:
                # Its kernel set was emptied at start: the old incarnation is over.
                p.lost_incarnation = old_inc
                self._lost_declared[hb.node_id] = now
                self._c["peers_lost"] += 1
                self._events_put(PeerLost(hb.node_id, old_inc, 0.0))
        if hb.grace_ms > 0:
            # now + remaining grace >= the sender's leave instant + grace: never shorter.
            p.grace_until = max(p.grace_until, now + hb.grace_ms / 1000.0)
            inp = PeerInput.HEARD_LEAVING
        elif not owned and (p.state is not PeerState.LOST
                            or hb.incarnation > p.lost_incarnation):
            # A declared incarnation is never readmitted: a lost node comes back as a new
            # incarnation owning nothing (rule 4), so a declaration stays true for good.
            inp = PeerInput.HEARD_RELEASED
        else:
            inp = PeerInput.HEARD
        before = p.state
        p.state = _PEER_TRANSITIONS[(p.state, inp)]
        self._leases_changed()
        if before is PeerState.UNKNOWN or (before is PeerState.LOST
                                            and p.state is PeerState.ALIVE):
            self._view_id += 1
            self._events_put(PeerJoined(hb.node_id, hb.incarnation))
        if inp is PeerInput.HEARD_LEAVING and before is not PeerState.LEAVING \
                and p.state is PeerState.LEAVING:
            self._events_put(PeerLeaving(hb.node_id, hb.incarnation, hb.grace_ms / 1000.0))
        better = self._map is None or (hb.map_epoch, -hb.map_proposer) > self._map.rank
        if better and hb.map_epoch > 0 and now - p.map_request_at >= self.timing.heartbeat:
            p.map_request_at = now
            self._c["map_requests_sent"] += 1
            self._queue(hb.node_id, MapRequest(self.node_id, hb.map_epoch, hb.map_proposer))

    def _track_reported_owner(self, node: int, inc: int, owned: frozenset[int]) -> None:
        """Last reported actual owner per bucket. A bucket an incarnation stops reporting is
        forgotten (handoff, release) unless some voter declared that incarnation lost: then
        it stays the dead incarnation's until a successor reports it."""
        key = (node, inc)
        before = self._reported.get(key, frozenset())
        if before == owned:
            return
        for b in owned - before:
            prev = self._reported_owner.get(b)
            if prev is not None and prev != key:
                self._reported[prev] = self._reported[prev] - {b}
                if not self._reported[prev]:
                    del self._reported[prev]
            self._reported_owner[b] = key
        keep = self._declarers(node, inc) > 0
        kept = set(owned)
        for b in before - owned:
            if keep:
                kept.add(b)
            elif self._reported_owner.get(b) == key:
                del self._reported_owner[b]
        if kept:
            self._reported[key] = frozenset(kept)
        else:
            self._reported.pop(key, None)

    def _on_map_offer(self, offer: MapOffer, now: float) -> None:
        m = offer.map
        if m.nbuckets != self.nbuckets:
            self._c["bitmap_errors"] += 1
            return
        if self._map is None or m.rank > self._map.rank:
            self._adopt(m, offer.node_id)

    def _adopt(self, m: TargetMap, source: int) -> None:
        if self._map is not None and m.digest == self._map.digest:
            self._map = m
            return
        self._map = m
        self._map_mine = m.buckets_of(self.node_id)
        self._map_nodes = frozenset(n for k in range(m.nbuckets) for n in m.chain(k))
        self._c["maps_adopted"] += 1
        self._send_now = True
        self._events_put(MapAdopted(m, source))

    # -------------------------------------------------------------- internals: decisions

    def _lease_from(self, v: int) -> float:
        p = self._peers[v]
        hb = p.last_hb
        if hb is None or p.state is PeerState.UNKNOWN:
            return -math.inf
        r = p.reports.get(self.node_id)
        if r is None or r.incarnation != self.incarnation or r.echo_seq < self._min_lease_seq:
            return -math.inf
        sent = self._sent.get(r.echo_seq)
        if sent is None:
            return -math.inf
        at, grace = sent
        return at + max(self._t_fence, grace)

    def _backed(self, now: float) -> bool:
        # a strict majority of the voters (us included) backs us beyond now; lease_expiry()
        # is the instant the need-th best peer lease runs out, so this is the same count
        return self.lease_expiry() > now

    def _live_voters(self, now: float) -> list[_Peer]:
        return [p for p in self._peers.values()
                if p.state in (PeerState.ALIVE, PeerState.LEAVING)
                and now - p.last_heard < self._t_dead]

    def _following(self, p: _Peer) -> bool:
        """Rule 3b, second half: a live voter's report declares ``p``'s incarnation lost."""
        for v in self._peers.values():
            if v is p or v.state not in (PeerState.ALIVE, PeerState.LEAVING) \
                    or v.node_id not in self._voters:
                continue
            r = v.reports.get(p.node_id)
            if r is not None and p.incarnation and r.lost_incarnation >= p.incarnation:
                return True
        return False

    def _silence_needed(self, p: _Peer) -> float:
        """Rule 3's silence threshold for ``p``: T_dead, or T_fence under rule 3b."""
        if p.node_id in self._vrrp_dead or (self.vrrp and self._following(p)):
            return self._t_fence
        return self._t_dead

    def _declare_at(self, p: _Peer) -> float:
        """Earliest instant rule 3 can hold for ``p`` as far as times go."""
        need = self._silence_needed(p)
        t = max(p.last_heard + need, p.grace_until)
        if p.last_heard == -math.inf:
            return math.inf  # never heard: nothing to declare
        for v in self._peers.values():
            if v is p or v.state not in (PeerState.ALIVE, PeerState.LEAVING):
                continue
            r = v.reports.get(p.node_id)
            if r is None or r.lost_incarnation >= p.incarnation:
                continue
            if r.incarnation > p.incarnation:
                return math.inf
            # v's report, extrapolated, reaches the threshold then (v drops out of the live
            # set at v.last_heard + dead at the latest, since age_ms >= 0).
            t = max(t, v.last_heard + need - r.age_ms / 1000.0)
        return t

    def _maybe_declare(self, now: float) -> None:
        if self._state is SelfState.FENCED:
            return
        live: list[_Peer] | None = None  # built only for a peer silent long enough here
        for p in self._peers.values():
            if p.state not in (PeerState.ALIVE, PeerState.LEAVING) or p.last_heard == -math.inf:
                continue
            need = self._silence_needed(p)
            if now - p.last_heard < need or now < p.grace_until:
                continue
            silent = True
            if live is None:
                live = self._live_voters(now)
            for v in live:
                if v is p:
                    continue
                r = v.reports.get(p.node_id)
                if r is None or r.lost_incarnation >= p.incarnation:
                    continue
                if r.incarnation > p.incarnation:
                    silent = False
                    break
                if r.age_ms / 1000.0 + (now - v.last_heard) < need:
                    silent = False
                    break
            if silent:
                if now - p.last_heard < self.timing.dead:
                    # only the lowered threshold of rule 3b declared it this early
                    self._c["peers_lost_by_vrrp" if p.node_id in self._vrrp_dead
                            else "peers_lost_following"] += 1
                self._declare(p, now, p.incarnation)

    def _declare(self, p: _Peer, now: float, incarnation: int) -> None:
        p.state = _PEER_TRANSITIONS[(p.state, PeerInput.DECLARED)]
        self._leases_changed()
        p.lost_incarnation = max(p.lost_incarnation, incarnation)
        self._lost_declared[p.node_id] = now
        self._view_id += 1
        self._c["peers_lost"] += 1
        self._send_now = True
        silent = now - p.last_heard
        self._events_put(PeerLost(p.node_id, incarnation, silent))

    def _update_self(self, now: float) -> None:
        backed = self._backed(now)
        self._set_self(SelfInput.BACKED if backed else SelfInput.UNBACKED, "no_majority")

    def _set_self(self, inp: SelfInput, reason: str) -> None:
        before = self._state
        self._state = _SELF_TRANSITIONS[(before, inp)]
        if before is SelfState.FORWARDING and self._state is SelfState.FENCED:
            self._fence_reason = reason
            self._c["fences"] += 1
            self._send_now = True
            self._events_put(FenceRequired(reason))
        elif before is SelfState.FENCED and self._state is SelfState.FORWARDING:
            self._fence_reason = ""
            self._send_now = True
            self._events_put(Unfenced(tuple(sorted(self._owned))))

    def _maybe_release(self) -> None:
        if self._state is not SelfState.FENCED and (self._owned or self._pending):
            return  # backed by a majority that did not declare us: nobody can have claimed
        for v, p in self._peers.items():
            r = p.reports.get(self.node_id)
            if r is not None and r.lost_incarnation >= self.incarnation:
                gone = tuple(sorted(self._owned | set(self._pending)))
                self._owned.clear()
                self._pending.clear()
                self._released = True
                # A release starts a new life: peers see a new incarnation owning nothing,
                # which voids the declared one at once (its buckets go to successors) and
                # readmits us as a rejoining member.
                fresh = self._new_incarnation(self.incarnation)
                if fresh <= self.incarnation:
                    raise MembershipError("new_incarnation must return a higher incarnation")
                self.incarnation = fresh
                self._leases_changed()
                self._c["releases"] += 1
                self._send_now = True
                self._events_put(OwnershipReleased(gone, v, fresh))
                return

    def _count_lost_reports(self) -> None:
        if self._state is SelfState.FORWARDING:
            for p in self._peers.values():
                r = p.reports.get(self.node_id)
                if r is not None and r.lost_incarnation >= self.incarnation:
                    self._c["lost_reports_ignored"] += 1

    def _declarers(self, node: int, incarnation: int) -> int:
        """Voters (us included) that will never back ``node``'s ``incarnation`` again: they
        declared it lost, or they have heard a later incarnation (heartbeats of an older one
        are dropped as stale, leases are per incarnation). The node itself counts once it
        runs a later incarnation (that daemon emptied or resumed ``@owned`` at start)."""
        n = 0
        voters = self.voters
        me = self._peers.get(node)
        if me is not None and (me.lost_incarnation >= incarnation
                               or me.incarnation > incarnation):
            n += 1 if self.node_id in voters else 0
            n += 1 if me.incarnation > incarnation and node in voters else 0
        for v, p in self._peers.items():
            if v == node or v not in voters:
                continue
            r = p.reports.get(node)
            if r is not None and (r.lost_incarnation >= incarnation
                                  or r.incarnation > incarnation):
                n += 1
        return n

    def _dead_nodes(self) -> dict[int, int]:
        """Nodes to take buckets from -> the highest incarnation a majority declared lost:
        the current incarnation if still lost (not readmitted), or an older incarnation that
        still has buckets reported against it."""
        need = _majority(len(self.voters))
        out: dict[int, int] = {}
        for n, p in self._peers.items():
            if (p.state is PeerState.LOST
                    and self._declarers(n, p.lost_incarnation) >= need):
                out[n] = p.lost_incarnation
        for (n, inc) in self._reported:
            if n != self.node_id and inc > out.get(n, 0) and self._declarers(n, inc) >= need:
                out[n] = inc
        return out

    def _maybe_takeover(self, now: float) -> None:
        if (self.role != "node" or self._state is SelfState.FENCED or not self.ready
                or self._map is None):
            return
        if now < self._pending_retry_at:
            return
        dead = self._dead_nodes()
        dead_ids = set(dead)
        need = _majority(len(self.voters))
        leaving_map = set()
        for n in self._map_nodes:
            inc = self._map.incarnation_of(n)
            if (inc and n != self.node_id and self._declarers(n, inc) >= need) or (
                    not inc and n in dead_ids):
                leaving_map.add(n)
        if leaving_map:
            self._adopt(self._map.without(leaving_map, proposer=self.node_id), self.node_id)
        m = self._map
        if m.incarnation_of(self.node_id) not in (0, self.incarnation):
            return  # the map's buckets for our id belong to an earlier incarnation
        mine = [k for k in self._map_mine if k not in self._owned and k not in self._pending]
        if not mine:
            return
        by_dead: dict[tuple[int, int], list[int]] = {}
        orphans: list[int] = []
        for k in mine:
            ro = self._reported_owner.get(k)
            if ro is None:
                orphans.append(k)
            elif ro[0] in dead and ro[1] <= dead[ro[0]]:
                by_dead.setdefault(ro, []).append(k)
        if orphans and self._all_agree_on_map(dead_ids):
            by_dead.setdefault((NO_OWNER, 0), []).extend(orphans)
        for (dn, di), ks in sorted(by_dead.items()):
            ks.sort()
            for k in ks:
                self._pending[k] = (dn, di)
            if dn != NO_OWNER:
                self._c["takeovers"] += 1
            p = self._peers.get(dn)
            rec = TakeoverRecord(
                dead_node=dn, dead_incarnation=di, buckets=tuple(ks),
                last_heard_at=(p.last_heard if p is not None and p.last_heard > -math.inf
                               else None),
                declared_at=self._lost_declared.get(dn, now), decided_at=now, claimed_at=None)
            self._open_records[dn] = rec
            self._records.append(rec)
            self._events_put(TakeoverDecided(dn, di, tuple(ks), m))

    def _all_agree_on_map(self, dead_ids: set[int]) -> bool:
        """May buckets nobody reports owning be claimed (bootstrap, rebuild)? Only under a map
        computed for our current incarnation (checked by the caller), and when every non-dead
        node reports that map and knows our current incarnation, not declared lost."""
        assert self._map is not None
        for n in self.nodes:
            if n == self.node_id or n in dead_ids:
                continue
            p = self._peers[n]
            hb = p.last_hb
            if hb is None or hb.map_digest != self._map.digest:
                return False
            r = p.reports.get(self.node_id)
            if (r is None or r.incarnation != self.incarnation
                    or r.lost_incarnation >= self.incarnation):
                return False
        return True

    def _close_record(self, rec: TakeoverRecord, bucket: int, now: float) -> None:
        if any(self._pending.get(b) == (rec.dead_node, rec.dead_incarnation)
               for b in rec.buckets if b != bucket):
            return
        done = TakeoverRecord(rec.dead_node, rec.dead_incarnation, rec.buckets,
                              rec.last_heard_at, rec.declared_at, rec.decided_at, now)
        for i, r in enumerate(self._records):
            if r is rec:
                self._records[i] = done
        del self._open_records[rec.dead_node]

    def _maybe_bootstrap(self, now: float) -> None:
        if (self.role != "node" or self._state is SelfState.FENCED
                or now - self._start < 2 * self.timing.dead):
            return
        if self._map is not None:
            self._maybe_rebuild()
            return
        if self._bootstrap_asked:
            return
        for n in self.nodes:
            if n == self.node_id:
                continue
            p = self._peers[n]
            if p.state is not PeerState.ALIVE or p.last_hb is None or p.last_hb.map_epoch:
                return
            if n < self.node_id:
                return
        self._bootstrap_asked = True
        members = tuple(sorted(
            [MemberInfo(self.node_id, self.weight, self.drained, self.ready)]
            + [MemberInfo(n, hb.weight, hb.drained, hb.ready)
               for n, p in self._peers.items() if n in self.nodes
               for hb in (p.last_hb,) if hb is not None], key=lambda m: m.node_id))
        self._events_put(MapBootstrapNeeded(members))

    def _maybe_shrink_voters(self) -> None:
        """Rule 8: a node that a majority of voters declared dead and that the agreed map no
        longer holds stops counting as a voter (one at a time, each step keeping old and new
        majorities intersecting); it counts again once an agreed map holds it again."""
        m = self._map
        if m is None or not m.incarnations:
            return
        members = {n for n, _ in m.incarnations}
        if self._removed & members:
            self._removed -= members
            self._voters = tuple(n for n in self._all_voters if n not in self._removed)
            self._leases_changed()
        while True:
            outside = [n for n in self.nodes if n not in members and n not in self._removed
                       and n != self.node_id]
            if not outside or len(self._voters) <= 2:
                return
            dead = self._dead_nodes()
            gone = [n for n in outside if n in dead]
            if not gone:
                return
            self._removed.add(gone[0])
            self._voters = tuple(n for n in self._all_voters if n not in self._removed)
            self._leases_changed()

    def _maybe_rebuild(self) -> None:
        """A map with buckets no live member may own (every node of a chain lost) needs a new
        one from the ready view: asked of the lowest-id ready node, once per map."""
        m = self._map
        assert m is not None
        if not self.ready or NO_OWNER not in m.owners or self._rebuild_asked == m.digest:
            return
        for p in self._peers.values():
            hb = p.last_hb
            if p.state is not PeerState.ALIVE or hb is None or hb.witness:
                continue
            if hb.map_digest != m.digest:
                return
            if hb.ready and p.node_id < self.node_id:
                return
        self._rebuild_asked = m.digest
        self._events_put(MapBootstrapNeeded(self.ready_view()))

    def _update(self, now: float) -> None:
        self._update_self(now)
        self._maybe_release()
        self._count_lost_reports()
        self._maybe_declare(now)
        self._maybe_takeover(now)
        self._maybe_shrink_voters()
        self._maybe_bootstrap(now)
        if self._send_now or now >= self._next_hb:
            self._send_heartbeat(now)
            # Our own heartbeat may have been the last thing missing (single voter).
            self._update_self(now)

    # -------------------------------------------------------------- internals: output

    def _grace_left(self, now: float) -> float:
        if self._leave_at is None:
            return 0.0
        return max(0.0, self._leave_at + self._leave_grace - now)

    def _owned_bitmap(self) -> bytes:
        key = frozenset(self._owned)
        if key != self._bitmap_cache[0]:
            self._bitmap_cache = (key, bitmap_from_buckets(key, self.nbuckets))
        return self._bitmap_cache[1]

    def _send_heartbeat(self, now: float) -> None:
        self._send_now = False
        self._seq += 1
        grace = self._grace_left(now)
        self._sent[self._seq] = (now, grace)
        if len(self._sent) > SENT_HISTORY:
            del self._sent[next(iter(self._sent))]  # seqs are inserted in increasing order
        self._leases_changed()
        reports = []
        for n, p in sorted(self._peers.items()):
            if p.state is PeerState.UNKNOWN:
                continue
            age = int(min(MAX_AGE_MS, max(0.0, (now - p.last_heard) * 1000)))
            echo = p.last_seq if p.state is not PeerState.LOST else 0
            reports.append(PeerReport(n, p.incarnation, age, echo, p.lost_incarnation))
        m = self._map
        hb = Heartbeat(
            node_id=self.node_id, incarnation=self.incarnation, seq=self._seq,
            view_id=self._view_id, map_epoch=m.epoch if m else 0,
            map_proposer=m.proposer if m else 0, map_digest=m.digest if m else b"",
            owned=self._owned_bitmap(), ready=self.ready,
            fenced=self._state is SelfState.FENCED, drained=self.drained,
            witness=self.role == "witness", weight=self.weight,
            grace_ms=int(grace * 1000), peers=tuple(reports))
        self._c["heartbeats_sent"] += 1
        self._queue(None, hb)
        t = self.timing
        self._next_hb = now + t.heartbeat * (1.0 - t.jitter * self._rng.random())

    def _queue(self, dest: int | None, msg: MembershipMessage) -> None:
        if len(self._outbox) >= OUTBOX_MAX:
            self._outbox.popleft()
            self._c["datagrams_dropped"] += 1
        self._outbox.append((dest, msg))

    def _events_put(self, ev: Event) -> None:
        if len(self._events) >= EVENT_QUEUE_MAX:
            self._events.popleft()
            self._c["events_dropped"] += 1
        self._events.append(ev)

    # -------------------------------------------------------------- observability

    def statistics(self) -> MembershipStatistics:
        now = self._last_call
        peers = tuple(
            PeerStatus(p.node_id, p.state.value, p.incarnation,
                       now - p.last_heard if p.last_heard > -math.inf else None,
                       p.lost_incarnation, len(p.owned),
                       bool(p.last_hb and p.last_hb.ready), bool(p.last_hb and p.last_hb.fenced))
            for p in sorted(self._peers.values(), key=lambda q: q.node_id))
        m = self._map
        return MembershipStatistics(
            node_id=self.node_id, incarnation=self.incarnation, fenced=self.fenced,
            fence_reason=self._fence_reason, released=self._released, ready=self.ready,
            backers=1 + sum(1 for v in self._peers if self._lease_from(v) > now),
            voters=len(self.voters), map_epoch=m.epoch if m else 0,
            map_proposer=m.proposer if m else 0, owned=len(self._owned),
            pending_claims=len(self._pending), peers=peers,
            takeover_records=tuple(self._records), vrrp_dead=tuple(sorted(self._vrrp_dead)),
            **self._c)
