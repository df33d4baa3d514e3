"""Failure scenarios on the simulated farm: detection bounds, takeover, fencing, partitions,
loaded nodes, planned stops. Every test also asserts the farm never had a bucket forwarded by
two nodes at one instant (``Farm.violations``)."""

from __future__ import annotations

import pytest

from lbsync.membership import (
    FenceRequired,
    OwnershipReleased,
    PeerJoined,
    PeerLost,
    PeerRestarted,
    TakeoverDecided,
    Timing,
    Unfenced,
)
from tests.sim.test_membership_net import Farm

pytestmark = pytest.mark.sim

PROFILES = {"default": 0.3, "fast": 0.15}


def _bootstrapped(nodes: list[int], profile: str = "default", **kw: object) -> Farm:
    farm = Farm(nodes, timing=Timing.from_profile(profile), **kw)  # type: ignore[arg-type]
    farm.settle()
    farm.run_for(0.5)
    assert farm.violations == []
    return farm


def _takeovers(farm: Farm, node: int) -> list[TakeoverDecided]:
    """Takeovers from a dead node (dead_node 0 are the bootstrap claims)."""
    return [e for _, e in farm.events(node, TakeoverDecided)
            if isinstance(e, TakeoverDecided) and e.dead_node != 0]


def _claimed_at(farm: Farm, node: int, bucket: int) -> float:
    for t, e in farm.events(node, TakeoverDecided):
        assert isinstance(e, TakeoverDecided)
        if bucket in e.buckets and e.dead_node != 0:
            return t + farm.safety_pass
    raise AssertionError(f"node {node} never decided bucket {bucket}")


