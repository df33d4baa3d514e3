"""The membership core's rules, one by one, with hand-made heartbeats and a manual clock."""

from __future__ import annotations

import ast
import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lbsync.membership import (
    Event,
    FenceRequired,
    Heartbeat,
    MapAdopted,
    MapOffer,
    MapRequest,
    Membership,
    MembershipError,
    OwnershipReleased,
    PeerJoined,
    PeerLeaving,
    PeerLost,
    PeerReport,
    PeerRestarted,
    TakeoverDecided,
    TargetMap,
    Timing,
    Unfenced,
    bitmap_from_buckets,
)

FORBIDDEN = {"asyncio", "socket", "time", "pyroute2", "selectors", "threading", "os"}
T = Timing.from_profile("default")
B = 6
# bucket k -> node k % 3 + 1; chains rotate.
MAP = TargetMap.build(epoch=1, proposer=1, owners=[1, 2, 3, 1, 2, 3],
                      successors=[[2, 3], [3, 1], [1, 2], [2, 3], [3, 1], [1, 2]],
                      incarnations=[(1, 1), (2, 1), (3, 1)])


def core(node: int = 1, *, nodes: tuple[int, ...] = (1, 2, 3), witness: int | None = None,
         now: float = 0.0, ready: bool = True) -> Membership:
    c = Membership(node_id=node, nodes=nodes, buckets=B, timing=T, rng=random.Random(1),
                   now=now, incarnation=1, witness=witness, ready=ready)
    assert c.get_timer() == now  # the first heartbeat is due at once
    c.handle_timer(now)
    return c


def hb(node: int, seq: int, *, inc: int = 1, owned: tuple[int, ...] = (),
       peers: tuple[PeerReport, ...] = (), m: TargetMap | None = MAP, grace_ms: int = 0,
       fenced: bool = False, witness: bool = False) -> Heartbeat:
    return Heartbeat(
        node_id=node, incarnation=inc, seq=seq, view_id=0, map_epoch=m.epoch if m else 0,
        map_proposer=m.proposer if m else 0, map_digest=m.digest if m else b"",
        owned=bitmap_from_buckets(owned, B), ready=True, fenced=fenced, drained=False,
        witness=witness, weight=1, grace_ms=grace_ms, peers=peers)


def echo(c: Membership, *, age_ms: int = 5, lost: int = 0, seq: int | None = None
         ) -> PeerReport:
    """A peer's report about core ``c``: heard its latest heartbeat ``age_ms`` ago (a peer
    that declared it lost vouches for nothing: echo 0)."""
    if seq is None:
        seq = 0 if lost else c._seq
    return PeerReport(c.node_id, c.incarnation, age_ms, seq, lost)


def drain(c: Membership) -> list[Event]:
    out = []
    while (e := c.next_event()) is not None:
        out.append(e)
    return out


def sent(c: Membership) -> list[tuple[int | None, object]]:
    return list(c.datagrams_to_send())


class Peers:
    """Scripted peers: each step they send a heartbeat echoing the core's latest one."""

    def __init__(self, c: Membership) -> None:
        self.c = c
        self.seq: dict[int, int] = {}
        self.now = c._last_call

    def beat(self, node: int, *, owned: tuple[int, ...] = (), m: TargetMap | None = MAP,
             about: tuple[PeerReport, ...] = (), grace_ms: int = 0, lost_me: int = 0) -> None:
        self.seq[node] = self.seq.get(node, 1) + 1
        self.c.receive(hb(node, self.seq[node], owned=owned, m=m, grace_ms=grace_ms,
                          peers=(echo(self.c, lost=lost_me), *about)), self.now)

    def step(self, dt: float = 0.02) -> None:
        """Advance the clock by ``dt``, firing the core's timers on the way."""
        end = self.now + dt
        while self.c.get_timer() <= end:
            self.now = max(self.now, self.c.get_timer())
            self.c.handle_timer(self.now)
        self.now = end
        self.c.handle_timer(end)


