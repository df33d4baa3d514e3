"""Farm-wide orchestration: ``lbsync drill fail NODE`` (rehearse a node failure on a live farm
and measure the reaction) and the planned moves of ``lbsync rebalance`` / ``drain`` /
``undrain`` / ``weight`` (:func:`run_rebalance`).

Every node's daemon is reached through a :class:`Farm`: by default only the local daemon's
control socket (``/run/lbsync/<cluster>-<id>.sock``) is opened and the requests for the other
nodes are relayed by the local daemon to theirs over the replication network
(:mod:`lbsync.peerctl`), so the commands work from any node of a real farm. The drill fail
of the local node itself is refused in that mode (its daemon hangs: run it from another
node). Steps of the drill, each reported through ``progress`` as it happens:

1. Snapshot the farm: the victim's owned buckets, every node's takeover log.
2. Install reset counters (``tcp flags rst``, forwarded and locally sent) on every node.
3. The victim fails without handoff: it empties its ``@owned`` set at once and its daemon hangs
   for ``duration`` seconds (no heartbeats, no lease refresh): the same thing the farm sees
   when a node dies (:mod:`lbsync.ops`, ``drill-fail``).
4. The farm reacts: survivors detect the silence, declare the victim lost, decide and claim
   its buckets (commit, then claim). The drill waits until its buckets are claimed.
5. Restore: the victim's daemon resumes, finds itself declared lost, releases and rejoins as a
   new incarnation owning nothing (its buckets come back only by planned handoff, not built).
6. Report: detection, decision, commit and claim times per survivor (each from its own clock:
   no clock is compared across machines), buckets moved, resets counted, the victim's state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lbsync.control import ControlError, call

Progress = Callable[[str], None]


class DrillError(Exception):
    """The drill could not run or its farm did not react in time (one line)."""


Call = Callable[..., Any]  # lbsync.control.call's signature: (path, cmd, args, timeout=)
RELAY_MARGIN = 0.5  # the relay gives up this long before the CLI's own call does


class Farm:
    """How the orchestration reaches every node's daemon.

    Relayed (:meth:`relayed`, the default of the CLI): only the local daemon's Unix socket is
    opened; requests for another node go to the local daemon's ``relay`` command, which
    forwards them to that node's daemon over the replication network
    (:mod:`lbsync.peerctl`). Direct (:meth:`direct`): every node's socket is opened, which
    works only where they all are reachable (the lab: one host; or sockets forwarded).

    Relayed answers carry a clock sample: the peer's ``time.monotonic()`` minus the local
    one (± an error bound), so the instants two nodes report (a seal's release, a take's
    claim) can be compared on the local clock (:meth:`local_time`). Direct mode assumes one
    host: offset 0."""

    def __init__(self, sockets: Mapping[int, Path], timeout: float = 5.0, *,
                 local: int | None = None, nodes: Iterable[int] | None = None,
                 call_fn: Call = call) -> None:
        self.sockets = dict(sockets)  # the Unix sockets this farm opens
        self.nodes = sorted(nodes) if nodes is not None else sorted(self.sockets)
        self.local = local
        self.timeout = timeout
        self._call = call_fn
        self.clock: dict[int, tuple[float, float]] = {}  # node -> (offset_s, error_s)
        if local is not None:
            self.clock[local] = (0.0, 0.0)

    @classmethod
    def direct(cls, sockets: Mapping[int, Path], timeout: float = 5.0, *,
               call_fn: Call = call) -> Farm:
        return cls(sockets, timeout, call_fn=call_fn)

    @classmethod
    def relayed(cls, local: int, socket: Path, nodes: Iterable[int], timeout: float = 5.0, *,
                call_fn: Call = call) -> Farm:
        nodes = sorted(set(nodes) | {local})
        return cls({local: socket}, timeout, local=local, nodes=nodes, call_fn=call_fn)

    @property
    def relaying(self) -> bool:
        return self.local is not None

    def where(self, node: int) -> str:
        """How ``node`` is reached (for messages)."""
        if node in self.sockets:
            return str(self.sockets[node])
        return f"node {self.local}'s relay"

    def request(self, node: int, cmd: str, args: dict[str, Any] | None = None) -> Any:
        if node in self.sockets:
            return self._call(self.sockets[node], cmd, args, timeout=self.timeout)
        if self.local is None or node not in self.nodes:
            raise ControlError(f"node {node} is not in the cluster file")
        ans = self._call(self.sockets[self.local], "relay",
                         {"node": node, "cmd": cmd, "args": dict(args or {}),
                          "timeout": max(0.5, self.timeout - RELAY_MARGIN)},
                         timeout=self.timeout)
        clock = ans.get("clock") or {}
        try:
            offset, error = float(clock["offset_s"]), float(clock["error_s"])
        except (KeyError, TypeError, ValueError):
            pass
        else:
            if node not in self.clock or error < self.clock[node][1]:
                self.clock[node] = (offset, error)  # the tightest estimate so far
        return ans.get("result")

    def status(self, node: int) -> dict[str, Any] | None:
        try:
            st = self.request(node, "status")
        except (ControlError, OSError):
            return None
        return st if isinstance(st, dict) else None

    def local_time(self, node: int, t: float) -> float:
        """``t`` (``node``'s ``time.monotonic()``) on the local clock."""
        return t - self.clock.get(node, (0.0, 0.0))[0]

    def node_time(self, node: int, t: float) -> float:
        """``t`` (the local ``time.monotonic()``) on ``node``'s clock."""
        return t + self.clock.get(node, (0.0, 0.0))[0]

    def clock_error(self, nodes: Iterable[int]) -> float:
        """The largest error bound of the clock estimates of ``nodes`` (seconds)."""
        return max((self.clock.get(n, (0.0, 0.0))[1] for n in nodes), default=0.0)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 1)


