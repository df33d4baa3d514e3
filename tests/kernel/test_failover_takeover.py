"""Failover acceptance against the real daemons: a node dies, its flows keep flowing (issue 7).

Each test builds its own lab (3 nodes, 64 buckets, the lab's NAT rules), starts ``lbsyncd`` on
every node, runs long-lived traffic through the farm, kills a node and checks outcomes with
generous deadlines (timings belong to ``tests/benchmarks/takeover.py``):

- killed with its links down: every bucket of the dead node ends up in the ``@owned`` of the
  successor ``hashing`` names, once; every TCP connection (plain, ingress SNAT, egress SNAT,
  DNAT) keeps answering with the same NAT peer at the server and no reset; UDP flows resume;
- SIGKILLed with its links up: its ``@owned`` empties by itself (lease timeouts), survivors take
  over, and ``@owned`` sampled every 20 ms on every node (one sampler process per namespace,
  raw netlink) never shows a bucket in two sets; the server receives every request at most once.

Flow counts: ``LBSYNC_FAILOVER_FLOWS=TCP,UDP`` (default 200,100 for CI; the issue's figure is
1000,500, which the benchmark uses and this variable allows here).

The helpers (daemon lab, ``@owned`` samplers, expected successors) serve the other
``test_failover_*`` modules too.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hashing.ownermap import Member, OwnerMap, View, assign
from lbsync.lab import daemons
from lbsync.lab.farm import Lab, LabError
from lbsync.lab.traffic import TrafficRun
from lbsync.node import target_map
from tests.kernel.daemon_checks import kernel_table

pytestmark = pytest.mark.kernel

BUCKETS = 64
DEADLINE = 20.0          # generous: outcomes, not timings
SETTLE = 4.0             # after the takeover: TCP's retransmission timer (0.2, 0.6, 1.4 s...)
SAMPLE_PERIOD = 0.02


def flow_counts() -> tuple[int, int]:
    """(TCP, UDP) from ``LBSYNC_FAILOVER_FLOWS`` (default 200,100)."""
    text = os.environ.get("LBSYNC_FAILOVER_FLOWS", "200,100")
    tcp, _, udp = text.partition(",")
    return int(tcp), int(udp or 0)


# ------------------------------------------------------------------------------------ labs


def configure(lab: Lab, **membership: Any) -> None:
    """Append a ``[membership]`` table to the lab's cluster file (before the daemons start)."""
    if not membership:
        return
    lines = ["", "[membership]"]
    for k, v in membership.items():
        lines.append(f"{k} = {v!r}".replace("'", '"') if isinstance(v, str)
                     else f"{k} = {str(v).lower() if isinstance(v, bool) else v}")
    with open(lab.config_path, "a") as f:
        f.write("\n".join(lines) + "\n")


@contextlib.contextmanager
def daemon_lab(make: Callable[..., Lab], nodes: int = 3, *, buckets: int = BUCKETS,
               ipv6: bool = False, **membership: Any) -> Iterator[Lab]:
    """A lab with a running daemon on every node, ready; torn down (and its files) on exit."""
    lab = make(nodes, buckets=buckets, ipv6=ipv6)
    try:
        configure(lab, **membership)
        daemons.start_daemons(lab)
        daemons.wait_ready(lab, timeout=DEADLINE)
        yield lab
    except BaseException:
        daemons.dump_logs(lab)
        raise
    finally:
        lab.destroy()
        daemons.remove_runtime_files(lab.prefix)


def initial_map(lab: Lab) -> OwnerMap:
    """The map a fresh farm bootstraps (every node, weight 1): the lab's split."""
    return assign(View.of(Member(i) for i in lab.node_ids), lab.buckets, None)


def owned_now(lab: Lab, nodes: Iterable[int]) -> dict[int, set[int]]:
    return {i: lab.owned(i) for i in nodes}


def owned_once_as(lab: Lab, nodes: Iterable[int], owners: tuple[int, ...]) -> bool:
    """Every bucket in exactly one of ``nodes``' ``@owned``: the one ``owners`` names."""
    sets = owned_now(lab, nodes)
    for b, want in enumerate(owners):
        holders = [i for i, s in sets.items() if b in s]
        if holders != [want]:
            return False
    return True