def forwarding_node(*, now: float = 0.0) -> Membership:
    """Node 1 of 3, holding MAP and owning buckets 0 and 3, backed by 2 and 3."""
    c = core(now=now)
    c.propose_map(MAP, now)
    c._owned = {0, 3}
    for n in (2, 3):
        c.receive(hb(n, 1, owned=(n - 1, n + 2), peers=(echo(c),)), now)
    assert not c.fenced
    drain(c)
    sent(c)
    return c


# ---------------------------------------------------------------- construction


def test_constructor_refuses_bad_ids() -> None:
    with pytest.raises(MembershipError):
        core(node=4)
    with pytest.raises(MembershipError):
        core(witness=2)
    with pytest.raises(MembershipError):
        Membership(node_id=9, nodes=(1, 2), buckets=B, timing=T, rng=random.Random(),
                   now=0, incarnation=0, witness=9, role="witness")
    w = Membership(node_id=9, nodes=(1, 2), buckets=B, timing=T, rng=random.Random(),
                   now=0, incarnation=1, witness=9, role="witness")
    assert w.voters == (1, 2, 9)
    with pytest.raises(MembershipError, match="witness"):
        w.set_local(0.0, ready=True)


# ---------------------------------------------------------------- heartbeats


def test_heartbeat_interval_is_jittered_below_t_hb_and_carries_the_state() -> None:
    c = core()
    first = sent(c)
    assert [d for d, _ in first] == [None]
    times = []
    now = 0.0
    for _ in range(50):
        now = c.get_timer()
        c.handle_timer(now)
        times.append(now)
        msgs = sent(c)
        assert len(msgs) == 1
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(T.heartbeat * (1 - T.jitter) - 1e-9 <= g <= T.heartbeat + 1e-9 for g in gaps)
    assert len({round(g, 6) for g in gaps}) > 10  # jittered, not periodic
    c.receive(hb(2, 1), now)
    assert [type(x) for _, x in sent(c)] == [MapRequest]  # no heartbeat out of turn
    # 2 was heard: its report travels in our heartbeat with an age, never a clock.
    later = c.get_timer()
    c.handle_timer(later)
    (_, msg), = [x for x in sent(c) if isinstance(x[1], Heartbeat)]
    assert isinstance(msg, Heartbeat) and msg.node_id == 1 and msg.ready
    (r,) = msg.peers
    assert (r.node_id, r.incarnation, r.echo_seq, r.lost_incarnation) == (2, 1, 1, 0)
    assert r.age_ms == int((later - now) * 1000) and 36 <= r.age_ms <= 40


def test_strangers_and_stale_heartbeats_are_counted_and_ignored() -> None:
    c = core()
    c.receive(hb(7, 1), 0.0)
    c.receive(hb(2, 5), 0.0)
    c.receive(hb(2, 4), 0.001)
    c.receive(hb(2, 6, witness=True), 0.002)
    s = c.statistics()
    assert s.messages_from_strangers == 2 and s.heartbeats_stale == 1
    assert s.heartbeats_received == 1
    assert [type(e) for e in drain(c)] == [PeerJoined]


# ---------------------------------------------------------------- leases and fencing


def test_a_lone_node_never_forwards() -> None:
    c = core()
    for _ in range(30):
        c.handle_timer(c.get_timer())
    assert c.fenced and c.lease_expiry() == float("-inf")
    assert c.forwarding(1.0) == frozenset()


def test_lease_comes_from_the_echoed_send_time_and_fencing_follows_it() -> None:
    c = core()
    c._owned = {0, 3}
    (_, first), = sent(c)
    assert isinstance(first, Heartbeat) and first.seq == 1
    # Peer 2 echoes seq 1 (sent at 0.0), but its report only arrives 50 ms later.
    c.receive(hb(2, 1, peers=(echo(c, seq=1),)), 0.05)
    assert not c.fenced
    assert [type(e) for e in drain(c)] == [PeerJoined, Unfenced]
    assert c.lease_expiry() == pytest.approx(0.0 + T.fence)  # not 0.05 + T_fence
    assert c.forwarding(0.1) == {0, 3}
    # No more echoes: the timer lands on the lease expiry and fences.
    while not c.fenced:
        c.handle_timer(c.get_timer())
    assert c._last_call == pytest.approx(T.fence)
    assert drain(c) == [FenceRequired("no_majority")]
    assert c.forwarding(T.fence) == frozenset()


