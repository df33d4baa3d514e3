"""keepalived's verdict in the membership core (rule 3b) on the simulated farm: with heartbeats
too slow to detect a death in time, a verdict makes the farm declare and claim at ~T_fence
instead of T_dead; a verdict alone removes nobody; a claim still needs a majority. Every test
also asserts that no bucket was ever forwarded by two nodes at one instant."""

from __future__ import annotations

import random

import pytest

from lbsync.membership import (
    FenceRequired,
    Membership,
    MembershipError,
    PeerLost,
    TakeoverDecided,
    Timing,
)
from tests.sim.test_membership_net import Farm, SimNode

pytestmark = pytest.mark.sim

SLOW = Timing(heartbeat=0.4, miss_count=6)   # T_dead 2.4 s, T_fence 1.6 s
VRRP_DETECT = 0.25                           # keepalived at advert_int 0.1 (docs/keepalived.md)


class VrrpFarm(Farm):
    """The simulated farm with ``vrrp`` set on the nodes in ``following`` (default: all)."""

    def __init__(self, *args: object, following: tuple[int, ...] | None = None,
                 **kw: object) -> None:
        self.following = following
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def start(self, n: int, **kw: object) -> SimNode:
        node = super().start(n, **kw)  # type: ignore[arg-type]
        node.core.vrrp = self.following is None or n in self.following
        return node

    def verdict(self, at: int, peer: int, dead: bool = True) -> None:
        node = self.nodes[at]
        self._interact(node, lambda: node.core.vrrp_verdict(peer, dead, self.now))


def farm(seed: int = 1, following: tuple[int, ...] | None = None) -> VrrpFarm:
    f = VrrpFarm([1, 2, 3], timing=SLOW, seed=seed, following=following)
    f.settle(8.0)
    f.run_for(1.0)
    assert f.violations == []
    return f


def lost_at(f: Farm, node: int, peer: int) -> float | None:
    for t, e in f.events(node, PeerLost):
        assert isinstance(e, PeerLost)
        if e.node_id == peer:
            return t
    return None


def claims(f: Farm, node: int, dead: int) -> list[tuple[float, TakeoverDecided]]:
    return [(t, e) for t, e in f.events(node, TakeoverDecided)
            if isinstance(e, TakeoverDecided) and e.dead_node == dead]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_verdict_declares_and_claims_at_t_fence_not_t_dead(seed: int) -> None:
    f = farm(seed)
    dead_buckets = f.nodes[2].kernel_owned
    t0 = f.now
    f.kill(2, links_down=True)
    # node 2's first live successor (3) takes over lbsync-2 after the master-down interval
    f.run_for(VRRP_DETECT)
    f.verdict(3, 2)
    f.run_for(3.0)
    owners = f.forwarding_owner()
    assert len(owners) == f.buckets and 2 not in owners.values()
    t3, t1 = lost_at(f, 3, 2), lost_at(f, 1, 2)
    assert t3 is not None and t1 is not None
    # declared on T_fence of silence (the last heartbeat came at most T_hb before the kill)
    assert t3 - t0 < SLOW.dead - SLOW.heartbeat / 2
    assert t1 - t0 < SLOW.dead - SLOW.heartbeat / 2
    last_claim = max(t for n in (1, 3) for t, _ in claims(f, n, 2))
    assert last_claim - t0 < SLOW.dead
    assert {b for n in (1, 3) for _, e in claims(f, n, 2) for b in e.buckets} == dead_buckets
    s3, s1 = f.nodes[3].core.statistics(), f.nodes[1].core.statistics()
    assert s3.vrrp_verdicts == 1 and s3.peers_lost_by_vrrp == 1 and s3.vrrp_dead == (2,)
    assert s1.vrrp_verdicts == 0 and s1.peers_lost_following == 1
    for n in (1, 3):
        assert f.events(n, FenceRequired) == []
    assert f.violations == []


@pytest.mark.parametrize("seed", [1, 2])
def test_without_a_verdict_the_slow_profile_waits_for_t_dead(seed: int) -> None:
    f = farm(seed)
    t0 = f.now
    f.kill(2, links_down=True)
    f.run_for(4.0)
    for n in (1, 3):
        t = lost_at(f, n, 2)
        assert t is not None and t - t0 >= SLOW.dead - SLOW.heartbeat
        st = f.nodes[n].core.statistics()
        assert st.peers_lost_by_vrrp == 0 and st.peers_lost_following == 0
    assert f.violations == []


def test_a_verdict_alone_with_heartbeats_arriving_removes_nobody() -> None:
    """keepalived killed on node 2, or its management link cut: node 3 becomes MASTER of
    lbsync-2, but node 2 heartbeats on: nothing moves."""
    f = farm(5)
    before = f.forwarding_owner()
    f.verdict(3, 2)
    f.run_for(10.0)
    assert f.forwarding_owner() == before
    for n in (1, 2, 3):
        assert f.events(n, PeerLost) == []
        assert f.events(n, FenceRequired) == []
    assert f.nodes[3].core.statistics().vrrp_dead == (2,)
    assert f.violations == []


def test_a_verdict_while_another_voter_still_hears_the_peer_removes_nobody() -> None:
    """Node 3 hears neither node 2's adverts nor its heartbeats (both links to it cut), node 1
    still hears node 2: node 1's reports keep node 3 from declaring, nothing moves."""
    f = farm(6)
    before = f.forwarding_owner()
    f.partition(2, 3)
    f.verdict(3, 2)
    f.run_for(8.0)
    assert f.forwarding_owner() == before
    for n in (1, 2, 3):
        assert f.events(n, PeerLost) == []
    assert f.violations == []