def run_fail_drill(farm: Farm, victim: int, *, duration: float = 3.0, timeout: float = 20.0,
                   progress: Progress = lambda _m: None, kind: str = "fail"
                   ) -> dict[str, Any]:
    """Run the drill (see the module docstring); the report as a plain dict. ``kind``
    ``partition``: instead of failing, the victim loses its replication link for ``duration``
    (it keeps running, fences when its lease runs out, and rejoins when the link heals)."""
    if kind not in ("fail", "partition"):
        raise DrillError(f"unknown drill {kind!r}")
    if victim not in farm.nodes:
        raise DrillError(f"node {victim} is not in the cluster file")
    if kind == "fail" and victim == farm.local:
        raise DrillError(f"node {victim} is this node: its daemon relays the drill's requests "
                         f"and would hang with it; run the drill from another node")
    before = {n: farm.status(n) for n in farm.nodes}
    vst = before[victim]
    if vst is None:
        raise DrillError(f"node {victim}'s daemon does not answer (via {farm.where(victim)})")
    survivors = [n for n, st in before.items() if st is not None and n != victim]
    if not survivors:
        raise DrillError("no other node's daemon answers: nobody could take over")
    if vst.get("fenced") or not vst.get("ready"):
        raise DrillError(f"node {victim} is not ready and forwarding: nothing to rehearse")
    victim_buckets = sorted(vst.get("forwarding", []))
    if not victim_buckets:
        raise DrillError(f"node {victim} forwards no bucket: nothing would move")
    victim_inc = int(vst["membership"]["incarnation"])
    seen = {n: {(t["dead_node"], t["claimed_monotonic"]) for t in st["takeovers"]}
            for n in survivors if (st := before[n]) is not None}
    progress(f"farm: {len(farm.nodes)} nodes, {len(survivors)} survivors answer; node "
             f"{victim} (incarnation {victim_inc}) forwards {len(victim_buckets)} buckets")
    for n in [victim, *survivors]:
        farm.request(n, "drill-counters", {"action": "install"})
    rst0 = {n: farm.request(n, "drill-counters", {"action": "read"})
            for n in [victim, *survivors]}
    progress("reset counters installed on every node (tcp flags rst: forwarded, local)")
    t_fail = time.monotonic()
    if kind == "fail":
        farm.request(victim, "drill-fail", {"duration": duration})
        progress(f"node {victim} fails now: @owned emptied, daemon hung for {duration:.1f} s "
                 f"(no handoff)")
    else:
        farm.request(victim, "drill-partition", {"duration": duration})
        progress(f"node {victim} loses its replication link for {duration:.1f} s (it keeps "
                 f"running: it must fence itself before the others claim)")
    claims: dict[int, list[dict[str, Any]]] = {}
    records: dict[int, list[dict[str, Any]]] = {}
    announced: set[int] = set()
    deadline = time.monotonic() + timeout
    got: set[int] = set()
    while time.monotonic() < deadline:
        for n in survivors:
            st = farm.status(n)
            if st is None:
                continue
            new = [t for t in st["takeovers"] if t["dead_node"] == victim
                   and (t["dead_node"], t["claimed_monotonic"]) not in seen[n]]
            claims[n] = new
            records[n] = [r for r in st["membership"]["takeover_records"]
                          if r["dead_node"] == victim
                          and r["dead_incarnation"] == victim_inc]
            if new and n not in announced:
                announced.add(n)
                progress(f"node {n} claimed {sum(t['claimed'] for t in new)} buckets "
                         f"(commit {_ms(new[-1]['safety_pass_s'])} ms, claim "
                         f"{_ms(new[-1]['claim_s'])} ms)")
        got = {b for ts in claims.values() for t in ts for b in t["buckets"]}
        if set(victim_buckets) <= got:
            break
        time.sleep(0.05)
    else:
        missing = sorted(set(victim_buckets) - got)
        raise DrillError(f"survivors did not claim {len(missing)} of node {victim}'s buckets "
                         f"within {timeout:.0f} s")
    t_claimed = time.monotonic()
    progress(f"all {len(victim_buckets)} buckets of node {victim} claimed "
             f"{(t_claimed - t_fail) * 1000:.0f} ms after the failure (polling resolution)")
    # restore: the hang ends by itself; wait for the victim to rejoin
    restored = None
    end = time.monotonic() + duration + timeout
    while time.monotonic() < end:
        st = farm.status(victim)
        if st is not None and not st.get("fenced") and st.get("ready") and \
                int(st["membership"]["incarnation"]) > victim_inc:
            restored = st
            break
        time.sleep(0.1)
    if restored is None:
        progress(f"node {victim} did not rejoin within {duration + timeout:.0f} s")
    else:
        progress(f"node {victim} restored: rejoined as incarnation "
                 f"{restored['membership']['incarnation']}, owning "
                 f"{len(restored['forwarding'])} buckets, {restored['store_entries']} standby "
                 f"entries")
    rst1 = {n: farm.request(n, "drill-counters", {"action": "read"})
            for n in [victim, *survivors]}
    for n in [victim, *survivors]:
        farm.request(n, "drill-counters", {"action": "remove"})
    resets = {str(n): {k: rst1[n][k] - rst0[n].get(k, 0) for k in rst1[n]} for n in rst1}
    per_node = {}
    for n in survivors:
        recs = records.get(n, [])
        rec = recs[-1] if recs else None
        ts = claims.get(n, [])
        if not ts and rec is None:
            continue
        heard = rec["last_heard_at"] if rec else None
        per_node[str(n)] = {
            "buckets": sorted(b for t in ts for b in t["buckets"]),
            "detection_ms": _ms(rec["declared_at"] - heard) if rec else None,
            "decision_ms": _ms(rec["decided_at"] - rec["declared_at"]) if rec else None,
            "commit_ms": _ms(sum(t["safety_pass_s"] for t in ts)),
            "injected": sum(t["injected"] for t in ts),
            "claim_ms": _ms(sum(t["claim_s"] for t in ts)),
            "outage_ms": _ms(rec["claimed_at"] - heard)
            if rec and rec.get("claimed_at") is not None else None,
        }
    outages = [v["outage_ms"] for v in per_node.values() if v["outage_ms"] is not None]
    report = {
        "drill": kind, "victim": victim, "victim_incarnation": victim_inc,
        "duration_s": duration,
        "buckets_moved": len(got & set(victim_buckets)),
        "victim_buckets": victim_buckets,
        "claimed_by": {k: len(v["buckets"]) for k, v in per_node.items()},
        "detection_ms": max((v["detection_ms"] for v in per_node.values()
                             if v["detection_ms"] is not None), default=None),
        "commit_ms": max((v["commit_ms"] for v in per_node.values()), default=None),
        "claim_ms": max((v["claim_ms"] for v in per_node.values()), default=None),
        "outage_ms": max(outages, default=None),
        "fail_to_claimed_ms_polled": round((t_claimed - t_fail) * 1000.0, 1),
        "resets": sum(r["forwarded_rst"] + r["local_rst"] for r in resets.values()),
        "resets_by_node": resets,
        "survivors": per_node,
        "restored": restored is not None,
        "victim_after": None if restored is None else {
            "incarnation": restored["membership"]["incarnation"],
            "forwarding": len(restored["forwarding"]),
            "store_entries": restored["store_entries"]},
    }
    return report