def test_stall_fences_until_heartbeats_sent_after_it_are_echoed() -> None:
    c = forwarding_node()
    c.handle_timer(T.stall + 0.01)  # woken far too late
    assert drain(c) == [FenceRequired("stall")]
    assert c.statistics().stalls == 1
    (_, mine), = [x for x in sent(c) if isinstance(x[1], Heartbeat)]
    assert isinstance(mine, Heartbeat)
    # An echo of a pre-stall heartbeat does not unfence...
    c.receive(hb(2, 2, owned=(1, 4), peers=(echo(c, seq=1),)), T.stall + 0.011)
    assert c.fenced
    # ...echoes of the post-stall one do.
    c.receive(hb(3, 2, owned=(2, 5), peers=(echo(c, seq=mine.seq),)), T.stall + 0.012)
    assert not c.fenced and drain(c) == [Unfenced((0, 3))]


def test_majority_counts_the_witness_as_a_voter() -> None:
    c = core(nodes=(1, 2), witness=9)
    assert c.voters == (1, 2, 9)
    c.receive(hb(9, 1, witness=True, m=None, peers=(echo(c),)), 0.001)
    assert not c.fenced  # itself + the witness: 2 of 3


# ---------------------------------------------------------------- declaring peers lost


def _three_alive(now: float = 0.0) -> Membership:
    c = forwarding_node(now=now)
    return c


def test_peer_is_not_declared_while_a_live_member_still_hears_it() -> None:
    c = _three_alive()
    # 2 falls silent for us; 3 keeps reporting that it hears 2 (the A|B-with-C case).
    now = 0.0
    seq = 2
    while now < 1.0:
        now += 0.03
        c.receive(hb(3, seq, owned=(2, 5), peers=(echo(c), PeerReport(2, 1, 10, seq, 0))),
                  now)
        seq += 1
        c.handle_timer(now)
    evs = drain(c)
    assert not any(isinstance(e, (PeerLost, TakeoverDecided)) for e in evs)
    assert c.statistics().peers[0].state == "alive"


def test_peer_declared_at_t_dead_when_every_live_member_agrees() -> None:
    c = _three_alive()
    now = 0.0
    seq = 2
    lost_at = None
    while now < 0.6 and lost_at is None:
        now += 0.02
        # 3 reports its own silence from 2 growing with time.
        c.receive(hb(3, seq, owned=(2, 5), peers=(echo(c),
                                                  PeerReport(2, 1, int(now * 1000), 1, 0))),
                  now)
        seq += 1
        for e in drain(c):
            if isinstance(e, PeerLost):
                lost_at = now
                assert e.node_id == 2 and e.incarnation == 1
    assert lost_at is not None and T.dead <= lost_at <= T.dead + 0.021
    # The declaration is sticky: 2's next heartbeat gets no echo from us.
    c.receive(hb(2, 9, owned=(1, 4), peers=(echo(c),)), lost_at + 0.001)
    (_, mine), = [x for x in sent(c) if isinstance(x[1], Heartbeat)][-1:]
    assert isinstance(mine, Heartbeat)
    r2 = next(r for r in mine.peers if r.node_id == 2)
    assert (r2.echo_seq, r2.lost_incarnation) == (0, 1)
    # Owning nothing in the declared incarnation is not enough: only a new incarnation
    # (what a release or a restart gives) is readmitted.
    c.receive(hb(2, 10, peers=(echo(c),)), lost_at + 0.002)
    assert not any(isinstance(e, PeerJoined) for e in drain(c))
    c.receive(hb(2, 1, inc=2, peers=(echo(c),)), lost_at + 0.003)
    assert PeerJoined(2, 2) in drain(c)