def wait_stores(lab: Lab, nodes: Iterable[int], entries: int, timeout: float = DEADLINE
                ) -> None:
    """Until every node's standby store and kernel copies hold at least ``entries`` and
    nothing is pending (replication and pre-injection caught up)."""
    ids = tuple(nodes)

    def ok() -> bool:
        for i in ids:
            st = daemons.status(lab, i)
            if (st["store_entries"] < entries or st["pending_inject"]
                    or st["pending_delete"]):
                return False
        return True

    daemons.wait_for(ok, timeout, what=f"stores of {ids} at {entries} entries")


def takeovers_of(lab: Lab, node: int, dead: int) -> list[dict[str, Any]]:
    return [t for t in daemons.status(lab, node)["takeovers"] if t["dead_node"] == dead]


# ------------------------------------------------------------------------------ samplers

SAMPLER = r"""
import sys, time
from lbsync.nftset import NftSetSocket
out = open(sys.argv[1], "w", buffering=1)
period = float(sys.argv[2])
s = NftSetSocket()
nxt = time.monotonic()
while True:
    a = time.monotonic()
    try:
        bits = sum(1 << b for b in s.marks("owned"))
    except OSError:
        bits = -1
    out.write(f"{a:.6f} {time.monotonic():.6f} {bits:x}\n")
    nxt += period
    time.sleep(max(0.0, nxt - time.monotonic()))
"""


