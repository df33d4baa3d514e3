"""A farm of N membership cores on a fake lossy network with a virtual clock (the sim harness).

Each node is a real :class:`Membership` core plus a model of its daemon and kernel:

- the *daemon* drains events: ``FenceRequired`` empties the kernel's ``@owned``, ``Unfenced``
  restores it, ``OwnershipReleased`` removes buckets, ``TakeoverDecided`` runs a safety pass of
  ``safety_pass`` seconds and then claims (adds to ``@owned``, calls ``claim_done``);
- the *kernel* forwards the buckets in ``@owned`` until the elements' timeout, which the daemon
  sets to ``lease_expiry()`` after every interaction: a daemon killed with its links up keeps
  forwarding until then, exactly like nft set elements with timeouts.

``Farm.check()`` runs after every simulated step and records any bucket forwarded by two nodes
at one instant (the "never two owners" invariant). Messages go through ``to_wire`` -> msgpack ->
``decode`` like the real daemon's.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import pytest

from lbsync.membership import (
    Event,
    FenceRequired,
    MapBootstrapNeeded,
    Membership,
    MembershipMessage,
    OwnershipReleased,
    PeerLost,
    TakeoverDecided,
    TargetMap,
    Timing,
    Unfenced,
    decode,
)


def round_robin_map(nodes: list[int], buckets: int, *, epoch: int = 1, proposer: int = 0
                    ) -> TargetMap:
    """A stand-in for hashing.assign: bucket k to nodes[k % n], chain = the others rotated."""
    n = len(nodes)
    owners = [nodes[k % n] for k in range(buckets)]
    chains = [[nodes[(k + j) % n] for j in range(1, n)] for k in range(buckets)]
    return TargetMap.build(epoch=epoch, proposer=proposer or min(nodes), owners=owners,
                           successors=chains)


@dataclass
class SimNode:
    node_id: int
    core: Membership
    daemon_alive: bool = True
    links_up: bool = True
    kernel_owned: frozenset[int] = frozenset()
    kernel_expiry: float = math.inf
    load: float = 0.0
    """Extra processing delay, uniform in [0, load], for every timer and delivery."""
    timer_gen: int = 0
    events: list[tuple[float, Event]] = field(default_factory=list)
    written: float = -math.inf
    """The lease last written as the elements' timeout (``Farm(rewrite=...)``)."""
    written_owned: frozenset[int] = frozenset()

    def forwards(self, now: float) -> frozenset[int]:
        if not self.links_up or now >= self.kernel_expiry:
            return frozenset()
        return self.kernel_owned