def test_only_a_backed_node_declares() -> None:
    c = core()
    c.receive(hb(2, 1), 0.0)  # heard, but it does not echo us: we are not backed
    for t in (0.1, 0.3, 0.5, 1.0):
        c.handle_timer(t)
    assert not any(isinstance(e, PeerLost) for e in drain(c))


# ---------------------------------------------------------------- claims


CHAIN_MAP = TargetMap.build(epoch=1, proposer=1, owners=[1, 2, 3, 1, 2, 3],
                            successors=[[2, 3], [1, 3], [1, 2], [2, 3], [3, 1], [1, 2]],
                            incarnations=[(1, 1), (2, 1), (3, 1)])


def _node_losing_2(*, declare_3_after: float) -> tuple[Membership, Peers, list[Event]]:
    """Node 1 under CHAIN_MAP; 2 dies at 0; 3 declares 2 lost from ``declare_3_after``."""
    c = core()
    c.propose_map(CHAIN_MAP, 0.0)
    c._owned = {0, 3}
    p = Peers(c)
    p.beat(2, owned=(1, 4), m=CHAIN_MAP)
    events: list[Event] = []
    while p.now < 1.0:
        lost = 1 if p.now >= declare_3_after else 0
        p.beat(3, owned=(2, 5), m=c.map,
               about=(PeerReport(2, 1, int(p.now * 1000), 2, lost),))
        p.step()
        events += drain(c)
    return c, p, events


def test_claim_waits_for_a_strict_majority_of_declarers() -> None:
    c, _p, evs = _node_losing_2(declare_3_after=0.5)
    (lost,) = [e for e in evs if isinstance(e, PeerLost)]
    (t,) = [e for e in evs if isinstance(e, TakeoverDecided)]
    i_lost, i_take = evs.index(lost), evs.index(t)
    assert i_take > i_lost
    rec = next(r for r in c.statistics().takeover_records if r.dead_node == 2)
    assert T.dead <= rec.declared_at <= T.dead + 0.03  # our own verdict at T_dead
    assert 0.5 <= rec.decided_at <= 0.53  # the claim waited for 3's: 2 of 3 voters


def test_takeover_gives_each_dead_bucket_to_its_first_live_successor() -> None:
    c, p, evs = _node_losing_2(declare_3_after=0.0)
    (t,) = [e for e in evs if isinstance(e, TakeoverDecided)]
    # 2 owned buckets 1 (chain 2, 1, 3) and 4 (chain 2, 3, 1): 1 is ours, 4 is 3's.
    assert (t.dead_node, t.dead_incarnation, t.buckets) == (2, 1, (1,))
    assert t.new_map.epoch == 2 and list(t.new_map.owners) == [1, 1, 3, 1, 3, 3]
    assert any(isinstance(e, MapAdopted) and e.map == t.new_map for e in evs)
    rec = next(r for r in c.statistics().takeover_records if r.dead_node == 2)
    assert T.dead <= rec.decided_at <= T.dead + 0.03
    assert rec.claimed_at is None
    assert c.claim_done((1,), p.now) == {1}
    assert c.owned == {0, 1, 3}
    rec = next(r for r in c.statistics().takeover_records if r.dead_node == 2)
    assert rec.claimed_at == p.now


def test_claim_done_after_fencing_is_refused() -> None:
    c, p, evs = _node_losing_2(declare_3_after=0.0)
    assert any(isinstance(e, TakeoverDecided) for e in evs)
    while not c.fenced:  # nobody echoes us any more
        p.step()
    assert c.claim_done((1,), p.now) == frozenset()
    assert c.statistics().claims_refused == 1 and 1 not in c.owned


def test_two_node_farm_without_witness_has_no_majority() -> None:
    c = core(nodes=(1, 2))
    c.receive(hb(2, 1, m=None, peers=(echo(c),)), 0.0)
    assert not c.fenced  # 2 of 2
    p = Peers(c)
    while p.now < 0.5:
        p.step()
    assert c.fenced  # 1 of 2 is no majority: fence, never claim
    assert drain(c)[-1] == FenceRequired("no_majority")


# ---------------------------------------------------------------- release