def test_the_claim_still_needs_a_majority_of_declarations() -> None:
    """Node 1 does not follow declarations at T_fence (vrrp off): node 3 declares node 2 at
    T_fence on its verdict, but nobody claims before node 1 declares too, at T_dead."""
    f = farm(7, following=(3,))
    t0 = f.now
    f.kill(2, links_down=True)
    f.run_for(VRRP_DETECT)
    f.verdict(3, 2)
    f.run_for(4.0)
    t3, t1 = lost_at(f, 3, 2), lost_at(f, 1, 2)
    assert t3 is not None and t3 - t0 < SLOW.dead - SLOW.heartbeat / 2
    assert t1 is not None and t1 - t0 >= SLOW.dead - SLOW.heartbeat
    first_claim = min(t for n in (1, 3) for t, _ in claims(f, n, 2))
    assert first_claim >= t1
    assert 2 not in f.forwarding_owner().values()
    assert f.violations == []


def test_a_withdrawn_verdict_restores_t_dead() -> None:
    f = farm(8)
    f.verdict(3, 2)
    f.run_for(1.0)
    f.verdict(3, 2, dead=False)
    st = f.nodes[3].core.statistics()
    assert st.vrrp_dead == () and st.vrrp_verdicts_withdrawn == 1
    t0 = f.now
    f.kill(2, links_down=True)
    f.run_for(4.0)
    t3 = lost_at(f, 3, 2)
    assert t3 is not None and t3 - t0 >= SLOW.dead - SLOW.heartbeat
    assert f.violations == []


def test_isolated_node_with_keepalived_dead_fences_before_a_verdict_backed_claim() -> None:
    """Node 2 alive but cut off on the replication link, its keepalived dead: the others
    declare it at T_fence on the verdict; node 2's lease has run out by then (kernel fence),
    so no bucket is ever forwarded twice."""
    f = farm(9)
    f.partition(2, 1)
    f.partition(2, 3)
    f.run_for(VRRP_DETECT)
    f.verdict(3, 2)
    f.run_for(6.0)
    assert 2 not in f.forwarding_owner().values()
    assert len(f.forwarding_owner()) == f.buckets
    assert f.nodes[3].core.statistics().peers_lost_by_vrrp == 1
    assert f.violations == []


def test_verdict_api_rejects_self_and_strangers_and_is_idempotent() -> None:
    c = Membership(node_id=1, nodes=(1, 2, 3), buckets=8, timing=SLOW, rng=random.Random(1),
                   now=0.0, incarnation=1, vrrp=True)
    with pytest.raises(MembershipError):
        c.vrrp_verdict(1, True, 0.0)
    with pytest.raises(MembershipError):
        c.vrrp_verdict(9, True, 0.0)
    c.vrrp_verdict(2, True, 0.1)
    c.vrrp_verdict(2, True, 0.2)
    c.vrrp_verdict(3, False, 0.3)
    st = c.statistics()
    assert st.vrrp_verdicts == 1 and st.vrrp_verdicts_withdrawn == 0 and c.vrrp_dead == {2}


def _chaos(seed: int, nodes: list[int]) -> VrrpFarm:
    """The chaos schedule of test_membership_chaos plus keepalived verdicts, true or false
    (a node's keepalived may call a live peer dead, and withdraw it), with vrrp on."""
    rng = random.Random(seed)
    f = VrrpFarm(nodes, timing=Timing.from_profile("default" if seed % 2 else "fast"),
                 seed=seed, loss=0.05, buckets=48)
    f.settle()
    for _ in range(16):
        action = rng.choice(["cut", "oneway", "kill", "kill_up", "heal", "restart", "load",
                             "verdict", "verdict", "withdraw"])
        a, b = rng.sample(nodes, 2)
        alive = f.nodes[a].daemon_alive
        if action == "cut":
            f.partition(a, b)
        elif action == "oneway":
            f.blocked.add((a, b))
        elif action in ("kill", "kill_up") and alive:
            f.kill(a, links_down=action == "kill")
        elif action == "heal":
            f.heal()
        elif action == "restart" and not alive:
            f.start(a)
        elif action == "load":
            f.nodes[a].load = rng.uniform(0, 0.03)
        elif action in ("verdict", "withdraw") and alive:
            f.verdict(a, b, dead=action == "verdict")
        f.run_for(rng.uniform(0.05, 0.8))
    assert f.violations == [], f.violations[:5]
    f.heal()
    for n in nodes:
        f.nodes[n].load = 0.0
        if not f.nodes[n].daemon_alive:
            f.start(n)
    for n in nodes:
        for peer in f.nodes[n].core.vrrp_dead:
            f.verdict(n, peer, dead=False)
    f.run_for(3.0)
    assert f.violations == [], f.violations[:5]
    assert set(f.forwarding_owner()) == set(range(f.buckets))
    return f


@pytest.mark.parametrize("seed", range(12))
def test_no_double_forwarding_under_chaos_with_true_and_false_verdicts(seed: int) -> None:
    _chaos(seed, [1, 2, 3] if seed % 3 else [1, 2, 3, 4, 5])


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(2000, 2200))
def test_no_double_forwarding_under_chaos_with_verdicts_soak(seed: int) -> None:
    _chaos(seed, [[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5]][seed % 3])