class Farm:
    def __init__(self, node_ids: list[int], *, timing: Timing, buckets: int = 32, seed: int = 1,
                 witness: int | None = None, loss: float = 0.0, delay: float = 0.0005,
                 delay_jitter: float = 0.001, safety_pass: float = 0.002,
                 bootstrap: bool = True, rewrite: float | None = None) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.timing = timing
        self.buckets = buckets
        self.node_ids = list(node_ids)
        self.witness = witness
        self.loss = loss
        self.delay = delay
        self.delay_jitter = delay_jitter
        self.safety_pass = safety_pass
        self.bootstrap = bootstrap
        # None: the kernel timeout follows the lease after every interaction; else the
        # daemon's rule: rewritten when the owned set changed or the lease advanced past it
        # by more than ``rewrite`` seconds (lbsync.node.Node._sync_kernel_owned)
        self.rewrite = rewrite
        self.gaps: list[tuple[float, int]] = []
        """(time, node): a backed node owning buckets whose kernel elements had expired."""
        self.blocked: set[tuple[int, int]] = set()
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.counter = itertools.count()
        self.nodes: dict[int, SimNode] = {}
        self.violations: list[tuple[float, int, tuple[int, ...]]] = []
        self.incarnations: dict[int, int] = {}
        for n in node_ids:
            self.start(n)
        if witness is not None:
            self.start(witness, role="witness")

    # ---------------------------------------------------------------- node lifecycle

    def start(self, n: int, *, role: str = "node", resume: frozenset[int] = frozenset(),
              ready: bool = True) -> SimNode:
        # Like the daemon's start-time-based incarnation: above any earlier one, including
        # the +1 a core takes when it releases.
        prev = self.nodes[n].core.incarnation if n in self.nodes else 0
        inc = max(self.incarnations.get(n, 0), prev) + 1
        self.incarnations[n] = inc
        core = Membership(
            node_id=n, nodes=self.node_ids, buckets=self.buckets, timing=self.timing,
            rng=random.Random(self.rng.getrandbits(32)), now=self.now, incarnation=inc,
            witness=self.witness, role="witness" if role == "witness" else "node",
            resume_owned=resume, ready=ready and role == "node")
        old = self.nodes.get(n)
        node = SimNode(n, core)
        if old is not None and resume:
            node.kernel_owned, node.kernel_expiry = old.kernel_owned, old.kernel_expiry
            node.load = old.load
        self.nodes[n] = node
        self._interact(node, lambda: None)
        return node

    def kill(self, n: int, *, links_down: bool = True) -> None:
        """SIGKILL the daemon; with ``links_down`` the node also stops forwarding at once."""
        node = self.nodes[n]
        node.daemon_alive = False
        node.timer_gen += 1
        if links_down:
            node.links_up = False

    def partition(self, a: int, b: int) -> None:
        self.blocked |= {(a, b), (b, a)}

    def heal(self) -> None:
        self.blocked.clear()

    # ---------------------------------------------------------------- daemon model

    def _interact(self, node: SimNode, action: Callable[[], None]) -> None:
        if not node.daemon_alive:
            return
        action()
        core = node.core
        while (ev := core.next_event()) is not None:
            node.events.append((self.now, ev))
            self._on_event(node, ev)
        for dest, msg in core.datagrams_to_send():
            self._transmit(node.node_id, dest, msg)
        # The daemon refreshes the @owned element timeouts to the lease after each interaction.
        lease = core.lease_expiry()
        # lease_expiry() is cached between changes of its inputs: never stale
        assert lease == core._lease_expiry_uncached(), "stale lease cache"
        if (self.rewrite is None or node.kernel_owned != node.written_owned
                or lease - node.written > self.rewrite):
            node.kernel_expiry = node.written = lease
            node.written_owned = node.kernel_owned
        node.timer_gen += 1
        gen = node.timer_gen
        at = max(core.get_timer(), self.now)
        at += self.rng.uniform(0, node.load) if node.load else 0.0
        self.at(at, lambda: self._fire_timer(node, gen))
        self.check()

    def _fire_timer(self, node: SimNode, gen: int) -> None:
        if gen != node.timer_gen or not node.daemon_alive:
            return
        self._interact(node, lambda: node.core.handle_timer(self.now))

    def _on_event(self, node: SimNode, ev: Event) -> None:
        core = node.core
        if isinstance(ev, FenceRequired):
            node.kernel_owned = frozenset()
        elif isinstance(ev, Unfenced):
            node.kernel_owned = frozenset(ev.owned)
        elif isinstance(ev, OwnershipReleased):
            node.kernel_owned = node.kernel_owned - set(ev.buckets)
        elif isinstance(ev, TakeoverDecided):
            buckets = ev.buckets

            def claim() -> None:
                if core.fenced:
                    core.claim_failed(buckets, self.now)
                    return
                node.kernel_owned = node.kernel_owned | set(buckets)
                accepted = core.claim_done(buckets, self.now)
                node.kernel_owned = node.kernel_owned - (set(buckets) - accepted)

            self.at(self.now + self.safety_pass, lambda: self._interact(node, claim))
        elif isinstance(ev, MapBootstrapNeeded) and self.bootstrap:
            members = [mi.node_id for mi in ev.members if mi.ready]
            epoch = core.map.epoch + 1 if core.map is not None else 1
            m = round_robin_map(members, self.buckets, epoch=epoch, proposer=node.node_id)
            self.at(self.now, lambda: self._interact(node, lambda: core.propose_map(m, self.now)))

    # ---------------------------------------------------------------- network

    def _transmit(self, src: int, dest: int | None, msg: MembershipMessage) -> None:
        wire = msgpack.packb(msg.to_wire(), use_bin_type=True)
        dests = [dest] if dest is not None else [n for n in self.nodes if n != src]
        for d in dests:
            if (src, d) in self.blocked or not self.nodes[src].links_up:
                continue
            if self.loss and self.rng.random() < self.loss:
                continue
            at = self.now + self.delay + self.rng.uniform(0, self.delay_jitter)
            self.at(at, lambda d=d: self._deliver(d, wire))

    def _deliver(self, d: int, wire: bytes) -> None:
        node = self.nodes[d]
        if not node.links_up or not node.daemon_alive:
            return
        msg = decode(msgpack.unpackb(wire, raw=False))

        def handle() -> None:
            self._interact(node, lambda: node.core.receive(msg, self.now))

        if node.load:
            self.at(self.now + self.rng.uniform(0, node.load), handle)
        else:
            handle()

    # ---------------------------------------------------------------- clock

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (t, next(self.counter), fn))

    def run_until(self, t_end: float) -> None:
        while self.queue and self.queue[0][0] <= t_end:
            t, _, fn = heapq.heappop(self.queue)
            self.now = max(self.now, t)
            fn()
            self.check()
        self.now = t_end
        self.check()

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    # ---------------------------------------------------------------- invariants & queries

    def check(self) -> None:
        for node in self.nodes.values():
            core = node.core
            if (node.daemon_alive and node.kernel_owned and not core.fenced
                    and self.now < core.lease_expiry() and self.now >= node.kernel_expiry):
                self.gaps.append((self.now, node.node_id))
        seen: dict[int, int] = {}
        union: frozenset[int] = frozenset()
        for node in self.nodes.values():
            fw = node.forwards(self.now)
            both = union & fw
            for b in both:
                self.violations.append((self.now, b, (seen.get(b, 0), node.node_id)))
            if both or len(self.nodes) <= 8:
                seen.update(dict.fromkeys(fw, node.node_id))
            union = union | fw

    def forwarding_owner(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for node in self.nodes.values():
            for b in node.forwards(self.now):
                out[b] = node.node_id
        return out

    def events(self, n: int, kind: type) -> list[tuple[float, Event]]:
        return [(t, e) for t, e in self.nodes[n].events if isinstance(e, kind)]

    def settle(self, t: float = 1.0) -> None:
        """Run until every bucket is forwarded by someone (bootstrap), at most ``t`` s."""
        end = self.now + t
        while self.now < end:
            self.run_for(0.01)
            if len(self.forwarding_owner()) == self.buckets:
                return
        raise AssertionError(f"farm did not settle: {self.forwarding_owner()}")


@pytest.mark.sim
def test_harness_bootstraps_a_farm_and_every_bucket_has_one_forwarder() -> None:
    farm = Farm([1, 2, 3], timing=Timing.from_profile("default"))
    farm.settle()
    owners = farm.forwarding_owner()
    assert owners == {k: [1, 2, 3][k % 3] for k in range(32)}
    farm.run_for(2.0)
    assert farm.violations == []
    for n in (1, 2, 3):
        assert farm.events(n, PeerLost) == []
        assert farm.events(n, FenceRequired) == []