def test_fenced_node_declared_lost_releases_and_starts_a_new_incarnation() -> None:
    c = forwarding_node()
    p = Peers(c)
    while not c.fenced:
        p.step()
    assert drain(c) == [FenceRequired("no_majority")]
    p.beat(2, owned=(1, 4), lost_me=1)
    assert drain(c) == [OwnershipReleased((0, 3), 2, 2)]
    assert c.owned == frozenset() and c.incarnation == 2
    (_, mine), = [x for x in sent(c) if isinstance(x[1], Heartbeat)][-1:]
    assert isinstance(mine, Heartbeat) and mine.incarnation == 2 and mine.owned == bytes(1)


def test_unfenced_node_ignores_a_lost_report() -> None:
    c = forwarding_node()
    c.receive(hb(2, 2, owned=(1, 4), peers=(echo(c, lost=1),)), 0.01)
    assert not c.fenced and c.owned == {0, 3}
    assert c.statistics().lost_reports_ignored == 1


# ---------------------------------------------------------------- restarts and leaving


def test_restart_owning_nothing_voids_the_old_incarnation_at_once() -> None:
    c = forwarding_node()
    c.receive(hb(2, 1, inc=2, peers=(echo(c),)), 0.01)
    evs = drain(c)
    assert PeerRestarted(2, 1, 2) in evs and PeerLost(2, 1, 0.0) in evs
    assert c.statistics().peers[0].state == "alive"


def test_restart_resuming_buckets_without_grace_must_release_first() -> None:
    c = forwarding_node()
    c.receive(hb(2, 1, inc=2, owned=(1, 4), peers=(echo(c),)), 0.01)
    evs = drain(c)
    assert PeerRestarted(2, 1, 2) in evs and any(isinstance(e, PeerLost) for e in evs)
    assert c.statistics().peers[0].state == "lost"


def test_leave_grace_holds_off_the_verdict() -> None:
    c = forwarding_node()
    p = Peers(c)
    p.beat(2, owned=(1, 4), grace_ms=1000)
    assert drain(c) == [PeerLeaving(2, 1, 1.0)]
    lost_at = None
    while lost_at is None and p.now < 2.0:
        p.beat(3, owned=(2, 5), about=(PeerReport(2, 1, int(p.now * 1000), 2, 0),))
        p.step()
        if any(isinstance(e, PeerLost) for e in drain(c)):
            lost_at = p.now
    assert lost_at is not None and 1.0 <= lost_at <= 1.03


def test_own_leave_extends_the_lease_only_as_far_as_peers_echoed_it() -> None:
    d = forwarding_node()
    cap = d.leave(2.0, 0.0)
    (_, mine), = [x for x in sent(d) if isinstance(x[1], Heartbeat)][-1:]
    assert isinstance(mine, Heartbeat) and mine.grace_ms == 2000
    assert d.lease_expiry() == pytest.approx(T.fence)
    d.receive(hb(2, 2, owned=(1, 4), peers=(echo(d, seq=mine.seq),)), 0.001)
    assert d.lease_expiry() == pytest.approx(2.0)  # 2 of 3 voters hold the grace: majority
    assert cap == 2.0


# ---------------------------------------------------------------- maps


def test_better_map_is_requested_adopted_and_worse_ignored() -> None:
    c = core()
    m2 = MAP.without({3}, proposer=2)
    c.receive(hb(2, 1, m=m2), 0.0)
    reqs = [(d, x) for d, x in sent(c) if isinstance(x, MapRequest)]
    assert reqs == [(2, MapRequest(1, 2, 2))]
    c.receive(MapOffer(2, m2), 0.001)
    assert drain(c)[-1] == MapAdopted(m2, 2)
    c.receive(MapOffer(3, MAP), 0.002)
    assert c.map == m2
    tie = TargetMap(epoch=2, proposer=1, owners=m2.owners, successors=m2.successors,
                    incarnations=m2.incarnations)
    c.receive(MapOffer(3, tie), 0.003)
    assert c.map is not None and c.map.proposer == 1  # same epoch: lowest proposer
    assert not any(isinstance(e, MapAdopted) for e in drain(c))  # same content
    c.receive(MapRequest(3, 2, 1), 0.004)
    assert [x for d, x in sent(c) if d == 3] == [MapOffer(1, tie)]