@dataclass
class Samplers:
    """One ``@owned`` sampler process per node namespace (CLOCK_MONOTONIC timestamps)."""

    lab: Lab
    procs: dict[int, subprocess.Popen[bytes]]
    files: dict[int, Path]

    @classmethod
    def start(cls, lab: Lab, nodes: Iterable[int], period: float = SAMPLE_PERIOD) -> Samplers:
        procs, files = {}, {}
        for i in nodes:
            path = lab.directory / f"owned-samples-n{i}.txt"
            procs[i] = lab.popen(lab.node_ns(i), [sys.executable, "-c", SAMPLER, str(path),
                                                  repr(period)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            files[i] = path
        self = cls(lab, procs, files)
        daemons.wait_for(lambda: all(len(self.read(i)) > 2 for i in self.procs), 10,
                         what="samplers running")
        return self

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(5)

    def read(self, node: int) -> list[tuple[float, float, int]]:
        """(start, end, bitmap) per sample; bitmap -1 when the listing failed."""
        out = []
        try:
            text = self.files[node].read_text()
        except OSError:
            return []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                out.append((float(parts[0]), float(parts[1]), int(parts[2], 16)))
        return out

    def runs(self, node: int) -> dict[int, list[tuple[float, float]]]:
        """bucket -> intervals [first sample holding it, last sample holding it] of each
        unbroken run of samples that held it."""
        runs: dict[int, list[tuple[float, float]]] = {}
        open_: dict[int, float] = {}
        last_end: dict[int, float] = {}
        for a, e, bits in self.read(node):
            if bits < 0:
                continue
            held = {b for b in range(self.lab.buckets) if bits >> b & 1}
            for b in held:
                open_.setdefault(b, a)
                last_end[b] = e
            for b in [b for b in open_ if b not in held]:
                runs.setdefault(b, []).append((open_.pop(b), last_end[b]))
        for b, start in open_.items():
            runs.setdefault(b, []).append((start, last_end[b]))
        return runs

    def double_ownership(self) -> list[tuple[int, int, int, float]]:
        """(bucket, node, other node, instant) wherever two nodes' runs of one bucket overlap:
        a sampled instant at which both held it."""
        runs = {i: self.runs(i) for i in self.procs}
        bad = []
        ids = sorted(runs)
        for x, i in enumerate(ids):
            for j in ids[x + 1:]:
                for b, ri in runs[i].items():
                    for a1, e1 in ri:
                        for a2, e2 in runs[j].get(b, []):
                            if max(a1, a2) <= min(e1, e2):
                                bad.append((b, i, j, max(a1, a2)))
        return bad

    def samples(self) -> dict[int, int]:
        return {i: len(self.read(i)) for i in self.procs}

    def held_before(self, node: int, buckets: Iterable[int], t: float) -> bool:
        """Whether the last good sample begun before ``t`` shows ``node`` holding every one of
        ``buckets``."""
        want = set(buckets)
        last = [bits for a, _e, bits in self.read(node) if a < t and bits >= 0]
        return bool(last) and all(last[-1] >> b & 1 for b in want)

    def last_held(self, node: int, buckets: Iterable[int]) -> float | None:
        """The last sample instant at which ``node`` held any of ``buckets``."""
        want = set(buckets)
        last = None
        for _a, e, bits in self.read(node):
            if bits > 0 and any(bits >> b & 1 for b in want):
                last = e
        return last


# --------------------------------------------------------------------------------- traffic


def check_survived(rep: dict[str, Any], *, flows: int) -> None:
    """Every flow alive at the end, no reset/error, no NAT peer change."""
    assert rep["connected"] == flows, rep["states"]
    bad = [f for f in rep["per_flow"] if not f["alive"] or f["state"] != "open"
           or f["peer_changes"]]
    assert not bad, (len(bad), [brief(f) for f in bad[:4]])
    assert rep["resets"] == 0 and rep["errors"] == 0, rep["states"]
    assert rep["nat_peer_changes"] == 0


def brief(f: dict[str, Any]) -> dict[str, Any]:
    return {k: f[k] for k in ("id", "proto", "mode", "state", "alive", "sent", "replies",
                              "first_reply", "last_reply", "gaps", "peer_changes", "error")}


def replies_after(rep: dict[str, Any], before: dict[str, Any], instant: float
                  ) -> list[dict[str, Any]]:
    """Flows that did not answer after ``instant`` (monotonic) or gained no reply since
    ``before``."""
    t = instant - rep["t0_monotonic"]
    prev = {f["id"]: f["replies"] for f in before["per_flow"]}
    return [f for f in rep["per_flow"]
            if f["last_reply"] is None or f["last_reply"] <= t
            or f["replies"] <= prev.get(f["id"], 0)]


def start_traffic(lab: Lab, tcp: int, udp: int, rate: float = 5.0,
                  families: str = "4") -> TrafficRun:
    run = TrafficRun.start(lab, tcp=tcp, udp=udp, rate=rate, mode="mixed", lookup=False,
                           drain=2.0, families=families)
    ready = run.wait_ready(timeout=60)
    if ready["connected"] != tcp + udp:
        run.kill()
        raise LabError(f"traffic: only {ready['connected']} of {tcp + udp} flows connected")
    return run


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("families", ["4", "46"], ids=["ipv4", "dual_stack"])
def test_killed_node_links_down_successors_take_over_flows_survive(
        lab_factory: Callable[..., Lab], families: str) -> None:
    """Dual stack: half the flows IPv6 (plain, SNAT66, DNAT66, egress SNAT66), replicated
    and taken over like the IPv4 ones."""
    tcp, udp = flow_counts()
    with daemon_lab(lab_factory, ipv6=families != "4") as lab:
        om = initial_map(lab)
        assert owned_once_as(lab, lab.node_ids, om.owners)
        victim = 1
        after = om.successor_map(victim)
        inherited = om.buckets_of(victim)
        with start_traffic(lab, tcp, udp, families=families) as run:
            wait_stores(lab, lab.node_ids, tcp + udp)
            time.sleep(1.0)
            before = run.snapshot()
            assert before["alive"] == tcp + udp, before["states"]
            v6 = sum(f["family"] == 6 for f in before["per_flow"])
            assert (v6 > 0.4 * (tcp + udp)) if families == "46" else v6 == 0, v6
            # the victim's own IPv6 entries (ct mark = bucket), NAT mappings included
            mine6 = {k: r for k, r in kernel_table(lab, victim).items()
                     if r.family == socket.AF_INET6 and r.mark in inherited}
            assert (len(mine6) > 10) if families == "46" else not mine6, len(mine6)
            t0 = daemons.kill_daemon(lab, victim, links_down=True)
            survivors = [i for i in lab.node_ids if i != victim]
            daemons.wait_for(lambda: owned_once_as(lab, survivors, after.owners), DEADLINE,
                             what="the dead node's buckets owned once, by their successors")
            time.sleep(SETTLE)
            rep = run.stop()
            tables = {i: kernel_table(lab, i) for i in survivors}
        check_survived(rep, flows=tcp + udp)
        # each IPv6 entry is in its successor's kernel with the same tuples (same NAT)
        moved = [(k, r) for k, r in mine6.items()
                 if (got := tables[after.owners[r.mark]].get(k)) is None
                 or (got.orig, got.reply) != (r.orig, r.reply)]
        assert not moved, (len(moved), len(mine6))
        silent = replies_after(rep, before, t0 + 1.0)
        assert not silent, (len(silent), [brief(f) for f in silent[:4]])
        # the takeover records: each survivor claimed exactly its successor share
        for i in survivors:
            got = sorted(b for t in takeovers_of(lab, i, victim) for b in t["buckets"])
            assert got == sorted(b for b in inherited if after.owners[b] == i)
            st = daemons.status(lab, i)
            assert not st["fenced"], st["membership"]
            assert sorted(st["forwarding"]) == list(after.buckets_of(i))


def test_killed_daemon_links_up_fences_itself_never_two_owners(
        lab_factory: Callable[..., Lab]) -> None:
    tcp, udp = flow_counts()
    with daemon_lab(lab_factory) as lab:
        om = initial_map(lab)
        victim = 2
        after = om.successor_map(victim)
        inherited = om.buckets_of(victim)
        survivors = [i for i in lab.node_ids if i != victim]
        with start_traffic(lab, tcp, udp) as run:
            wait_stores(lab, lab.node_ids, tcp + udp)
            samplers = Samplers.start(lab, lab.node_ids)
            try:
                time.sleep(1.0)
                before = run.snapshot()
                t0 = daemons.kill_daemon(lab, victim, links_down=False)
                # its kernel stops forwarding by itself: the lease timeouts of @owned expire
                daemons.wait_for(lambda: not lab.owned(victim), DEADLINE,
                                 what="the dead daemon's @owned to empty by itself")
                daemons.wait_for(lambda: owned_once_as(lab, lab.node_ids, after.owners),
                                 DEADLINE, what="successors own the dead node's buckets")
                time.sleep(SETTLE)
                rep = run.stop()
            finally:
                samplers.stop()
        counts = samplers.samples()
        assert all(n > 100 for n in counts.values()), counts
        assert samplers.double_ownership() == []
        # the victim held its buckets up to the kill (the last sample begun before t0 shows
        # them: the lease left at the kill may be shorter than one sample period on a loaded
        # host, so no later sample need catch them), the kernel emptied @owned by itself
        # (waited above), and that before any survivor held an inherited bucket
        assert samplers.held_before(victim, inherited, t0)
        fenced_at = samplers.last_held(victim, inherited)
        assert fenced_at is not None and fenced_at > t0 - 0.5
        claimed = [min((a for a, _e in samplers.runs(i).get(b, []) if a > t0), default=None)
                   for b in inherited for i in survivors if after.owners[b] == i]
        assert None not in claimed and min(c for c in claimed if c is not None) > fenced_at
        check_survived(rep, flows=tcp + udp)
        assert rep["server_duplicates"] == 0 and rep["duplicate_replies"] == 0
        silent = replies_after(rep, before, t0 + 1.0)
        assert not silent, (len(silent), [brief(f) for f in silent[:4]])


def test_two_of_four_killed_one_after_the_other_everything_survives(
        lab_factory: Callable[..., Lab]) -> None:
    tcp, udp = flow_counts()
    with daemon_lab(lab_factory, 4) as lab:
        om = initial_map(lab)
        first, second = 4, 2
        # the agreed map's chains (level 1: hashing successors; level 2: the successor in the
        # map without the owner and its first successor), as TargetMap.without applies them
        tm = target_map(om, proposer=1)
        after_first = tm.without({first}, proposer=1)
        assert tuple(after_first.owners) == om.successor_map(first).owners
        after_second = tuple(after_first.without({second}, proposer=1).owners)
        with start_traffic(lab, tcp, udp) as run:
            wait_stores(lab, lab.node_ids, tcp + udp)
            time.sleep(1.0)
            before = run.snapshot()
            daemons.kill_daemon(lab, first, links_down=True)
            alive = [i for i in lab.node_ids if i != first]
            daemons.wait_for(lambda: owned_once_as(lab, alive, tuple(after_first.owners)),
                             DEADLINE,
                             what=f"node {first}'s buckets owned by their successors")
            time.sleep(SETTLE)
            mid = run.snapshot()
            t1 = daemons.kill_daemon(lab, second, links_down=True)
            alive = [i for i in alive if i != second]
            daemons.wait_for(lambda: owned_once_as(lab, alive, after_second), DEADLINE,
                             what=f"node {second}'s buckets owned by their map successors")
            time.sleep(SETTLE)
            rep = run.stop()
        assert before["alive"] == tcp + udp and mid["alive"] == tcp + udp, mid["states"]
        check_survived(rep, flows=tcp + udp)
        silent = replies_after(rep, mid, t1 + 1.0)
        assert not silent, (len(silent), [brief(f) for f in silent[:4]])
