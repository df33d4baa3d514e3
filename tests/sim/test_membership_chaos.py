"""Randomised failure schedules on the simulated farm: whatever happens (loss, one-way and
two-way link cuts, daemon kills with links up or down, loop stalls, crash restarts, loaded
nodes), no bucket is ever forwarded by two nodes at one instant; after everything heals and the
dead restart, every bucket has exactly one forwarder."""

from __future__ import annotations

import random

import pytest

from lbsync.membership import Timing
from tests.sim.test_membership_net import Farm

pytestmark = pytest.mark.sim


def _chaos(seed: int, nodes: list[int], profile: str, witness: int | None = None) -> Farm:
    rng = random.Random(seed)
    farm = Farm(nodes, timing=Timing.from_profile(profile), seed=seed, loss=0.05,
                witness=witness, buckets=48)
    farm.settle()
    voters = [*nodes, *([witness] if witness else [])]
    for _ in range(12):
        action = rng.choice(["cut", "oneway", "kill", "kill_up", "stall", "heal", "restart",
                             "load"])
        a, b = rng.sample(voters, 2)
        if action == "cut":
            farm.partition(a, b)
        elif action == "oneway":
            farm.blocked.add((a, b))
        elif action in ("kill", "kill_up") and farm.nodes[a].daemon_alive and a in nodes:
            farm.kill(a, links_down=action == "kill")
        elif action == "stall" and farm.nodes[a].daemon_alive:
            node = farm.nodes[a]
            node.daemon_alive = False
            node.timer_gen += 1
            farm.run_for(rng.uniform(0.05, 0.5))
            node.daemon_alive = True
            farm._interact(node, lambda node=node: node.core.handle_timer(farm.now))
        elif action == "heal":
            farm.heal()
        elif action == "restart" and not farm.nodes[a].daemon_alive and a in nodes:
            farm.start(a)
        elif action == "load":
            farm.nodes[a].load = rng.uniform(0, 0.03)
        farm.run_for(rng.uniform(0.05, 0.8))
    assert farm.violations == [], farm.violations[:5]
    # Heal everything, restart the dead: every bucket ends with exactly one forwarder.
    farm.heal()
    for n in nodes:
        farm.nodes[n].load = 0.0
        if not farm.nodes[n].daemon_alive:
            farm.start(n)
    farm.run_for(3.0)
    assert farm.violations == [], farm.violations[:5]
    assert set(farm.forwarding_owner()) == set(range(farm.buckets))
    return farm


@pytest.mark.parametrize("seed", range(16))
def test_no_double_forwarding_under_chaos_three_nodes(seed: int) -> None:
    _chaos(seed, [1, 2, 3], "default" if seed % 2 else "fast")


@pytest.mark.parametrize("seed", range(100, 108))
def test_no_double_forwarding_under_chaos_five_nodes(seed: int) -> None:
    _chaos(seed, [1, 2, 3, 4, 5], "default" if seed % 2 else "fast")


@pytest.mark.parametrize("seed", range(200, 206))
def test_no_double_forwarding_under_chaos_two_nodes_and_witness(seed: int) -> None:
    _chaos(seed, [1, 2], "default", witness=9)


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(1000, 1300))
def test_no_double_forwarding_under_chaos_soak(seed: int) -> None:
    """Many more schedules, 3 to 5 nodes and 2 + witness (run with -m soak)."""
    if seed % 4 == 3:
        _chaos(seed, [1, 2], "default", witness=9)
    else:
        _chaos(seed, [[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5]][seed % 4],
               "default" if seed % 2 else "fast")
