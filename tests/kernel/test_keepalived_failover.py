"""keepalived as lbsync's second failure signal, against the real daemons and keepalived 2.2.7
(issue 9 acceptance): one keepalived per node namespace (``daemons.up(lab, keepalived=True)``,
advert_int 0.1), the daemons reading its notify FIFO.

- Heartbeats slowed so that they alone cannot detect a death in time (``heartbeat_ms = 400``,
  ``miss_count = 6``: T_dead 2.4 s, T_fence 1.6 s): a node is killed (keepalived's VRRP child,
  keepalived and the daemon SIGKILLed, links down) under traffic. Its VRRP successor takes its
  instance over (~0.3 s), the verdict lowers the silence threshold to T_fence (membership rule
  3b), the other survivor follows the declaration, and the survivors claim its buckets: the
  declarations came before T_dead of silence, the VRRP counters say so, every flow survives and
  the ``@owned`` sets sampled every 20 ms never show a bucket twice.
- A node's outside cable is pulled (its hub port down: the node's interface loses carrier):
  keepalived reports its own instance FAULT, the daemon hands its buckets off on that event
  (``link_handoffs_vrrp``; the link poll, a fallback while keepalived reports, did not fire)
  and no connection is lost.

Outcomes only, with generous deadlines; the figures are printed (``-s``) for docs/keepalived.md.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lbsync.lab import daemons
from lbsync.lab.farm import Lab
from lbsync.membership import Timing
from tests.kernel.test_failover_takeover import (
    BUCKETS,
    SETTLE,
    Samplers,
    brief,
    check_survived,
    configure,
    flow_counts,
    initial_map,
    owned_now,
    owned_once_as,
    replies_after,
    start_traffic,
    takeovers_of,
    wait_stores,
)

pytestmark = pytest.mark.kernel

DEADLINE = 40.0
ADVERT_INT = 0.1
SLOW = {"profile": "custom", "heartbeat_ms": 400, "miss_count": 6}
SLOW_TIMING = Timing.from_profile("custom", 400, 6)   # T_dead 2.4 s, T_fence 1.6 s
# The link test needs no slow heartbeats; a tolerant profile keeps a loaded CI host's loop
# stalls (sweeps, traffic) from fencing nodes: T_dead 0.8 s.
TOLERANT = {"profile": "custom", "heartbeat_ms": 100, "miss_count": 8}


@contextlib.contextmanager
def keepalived_lab(make: Callable[..., Lab], **membership: Any) -> Iterator[Lab]:
    """3 nodes, a daemon and a keepalived each, ready and VRRP-steady; torn down on exit."""
    lab = make(3, buckets=BUCKETS)
    try:
        configure(lab, **membership)
        daemons.up(lab, keepalived=True, advert_int=ADVERT_INT, timeout=DEADLINE)
        yield lab
    except BaseException:
        daemons.dump_logs(lab)
        for i in lab.node_ids:
            with contextlib.suppress(OSError):
                log = (daemons.keepalived_dir(lab, i) / "keepalived.log").read_text()
                print(f"--- keepalived n{i}\n" + "\n".join(log.splitlines()[-15:]))
        raise
    finally:
        lab.destroy()
        daemons.remove_runtime_files(lab.prefix)


def vrrp_events(st: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in st["vrrp"]["recent"] if e["event"] == name]


def test_killed_node_detected_by_keepalived_before_slow_heartbeats_could(
        lab_factory: Callable[..., Lab]) -> None:
    tcp, udp = flow_counts()
    t = SLOW_TIMING
    with keepalived_lab(lab_factory, **SLOW) as lab:
        om = initial_map(lab)
        assert owned_once_as(lab, lab.node_ids, om.owners)
        victim, successor = 2, 3            # lbsync-2's first backup is node 3
        after = om.successor_map(victim)
        inherited = om.buckets_of(victim)
        survivors = [i for i in lab.node_ids if i != victim]
        with start_traffic(lab, tcp, udp) as run:
            wait_stores(lab, lab.node_ids, tcp + udp, timeout=DEADLINE)
            samplers = Samplers.start(lab, lab.node_ids)
            try:
                time.sleep(1.0)
                before = run.snapshot()
                assert before["alive"] == tcp + udp, before["states"]
                t0 = daemons.kill_node(lab, victim, links_down=True)
                daemons.wait_for(lambda: owned_once_as(lab, survivors, after.owners),
                                 DEADLINE, interval=0.02,
                                 what="the dead node's buckets owned once, by successors")
                t_owned = time.monotonic()
                time.sleep(SETTLE)
                rep = run.stop()
            finally:
                samplers.stop()
        counts = samplers.samples()
        assert all(n > 100 for n in counts.values()), counts
        assert samplers.double_ownership() == []
        check_survived(rep, flows=tcp + udp)
        silent = replies_after(rep, before, t0 + 1.0 + t.dead)
        assert not silent, (len(silent), [brief(f) for f in silent[:4]])

        sts = {i: daemons.status(lab, i) for i in survivors}
        # keepalived told the successor, and only it
        dead_ev = vrrp_events(sts[successor], "VrrpPeerDeclaredDead")
        assert [e["node_id"] for e in dead_ev if e["t"] > t0] == [victim]
        assert not [e for e in vrrp_events(sts[1], "VrrpPeerDeclaredDead") if e["t"] > t0]
        ms3, ms1 = sts[successor]["membership"], sts[1]["membership"]
        assert ms3["vrrp_verdicts"] >= 1 and ms3["peers_lost_by_vrrp"] == 1
        assert ms1["peers_lost_following"] == 1
        # Both declared on less than T_dead of silence: only the VRRP path does that (a
        # heartbeat-only declaration needs T_dead of silence here and at every voter).
        figures: dict[str, Any] = {"t_dead": t.dead, "t_fence": t.fence}
        for i in survivors:
            recs = [r for r in sts[i]["membership"]["takeover_records"]
                    if r["dead_node"] == victim]
            got = sorted(b for tk in takeovers_of(lab, i, victim) for b in tk["buckets"])
            assert got == sorted(b for b in inherited if after.owners[b] == i)
            if not got:
                continue
            assert recs, sts[i]["membership"]
            silence = recs[-1]["declared_at"] - recs[-1]["last_heard_at"]
            assert silence < t.dead, (silence, recs)
            claimed = max(tk["claimed_monotonic"] for tk in takeovers_of(lab, i, victim))
            assert claimed - t0 < t.dead, claimed - t0
            figures[f"n{i}"] = {"silence_at_declaration_s": round(silence, 3),
                                "kill_to_claim_s": round(claimed - t0, 3)}
        figures["vrrp_verdict_after_kill_s"] = round(dead_ev[-1]["t"] - t0, 3)
        figures["kill_to_all_owned_seen_s"] = round(t_owned - t0, 3)
        print("FIGURES", json.dumps(figures))


def test_outside_link_down_keepalived_fault_hands_buckets_off_no_connection_lost(
        lab_factory: Callable[..., Lab]) -> None:
    tcp, udp = flow_counts()
    with keepalived_lab(lab_factory, **TOLERANT) as lab:
        victim = 2
        others = [i for i in lab.node_ids if i != victim]
        with start_traffic(lab, tcp, udp) as run:
            wait_stores(lab, lab.node_ids, tcp + udp, timeout=DEADLINE)
            time.sleep(1.0)
            before = run.snapshot()
            assert before["alive"] == tcp + udp, before["states"]
            mine = owned_now(lab, [victim])[victim]
            assert mine
            t0 = time.monotonic()
            lab.set_node_links(victim, False, ("outside",))
            try:
                def handed_off() -> bool:
                    sets = owned_now(lab, lab.node_ids)
                    held = [b for s in sets.values() for b in s]
                    return not sets[victim] and sorted(held) == list(range(lab.buckets))

                daemons.wait_for(handed_off, DEADLINE, interval=0.02,
                                 what="node 2's buckets handed off to the others, once")
                t_owned = time.monotonic()
                time.sleep(SETTLE)
                mid = run.snapshot()
                st = daemons.status(lab, victim)
                ops = daemons.request(lab, victim, "ops-status")
            finally:
                lab.set_node_links(victim, True, ("outside",))
            rep = run.stop()
        check_survived(rep, flows=tcp + udp)
        assert mid["alive"] == tcp + udp and mid["resets"] == 0, mid["states"]
        silent = replies_after(rep, before, t_owned + 2.0)
        assert not silent, (len(silent), [brief(f) for f in silent[:4]])
        # the handoff came from keepalived's FAULT, not from the link poll
        fault = vrrp_events(st, "VrrpOwnLinkFailed")
        assert len(fault) == 1 and fault[0]["t"] > t0
        assert ops["link_handoffs_vrrp"] == 1 and ops["link_handoffs_poll"] == 0, ops
        handoff = [e for e in ops["link_events"] if e["event"] == "handoff"]
        assert len(handoff) == 1 and handoff[0]["by"] == "vrrp", ops["link_events"]
        assert handoff[0]["released"] == len(mine)
        assert ops["link_failed"]
        for i in others:  # node 3 got keepalived's verdict on node 2, which heartbeats on
            sti = daemons.status(lab, i)
            assert not sti["fenced"]
            assert sti["membership"]["peers_lost"] == 0, sti["membership"]
        print("FIGURES", json.dumps({
            "link_down_to_fault_s": round(fault[0]["t"] - t0, 4),
            "fault_to_handoff_s": round(handoff[0]["monotonic"] - fault[0]["t"], 4),
            "handoff_call_s": round(handoff[0]["handoff_s"], 4),
            "link_down_to_all_owned_seen_s": round(t_owned - t0, 3)}))