def render_report(r: Mapping[str, Any]) -> str:
    lines = [f"drill {r['drill']} node {r['victim']}: {r['buckets_moved']} buckets moved "
             f"({', '.join(f'node {k}: {v}' for k, v in r['claimed_by'].items())})",
             f"  detection {r['detection_ms']} ms, commit {r['commit_ms']} ms, claim "
             f"{r['claim_ms']} ms, outage (last heard -> claimed) {r['outage_ms']} ms",
             f"  resets counted by nft: {r['resets']}",
             f"  node {r['victim']} restored: {r['restored']}"]
    for n, v in r["survivors"].items():
        lines.append(f"  node {n}: {len(v['buckets'])} buckets, detection {v['detection_ms']} "
                     f"ms, decision {v['decision_ms']} ms, commit {v['commit_ms']} ms "
                     f"({v['injected']} injected), claim {v['claim_ms']} ms")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ rebalance


def run_rebalance(farm: Farm, local: int, *, max_concurrent: int = 8, dry_run: bool = False,
                  timeout: float = 20.0, progress: Progress = lambda _m: None,
                  attempts: int = 3) -> dict[str, Any]:
    """:func:`rebalance_once`, planned again (up to ``attempts`` times) when the farm changed
    under the plan (a fence, a takeover): the moves already made are kept and added up."""
    total: dict[str, Any] | None = None
    for attempt in range(1, attempts + 1):
        try:
            rep = rebalance_once(farm, local, max_concurrent=max_concurrent, dry_run=dry_run,
                                 timeout=timeout, progress=progress)
        except (ControlError, DrillError) as exc:
            if attempt == attempts:
                raise
            progress(f"the farm changed under the plan ({exc}); planning again")
            time.sleep(0.5)
            continue
        if total is None:
            total = rep
        else:
            total["moved"] += rep["moved"]
            total["incomplete"] += rep["incomplete"]
            total["skipped"] += rep["skipped"]
            total["per_bucket"].update(rep["per_bucket"])
            total["plan"] += rep["plan"]
            total["batches"] += rep["batches"]
            total["total_s"] = round(total["total_s"] + rep["total_s"], 3)
            total["gap_ms"] = _gap_stats([v["gap_ms"] / 1e3 for v in
                                          total["per_bucket"].values()])
            total["new_epoch"] = rep["new_epoch"]
            total["clock_error_ms"] = max((e for e in (total["clock_error_ms"],
                                                       rep["clock_error_ms"]) if e is not None),
                                          default=None)
        if dry_run or not rep["skipped"]:
            break
        progress(f"{rep['skipped']} moves were stale; planning again")
        time.sleep(0.5)  # a heartbeat: the planner's view of the owners catches up
    assert total is not None
    total["attempts"] = attempt
    return total