def test_joining_node_decides_nothing_before_it_has_a_map() -> None:
    c = core()
    for n in (2, 3):
        c.receive(hb(n, 1, owned=(n - 1,), peers=(echo(c),)), 0.0)
    c.receive(hb(3, 2, owned=(2,), peers=(echo(c), PeerReport(2, 1, 400, 1, 1))), 0.4)
    assert not any(isinstance(e, TakeoverDecided) for e in drain(c))


def test_propose_map_outranks_and_records_incarnations() -> None:
    c = core()
    c.receive(hb(2, 1, m=None), 0.0)
    bare = TargetMap.build(epoch=1, proposer=1, owners=[1, 2, 3] * 2,
                           successors=[[2], [3], [1]] * 2)
    c.propose_map(bare, 0.0)
    assert c.map is not None and c.map.incarnations == ((1, 1), (2, 1))
    c.propose_map(bare, 0.0)  # computed from no previous map (epoch 1): renumbered
    assert c.map.epoch == 2 and c.map.proposer == 1
    with pytest.raises(MembershipError):
        c.propose_map(TargetMap.build(epoch=9, proposer=1, owners=[1], successors=[[]]), 0.0)


def test_statistics_is_a_frozen_snapshot() -> None:
    c = forwarding_node()
    s = c.statistics()
    with pytest.raises(AttributeError):
        s.fences = 3  # type: ignore[misc]
    assert (s.voters, s.backers, s.owned, s.map_epoch) == (3, 3, 2, 1)


def test_core_imports_no_io() -> None:
    """No clock, socket, loop or netlink in the core (``time`` is loaded by the interpreter
    itself, so the module sources are checked, and the loaded modules for the rest)."""
    import lbsync.membership as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, (path.name, name)
    code = ("import sys; import lbsync.membership; "
            "print(sorted({'asyncio', 'socket', 'pyroute2', 'selectors'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_claim_done_for_an_undecided_bucket_is_refused() -> None:
    """Claims follow decisions (and the daemon's safety pass), never the other way round."""
    c = forwarding_node()
    assert c.claim_done((1, 2), 0.001) == frozenset()
    assert c.owned == {0, 3} and c.statistics().claims_refused == 2


def test_release_takes_its_new_incarnation_from_the_daemon() -> None:
    c = Membership(node_id=1, nodes=(1, 2, 3), buckets=B, timing=T, rng=random.Random(1),
                   now=0.0, incarnation=5, ready=True, new_incarnation=lambda cur: cur + 100)
    c.handle_timer(0.0)
    c._owned = {0}
    p = Peers(c)
    p.beat(2, owned=(1, 4), lost_me=5)
    assert drain(c)[-1] == OwnershipReleased((0,), 2, 105)
    assert c.incarnation == 105


def test_a_node_that_is_not_ready_decides_no_takeover_until_it_is() -> None:
    """Readiness gate (issue 8): not ready, it owns nothing and inherits nothing; its heartbeat
    says so, and ``ready_view`` (what the target map is computed from) leaves it out."""
    c = core(ready=False)
    c.propose_map(CHAIN_MAP, 0.0)
    p = Peers(c)
    p.beat(2, owned=(1, 4), m=CHAIN_MAP)
    evs: list[Event] = []
    while p.now < 0.6:
        p.beat(3, owned=(2, 5), m=c.map, about=(PeerReport(2, 1, int(p.now * 1000), 2, 1),))
        p.step()
        evs += drain(c)
    assert any(isinstance(e, PeerLost) for e in evs)
    assert not any(isinstance(e, TakeoverDecided) for e in evs)
    assert [m.node_id for m in c.ready_view()] == [3]
    c.set_local(p.now, ready=True)
    (t,) = [e for e in drain(c) if isinstance(e, TakeoverDecided)]
    assert t.buckets == (1,) and [m.node_id for m in c.ready_view()] == [1, 3]
