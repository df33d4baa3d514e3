"""Simulation tier: three (or more) nodes, each sending and receiving, on a seeded lossy,
duplicating, reordering, partitioning network with a virtual clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lbsync.replication.params import ProtocolParams
from lbsync.replication.sim import (
    ScenarioResult,
    Simulation,
    random_record,
    run_scenario,
    run_stream,
    schedule_traffic,
)
from lbsync.replication.wire import HEADER, TYPE_DATA

pytestmark = pytest.mark.sim

P = ProtocolParams(buckets=24)
LOSSES = [0.0, 0.05, 0.2, 0.4]


def _check(r: ScenarioResult, loss: float) -> int:
    """Converged; returns the repaired gaps (summed by callers: the loss was real)."""
    assert r.converged, f"seed {r.seed} loss {loss}: {r.divergence}"
    assert r.entries > 0
    if loss == 0:
        assert r.gaps == 0
    return min(r.gaps, r.retransmissions)


@pytest.mark.parametrize("loss", LOSSES)
def test_three_nodes_converge_after_heal_50_seeds(loss: float) -> None:
    repaired = 0
    for seed in range(50):
        r = run_scenario(seed=seed, params=P, loss=loss, duplicate=0.05, jitter=0.002,
                         ops=200, traffic=1.0)
        repaired += _check(r, loss)
        assert r.converge_time is not None and r.heal_time + r.converge_time <= r.deadline
    assert repaired > 0 or loss == 0


@pytest.mark.soak
@pytest.mark.parametrize("loss", LOSSES)
def test_three_nodes_converge_after_heal_1000_seeds(loss: float) -> None:
    repaired = 0
    for seed in range(1000):
        repaired += _check(run_scenario(seed=seed, params=P, loss=loss, duplicate=0.05,
                                        jitter=0.002, ops=200, traffic=1.0), loss)
    assert repaired > 0 or loss == 0


@pytest.mark.parametrize("loss", [0.05, 0.2])
def test_converges_while_loss_continues(loss: float) -> None:
    repaired = 0
    for seed in range(10):
        r = run_scenario(seed=seed, params=P, loss=loss, duplicate=0.05, jitter=0.002,
                         ops=200, traffic=1.0, heal=False)
        repaired += _check(r, loss)
    assert repaired > 0


def test_partition_then_heal() -> None:
    for seed in range(10):
        sim = Simulation(nodes=3, params=P, seed=seed, loss=0.05, jitter=0.002)
        for b in range(P.buckets):
            sim.claim(1 + b % 3, b, 1)
        rng = random.Random(seed)
        schedule_traffic(sim, rng=rng, duration=3.0, ops=300, keys_per_node=100)
        sim.at(0.5, lambda sim=sim: sim.partition([1], [2, 3]))
        sim.run_until(3.0)
        assert sim.divergence()  # node 1 was cut off: copies differ
        sim.heal()
        sim.run_until(3.0 + 2 * P.idle_max + P.resync_timeout)
        assert sim.converged(), sim.divergence()


def _last_data_seq(sim: Simulation, node: int) -> int:
    return sim.endpoints[node].sender.last_seq


def test_last_datagram_of_a_burst_lost_with_no_traffic_after() -> None:
    for seed in range(10):
        sim = Simulation(nodes=3, params=P, seed=seed)
        for b in range(P.buckets):
            sim.claim(1, b, 1)
        rng = random.Random(seed)
        for i in range(50):
            sim.update(1, i % P.buckets, b"k%d" % i, random_record(rng))
        sim.endpoints[1].flush(sim.now)
        last = _last_data_seq(sim, 1)

        def drop_last(src: int, dst: int, data: bytes, last: int = last,
                      sim: Simulation = sim) -> float | None:
            if data[3] == TYPE_DATA and HEADER.unpack_from(data)[7] == last and \
                    sim.books.retransmissions == 0:
                return None  # the original of the last datagram, to everyone
            return 0.0

        sim.filter = drop_last
        sim._poll(1)
        assert sim.books.missed  # the tail really was lost
        sim.run_until(2 * P.idle_max)
        assert sim.converged(), sim.divergence()
        assert sim.books.retransmissions >= 1


def test_sender_restart_resyncs_peers() -> None:
    for seed in range(10):
        sim = Simulation(nodes=3, params=P, seed=seed, loss=0.1, jitter=0.002)
        for b in range(P.buckets):
            sim.claim(1 + b % 3, b, 1)
        rng = random.Random(seed)
        schedule_traffic(sim, rng=rng, duration=2.0, ops=300, keys_per_node=100)
        sim.run_until(1.0)
        # While node 1's daemon is down some of its flows end; its kernel no longer has them.
        ep1 = sim.endpoints[1]
        owned = sorted(ep1.sender.owned)
        removed = 0
        for b in owned[:3]:
            flows, _ = ep1.store.snapshot(b)
            for key in list(flows)[:2]:
                ep1.store.delete(0, b, 1, key)
                removed += 1
        sim.restart(1)
        assert sim.incarnations[1] == 2
        sim.run_until(2.0)
        sim.heal()
        sim.run_until(2.0 + 2 * P.idle_max + P.resync_timeout)
        assert sim.converged(), sim.divergence()
        assert sim.events_seen["SenderRestarted"] >= 2
        assert removed == 0 or sim.events_seen["BucketResynced"] > 0


def test_handover_while_old_owners_delayed_retransmissions_arrive() -> None:
    for seed in range(10):
        sim = Simulation(nodes=3, params=P, seed=seed, loss=0.2, jitter=0.001)
        for b in range(P.buckets):
            sim.claim(1, b, 1)
        rng = random.Random(seed)
        keys = [b"k%d" % i for i in range(60)]
        for k in keys:
            sim.update(1, 0, k, random_record(rng))
        # Node 1's datagrams to node 3 are now very late (retransmissions included).
        sim.filter = lambda src, dst, data: 0.4 if (src, dst) == (1, 3) else 0.0
        sim.run_until(0.1)
        for k in keys[:30]:  # more changes by the old owner, still in flight to node 3
            sim.update(1, 0, k, random_record(rng))
        sim.run_until(0.15)
        # Handover: node 2 (which has node 1's state) becomes the owner with epoch 2.
        sim.claim(2, 0, 2)
        for k in keys:
            sim.update(2, 0, k, b"new owner " + k)
        sim.run_until(1.0)  # old owner's late datagrams reach node 3 after the new owner's
        sim.filter = None
        sim.heal()
        sim.run_until(1.0 + 2 * P.idle_max + P.resync_timeout)
        assert sim.converged(), sim.divergence()
        flows, _ = sim.endpoints[3].store.snapshot(0)
        assert all(flows[k] == b"new owner " + k for k in keys)
        assert sim.endpoints[3].statistics().receiver.records_stale > 0


# -- repair efficiency ----------------------------------------------------------------------


def test_repair_overhead_at_20_percent_three_nodes() -> None:
    """(retransmitted + NACK datagrams) / datagrams missed by >= 1 receiver <= 1.5, summed
    over seeds, three nodes each streaming ~6.7k records/s."""
    retx = nacks = gaps = 0
    for seed in range(8):
        r = run_scenario(seed=seed, params=P, loss=0.2, ops=2000, traffic=0.3)
        assert r.converged
        retx, nacks, gaps = retx + r.retransmissions, nacks + r.nack_datagrams, gaps + r.gaps
    assert gaps > 500
    assert (retx + nacks) / gaps <= 1.5, (retx, nacks, gaps)


@pytest.mark.parametrize("mode", ["multicast", "unicast"])
@pytest.mark.parametrize("receivers", [2, 4, 8, 16])
def test_nack_datagrams_per_gap_at_5_percent(receivers: int, mode: str) -> None:
    """Suppression (no NACK storm): per datagram missed by at least one receiver, the NACK
    datagrams that named it over all repair rounds: mean <= 1.5, maximum <= 3 (issue 5's
    bound holds at every loss level, not only at 20 %)."""
    r = run_stream(seed=receivers, params=P, receivers=receivers, loss=0.05,
                   mode=mode, records=4000)  # type: ignore[arg-type]
    assert r.converged and r.gaps > 20
    assert r.nack_fallbacks == 0
    assert r.nack_mean <= 1.5 and r.nack_max <= 3, (r.nack_mean, r.nack_p99, r.nack_max)


def _repair_figures(receivers: int, mode: str, seeds: range) -> None:
    """Issue 5's repair figures at 20 % independent loss (NACKs, repairs and heartbeats lost
    too), one owner streaming 20k records/s to ``receivers`` peers while the loss goes on,
    every node sending the farm's heartbeat (40 ms), summed over ``seeds``: repair overhead
    (repair datagrams + NACK datagrams) / datagrams missed by at least one receiver <= 1.5;
    NACK datagrams naming a missed datagram, all rounds, all receivers: mean <= 1.5 and max
    <= 3. Later rounds ride on the heartbeats (RepairState, not NACK datagrams: no NACK
    datagram is a fallback one), and their bytes are reported."""
    gaps = repairs = nacks = carriers = piggyback = 0
    hist: Counter[int] = Counter()
    for seed in seeds:
        r = run_stream(seed=1000 * seed + receivers, params=P, receivers=receivers,
                       loss=0.2, mode=mode, records=4000)  # type: ignore[arg-type]
        assert r.converged, (seed, r.divergence)
        assert r.nack_fallbacks == 0
        gaps, repairs, nacks = gaps + r.gaps, repairs + r.retransmissions, \
            nacks + r.nack_datagrams
        carriers, piggyback = carriers + r.carriers, piggyback + r.piggyback_bytes
        hist.update(dict(r.nack_histogram))
    assert gaps > 100 * len(seeds) and hist.total() == gaps
    assert (repairs + nacks) / gaps <= 1.5, (repairs, nacks, gaps)
    counts = sorted(hist.elements())
    assert sum(counts) / gaps <= 1.5, hist
    assert counts[-1] <= 3, hist  # issue 5's bound
    # the design's: only the block's designated receivers NACK it, from a stream's start on
    assert counts[-1] <= P.nack_designated, hist
    assert carriers > 0 and piggyback / gaps < 8, (carriers, piggyback, gaps)


@pytest.mark.parametrize("mode", ["multicast", "unicast"])
@pytest.mark.parametrize("receivers", [2, 4, 8, 16])
def test_repair_at_20_percent_loss(receivers: int, mode: str) -> None:
    _repair_figures(receivers, mode, range(4))


@pytest.mark.soak
@pytest.mark.parametrize("mode", ["multicast", "unicast"])
@pytest.mark.parametrize("receivers", [2, 4, 8, 16])
def test_repair_at_20_percent_loss_many_seeds(receivers: int, mode: str) -> None:
    _repair_figures(receivers, mode, range(4, 54))