def _gap_stats(gaps: list[float]) -> dict[str, float | None]:
    gaps = sorted(gaps)

    def pct(q: float) -> float | None:
        return round(gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1e3, 2) if gaps else None

    return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)}


def rebalance_once(farm: Farm, local: int, *, max_concurrent: int = 8, dry_run: bool = False,
                   timeout: float = 20.0, progress: Progress = lambda _m: None
                   ) -> dict[str, Any]:
    """Plan (on ``local``'s daemon), agree on the new target map, then move the buckets by
    planned handoff in batches of at most ``max_concurrent``: seal on the old owner, take on
    the new one. Per-bucket forwarding gap = take's claim commit - seal's release commit,
    each node's ``time.monotonic()`` brought to the local clock (:meth:`Farm.local_time`;
    ``clock_error_ms`` in the report bounds the error of that, 0 on one host)."""
    t0 = time.monotonic()
    p = farm.request(local, "rebalance-plan", {"max_concurrent": max_concurrent})
    progress(f"plan: {p['moves']} moves in {len(p['batches'])} batches of at most "
             f"{max_concurrent} (map epoch {p['map_epoch']} -> {p['new_epoch']})")
    report: dict[str, Any] = {"moves": p["moves"], "batches": len(p["batches"]),
                              "map_epoch": p["map_epoch"], "new_epoch": p["new_epoch"],
                              "plan": p["batches"], "dry_run": dry_run}
    if dry_run or not p["moves"]:
        report.update(gap_ms=None, moved=0, total_s=0.0, incomplete=0, skipped=0,
                      per_bucket={}, clock_error_ms=None)
        return report
    res = farm.request(local, "map-propose", {"target": p["target"]})
    epoch = res["map_epoch"]
    nodes = {n for b in p["batches"] for m in b for n in m[1:]}

    def agreed() -> bool:
        return all((st := farm.status(n)) is not None and st["map_epoch"] >= epoch
                   for n in nodes)

    deadline = time.monotonic() + timeout
    while not agreed():
        if time.monotonic() > deadline:
            raise DrillError(f"the farm did not adopt map epoch {epoch} within {timeout:.0f} s")
        time.sleep(0.02)
    progress(f"map epoch {epoch} agreed by nodes {sorted(nodes)}")
    gaps: list[float] = []
    per_bucket: dict[str, Any] = {}
    clock_nodes: set[int] = set()
    incomplete = 0
    moved = 0
    skipped = 0
    for i, batch in enumerate(p["batches"], 1):
        pairs: dict[tuple[int, int], list[int]] = {}
        for b, src, dst in batch:
            pairs.setdefault((src, dst), []).append(b)
        for (src, dst), buckets in sorted(pairs.items()):
            seal = farm.request(src, "handoff-seal", {"buckets": buckets})
            skipped += len(seal["skipped"])
            buckets = seal["buckets"]
            if not buckets:
                continue
            # both instants on the local clock (relayed: each node's offset estimate)
            released = farm.local_time(src, seal["released_monotonic"])
            take = farm.request(dst, "handoff-take", {
                "buckets": buckets, "from_node": src, "seq": seal["seq"],
                "released_monotonic": farm.node_time(dst, released)})
            gap = farm.local_time(dst, take["claimed_monotonic"]) - released
            clock_nodes.update((src, dst))
            for b in buckets:
                gaps.append(gap)
                per_bucket[str(b)] = {"from": src, "to": dst, "gap_ms": round(gap * 1e3, 2),
                                      "complete": take["complete"]}
            incomplete += 0 if take["complete"] else len(buckets)
            moved += len(buckets)
        done = [per_bucket[str(m[0])]["gap_ms"] for m in batch if str(m[0]) in per_bucket]
        progress(f"batch {i}/{len(p['batches'])}: {len(done)} buckets moved, longest gap "
                 f"{max(done, default=0.0):.1f} ms")
    total = time.monotonic() - t0
    report.update(moved=moved, incomplete=incomplete, skipped=skipped,
                  total_s=round(total, 3), gap_ms=_gap_stats(gaps), per_bucket=per_bucket,
                  clock_error_ms=round(farm.clock_error(clock_nodes) * 2e3, 3))
    return report