@pytest.mark.parametrize("profile", ["default", "fast"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_node_detected_and_claimed_within_the_profile_bound(profile: str,
                                                                   seed: int) -> None:
    farm = _bootstrapped([1, 2, 3], profile, seed=seed)
    dead_buckets = sorted(farm.nodes[2].kernel_owned)
    assert dead_buckets
    t0 = farm.now
    farm.kill(2, links_down=True)
    farm.run_for(1.0)
    owners = farm.forwarding_owner()
    assert len(owners) == farm.buckets and 2 not in owners.values()
    # Each dead bucket went to the first survivor of its chain in the map.
    m = farm.nodes[1].core.map
    assert m is not None and m.epoch == 2
    for k in dead_buckets:
        assert owners[k] == m.owner(k) and m.owner(k) in (1, 3)
    last_claim = max(_claimed_at(farm, owners[k], k) for k in dead_buckets)
    assert last_claim - t0 <= PROFILES[profile]
    for n in (1, 3):
        (t, lost), = farm.events(n, PeerLost)
        assert isinstance(lost, PeerLost) and lost.node_id == 2
        assert t - t0 >= farm.timing.dead - farm.timing.heartbeat  # no early verdict
        assert farm.events(n, FenceRequired) == []
    assert farm.violations == []


def test_daemon_killed_with_links_up_fences_in_the_kernel_before_peers_claim() -> None:
    farm = _bootstrapped([1, 2, 3], seed=7)
    victim = farm.nodes[2]
    buckets = victim.kernel_owned
    expiry = victim.kernel_expiry
    t0 = farm.now
    farm.kill(2, links_down=False)
    # Its kernel keeps forwarding until the lease it last wrote, then stops by itself.
    assert expiry - t0 <= farm.timing.fence
    farm.run_until(expiry - 0.001)
    assert victim.forwards(farm.now) == buckets
    farm.run_for(1.0)
    assert victim.forwards(farm.now) == frozenset()
    first_claim = min(_claimed_at(farm, n, k) for n in (1, 3) for k in buckets
                      if farm.forwarding_owner()[k] == n)
    assert first_claim > expiry
    assert set(farm.forwarding_owner()) == set(range(farm.buckets))
    assert farm.violations == []


def test_replication_link_cut_between_two_nodes_that_both_hear_a_third() -> None:
    farm = _bootstrapped([1, 2, 3], seed=3)
    before = farm.forwarding_owner()
    farm.partition(1, 2)
    farm.run_for(3.0)
    # Documented behaviour: C (3) still hears both and reports it, so neither A nor B may
    # declare the other lost: nothing moves, each keeps forwarding its own buckets.
    assert farm.forwarding_owner() == before
    for n in (1, 2, 3):
        assert farm.events(n, PeerLost) == []
        assert farm.events(n, FenceRequired) == []
    farm.heal()
    farm.run_for(1.0)
    assert farm.forwarding_owner() == before
    assert farm.violations == []


def test_isolated_node_fences_and_releases_and_the_majority_takes_over() -> None:
    farm = _bootstrapped([1, 2, 3], seed=4)
    mine = farm.nodes[3].kernel_owned
    t0 = farm.now
    farm.partition(3, 1)
    farm.partition(3, 2)
    farm.run_for(1.0)
    (t_fence, fence), = farm.events(3, FenceRequired)
    assert isinstance(fence, FenceRequired) and fence.reason == "no_majority"
    assert t_fence - t0 <= farm.timing.fence + 0.01
    owners = farm.forwarding_owner()
    assert set(owners) == set(range(farm.buckets)) and 3 not in owners.values()
    claims = [_claimed_at(farm, owners[k], k) for k in mine]
    assert min(claims) > t_fence
    # Healing: 3 learns it was declared lost, releases, and is readmitted owning nothing.
    farm.heal()
    farm.run_for(1.0)
    assert [e.buckets for _, e in farm.events(3, OwnershipReleased)] == [tuple(sorted(mine))]
    assert farm.nodes[3].core.owned == frozenset()
    assert any(isinstance(e, PeerJoined) and e.node_id == 3 for _, e in farm.nodes[1].events)
    assert farm.forwarding_owner() == owners
    assert farm.violations == []


@pytest.mark.parametrize(("profile", "load"), [("default", 0.05), ("fast", 0.025)])
def test_loaded_nodes_raise_no_false_alarm(profile: str, load: float) -> None:
    farm = _bootstrapped([1, 2, 3], profile, seed=11, loss=0.02)
    for node in farm.nodes.values():
        node.load = load  # every timer and delivery delayed by up to `load`
    farm.run_for(10.0)
    for n in (1, 2, 3):
        assert farm.events(n, PeerLost) == []
        assert [e for e in farm.nodes[n].events if isinstance(e[1], FenceRequired)] == []
    assert len(farm.forwarding_owner()) == farm.buckets
    assert farm.violations == []


@pytest.mark.parametrize(("profile", "load"), [("default", 0.05), ("fast", 0.025)])
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_loaded_nodes_keep_their_kernel_elements_alive_with_the_daemons_rewrite_rule(
        profile: str, load: float, seed: int) -> None:
    """The daemon rewrites the @owned timeouts only once the lease has moved Timing.rewrite
    past them: at the loads membership tolerates, a backed node's elements never expire
    (with T_hb as the threshold they did, a few times in 10 s; with T_fence / 4, often)."""
    timing = Timing.from_profile(profile)
    farm = _bootstrapped([1, 2, 3], profile, seed=seed, loss=0.02, rewrite=timing.rewrite)
    farm.gaps.clear()
    for node in farm.nodes.values():
        node.load = load
    farm.run_for(10.0)
    assert farm.gaps == []
    assert farm.violations == []


def test_planned_restart_within_grace_moves_nothing() -> None:
    farm = _bootstrapped([1, 2, 3], seed=5)
    before = farm.forwarding_owner()
    node = farm.nodes[2]
    cap = farm.nodes[2].core.leave(grace=2.0, now=farm.now)
    farm._interact(node, lambda: None)
    farm.run_for(0.1)
    # The lease now reaches the grace (peers echoed it): the kernel keeps forwarding.
    assert node.kernel_expiry > farm.now + 1.5 and node.kernel_expiry <= cap
    owned = node.core.owned
    farm.kill(2, links_down=False)
    farm.run_for(1.5)  # the restart takes 1.5 s, far beyond T_dead
    for n in (1, 3):
        assert farm.events(n, PeerLost) == []
        assert _takeovers(farm, n) == []
    assert farm.forwarding_owner() == before
    new = farm.start(2, resume=owned)
    farm.run_for(1.0)
    assert farm.forwarding_owner() == before
    assert new.core.owned == owned and not new.core.fenced
    for n in (1, 3):
        assert [(e.node_id, e.new_incarnation) for _, e in farm.events(n, PeerRestarted)
                ] == [(2, 2)]  # type: ignore[attr-defined]
        assert farm.events(n, PeerLost) == []
    assert farm.violations == []


def test_planned_stop_that_never_comes_back_is_taken_over_after_the_grace() -> None:
    farm = _bootstrapped([1, 2, 3], seed=6)
    node = farm.nodes[2]
    node.core.leave(grace=1.0, now=farm.now)
    farm._interact(node, lambda: None)
    farm.run_for(0.1)
    t_stop = farm.now
    farm.kill(2, links_down=False)
    farm.run_for(0.8)
    assert _takeovers(farm, 1) == []
    farm.run_for(1.0)
    owners = farm.forwarding_owner()
    assert set(owners) == set(range(farm.buckets)) and 2 not in owners.values()
    (t_lost, _), = farm.events(1, PeerLost)
    assert t_lost >= t_stop + 0.9
    assert farm.violations == []


def test_crash_restart_empty_voids_the_old_incarnation_at_once() -> None:
    farm = _bootstrapped([1, 2, 3], seed=8)
    old = farm.nodes[2].kernel_owned
    farm.kill(2, links_down=False)
    farm.run_for(0.05)
    t_start = farm.now
    farm.start(2, ready=False)  # the new daemon emptied @owned before its first heartbeat
    farm.run_for(0.5)
    owners = farm.forwarding_owner()
    assert set(owners) == set(range(farm.buckets)) and 2 not in owners.values()
    first = min(_claimed_at(farm, owners[k], k) for k in old)
    assert first - t_start < farm.timing.dead  # no need to wait for T_dead
    assert farm.violations == []


def test_two_node_farm_with_witness_survives_a_node_death() -> None:
    farm = _bootstrapped([1, 2], seed=9, witness=9)
    t0 = farm.now
    farm.kill(2)
    farm.run_for(1.0)
    owners = farm.forwarding_owner()
    assert owners == dict.fromkeys(range(farm.buckets), 1)
    assert max(_claimed_at(farm, 1, k) for k in range(1, farm.buckets, 2)) - t0 <= 0.3
    assert farm.violations == []


def test_two_node_farm_with_witness_link_cut_one_side_keeps_everything() -> None:
    farm = _bootstrapped([1, 2], seed=10, witness=9)
    farm.partition(1, 2)
    farm.run_for(2.0)
    # Both hear the witness; the witness hears both and says so: nobody declares, nothing
    # moves (the same rule as A|B with C).
    assert farm.events(1, PeerLost) == [] and farm.events(2, PeerLost) == []
    farm.heal()
    farm.partition(2, 9)
    farm.partition(2, 1)  # node 2 isolated from everyone
    farm.run_for(2.0)
    assert farm.forwarding_owner() == dict.fromkeys(range(farm.buckets), 1)
    assert farm.violations == []


def test_two_node_farm_without_witness_never_takes_over() -> None:
    farm = _bootstrapped([1, 2], seed=12)
    farm.kill(2)
    farm.run_for(2.0)
    # No majority (1 of 2): node 1 fences itself instead of claiming.
    assert _takeovers(farm, 1) == []
    assert [e.reason for _, e in farm.events(1, FenceRequired)] == ["no_majority"]
    assert farm.forwarding_owner() == {}
    assert farm.violations == []


def test_five_nodes_lose_two_one_after_the_other() -> None:
    farm = _bootstrapped([1, 2, 3, 4, 5], seed=13, buckets=64, loss=0.05)
    farm.kill(2)
    farm.run_for(1.0)
    farm.kill(4)
    farm.run_for(1.0)
    owners = farm.forwarding_owner()
    assert set(owners) == set(range(64))
    assert set(owners.values()) == {1, 3, 5}
    assert farm.violations == []


def test_unfenced_after_a_short_stall_keeps_its_buckets() -> None:
    farm = _bootstrapped([1, 2, 3], seed=14)
    node = farm.nodes[1]
    owned = node.core.owned
    # The daemon's loop hangs for 150 ms (< T_dead): no timer fires meanwhile.
    node.timer_gen += 1
    hang_end = farm.now + 0.15
    node.daemon_alive = False
    farm.run_until(hang_end)
    node.daemon_alive = True
    farm._interact(node, lambda: node.core.handle_timer(farm.now))
    farm.run_for(0.5)
    reasons = [e.reason for _, e in farm.events(1, FenceRequired)]
    assert reasons == ["stall"]
    assert isinstance(node.events[-1][1], Unfenced) or node.core.owned == owned
    assert node.forwards(farm.now) == owned
    assert farm.events(2, PeerLost) == [] and farm.events(3, PeerLost) == []
    assert farm.violations == []


def test_the_load_test_can_fail_a_loop_slower_than_the_lease_is_fenced() -> None:
    """Control for test_loaded_nodes_raise_no_false_alarm: the same farm with one node whose
    every timer and delivery lags up to 250 ms does fence it (and peers notice)."""
    farm = _bootstrapped([1, 2, 3], "default", seed=11)
    farm.nodes[2].load = 0.25
    farm.run_for(5.0)
    assert farm.events(2, FenceRequired)
    assert farm.violations == []


def test_four_nodes_lose_two_one_after_the_other_and_keep_a_majority() -> None:
    """After the first death the agreed map drops the dead node and so does the voter set
    (4 -> 3), so the second death leaves 2 of 3 voters: the farm goes on (issue 7)."""
    farm = _bootstrapped([1, 2, 3, 4], seed=15, buckets=48)
    farm.kill(2)
    farm.run_for(1.0)
    assert farm.nodes[1].core.voters == (1, 3, 4)
    farm.kill(4)
    farm.run_for(1.0)
    owners = farm.forwarding_owner()
    assert set(owners) == set(range(48)) and set(owners.values()) == {1, 3}
    for n in (1, 3):
        assert farm.nodes[n].core.voters == (1, 3)
        assert not farm.nodes[n].core.fenced
    # Both at once would not do: 2 of 4 is no majority, the survivors fence.
    farm2 = _bootstrapped([1, 2, 3, 4], seed=16, buckets=48)
    farm2.kill(2)
    farm2.kill(4)
    farm2.run_for(1.0)
    assert farm2.forwarding_owner() == {}
    assert farm.violations == [] and farm2.violations == []
