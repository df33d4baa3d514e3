"""``lbsync demo``: a real farm in network namespaces survives the death of a node.

Steps, each printed as it happens: build a 3-node lab (nothing changes in the root namespace),
start a daemon and keepalived (lbsync's second failure signal, VRRP on the management link) per
node, open long-lived TCP and UDP flows through the farm (plain, ingress
SNAT, DNAT, egress SNAT), kill one node hard (SIGKILL its daemon and take its links down in the
same instant), watch the survivors claim its buckets, bring the node back (it rejoins empty and
resyncs before it may own anything), hand its share back by planned handoff (``lbsync
rebalance``), stop the traffic and print a summary; the lab is always torn down.
Exit status 0 only when every flow survived.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from typing import Any

from lbsync.lab import daemons
from lbsync.lab.farm import Lab, LabError, exists
from lbsync.lab.traffic import TrafficRun


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="a 3-node lab farm survives a node's death (root)")
    p.add_argument("--name", default="lbdemo", help="lab prefix (namespaces <name>-*)")
    p.add_argument("--nodes", type=int, default=3, help="firewall nodes (>= 3)")
    p.add_argument("--tcp", type=int, default=300, help="TCP connections")
    p.add_argument("--udp", type=int, default=150, help="UDP flows")
    p.add_argument("--victim", type=int, default=2, help="node to kill")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-keepalived", action="store_true",
                   help="run without keepalived (heartbeats only)")
    p.set_defaults(func=_demo)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [headers, *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    out = ["  " + "  ".join(c.rjust(w) if k else c.ljust(w)
                            for k, (c, w) in enumerate(zip(r, widths, strict=True)))
           for r in cells]
    out.insert(1, "  " + "  ".join("-" * w for w in widths))
    return out


def render_summary(s: dict[str, Any]) -> str:
    """The summary tables printed at the end of the demo."""
    lines = ["", "summary: buckets forwarded per node"]
    rows = []
    for i, r in sorted(s.get("per_node", {}).items(), key=lambda kv: int(kv[0])):
        rows.append([f"node {i}" + (" (killed)" if int(i) == s["victim"] else ""),
                     r.get("start"), r.get("after_kill"), r.get("claimed"),
                     r.get("after_handback"), r.get("standby")])
    lines += _table(["node", "start", "after kill", "claimed", "after handback",
                     "standby entries"], rows)
    lines += ["", "summary: what the flows saw"]
    lines += _table(["measure", "value"], [
        ["flows (TCP + UDP)", s["flows"]],
        ["alive at the end", s["alive"]],
        ["lost", s["lost"]],
        ["resets", s["resets"]],
        ["errors", s["errors"]],
        ["NAT peer changes", s["nat_peer_changes"]],
        ["buckets moved by the takeover", s["buckets_moved"]],
        ["last claim after the kill (ms)", s["claim_after_kill_ms"]],
        ["longest silence per flow, p99 (s)", s["longest_silence_p99_s"]],
        ["buckets handed back", s["handback_buckets"]],
        ["handback gap per bucket, max (ms)", s["handback_gap_max_ms"]],
        ["keepalived MASTER of the victim's instance", s.get("vrrp_master_of_victim")],
    ])
    return "\n".join(lines)


def _vrrp_master(lab: Lab, survivors: list[int], victim: int) -> int | None:
    """The survivor keepalived made MASTER of the victim's instance (waits up to 5 s)."""
    from lbsync.keepalived import instance_name

    def who() -> int | None:
        return next((i for i in survivors
                     if daemons.vrrp_states(lab, i).get(instance_name(victim)) == "MASTER"),
                    None)

    try:
        found: int | None = daemons.wait_for(who, 5, interval=0.05, what="VRRP master")
    except LabError:
        return None
    return found


def _rebalance(lab: Lab, node: int) -> dict[str, Any]:
    """``lbsync rebalance --json`` run by node ``node``'s operator; its report."""
    cp = subprocess.run([sys.executable, "-m", "lbsync", "rebalance", "--json", "--config",
                         str(lab.config_path), "--node-id", str(node)],
                        capture_output=True, text=True, timeout=120)
    if cp.returncode != 0:
        raise LabError(f"rebalance failed: {cp.stderr.strip()[-500:]}")
    report: dict[str, Any] = json.loads(cp.stdout)
    return report


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _demo(args: argparse.Namespace) -> int:
    from lbsync.cli import UsageError

    if args.nodes < 3:
        raise UsageError("--nodes must be >= 3 (a majority must survive the kill)")
    if not 1 <= args.victim <= args.nodes:
        raise UsageError(f"--victim must be 1..{args.nodes}")
    if not args.no_keepalived and shutil.which("keepalived") is None:
        raise UsageError("keepalived is not installed (apt-get install keepalived, or run "
                         ".ci/install), or pass --no-keepalived")
    if exists(args.name):
        raise UsageError(f"lab {args.name!r} exists already (lbsync lab down --name {args.name})")
    summary: dict[str, Any] = {}
    lab: Lab | None = None
    traffic: TrafficRun | None = None
    try:
        _say(f"building a {args.nodes}-node lab farm {args.name!r} in network namespaces")
        lab = Lab.create(args.name, args.nodes, buckets=64)
        ka = not args.no_keepalived
        _say("starting lbsync and keepalived (one VRRP instance per node on the management "
             "link: lbsync's second failure signal) on every node" if ka else
             "starting lbsync on every node (without keepalived)")
        daemons.up(lab, keepalived=ka, timeout=30)
        if ka:
            _say("keepalived steady: every node MASTER of its own instance, BACKUP of the "
                 "others'")
        owners = {i: len(daemons.status(lab, i)["forwarding"]) for i in lab.node_ids}
        per_node: dict[int, dict[str, Any]] = {i: {"start": n} for i, n in owners.items()}
        _say("farm ready; buckets per node: "
             + ", ".join(f"n{i}={n}" for i, n in owners.items()))
        _say(f"opening {args.tcp} TCP connections and {args.udp} UDP flows through the farm")
        traffic = TrafficRun.start(lab, tcp=args.tcp, udp=args.udp, rate=2.0, mode="mixed",
                                   lookup=False)
        traffic.wait_ready(timeout=60)
        daemons.wait_for(lambda: all(daemons.status(lab, i)["store_entries"] > 0
                                     for i in lab.node_ids), 15, what="replication")
        time.sleep(2.0)
        before = traffic.snapshot()
        _say(f"flows alive: {before['alive']}/{before['flows']}; every node holds standby "
             f"copies: " + ", ".join(f"n{i}={daemons.status(lab, i)['store_entries']}"
                                     for i in lab.node_ids))
        victim = args.victim
        survivors = [i for i in lab.node_ids if i != victim]
        victim_buckets = set(daemons.status(lab, victim)["forwarding"])
        _say(f"killing node {victim} (SIGKILL + links down); it owned "
             f"{len(victim_buckets)} buckets")
        t0 = daemons.kill_node(lab, victim, links_down=True)

        def claimed() -> list[dict[str, Any]] | None:
            recs = [r for i in survivors for r in daemons.status(lab, i)["takeovers"]
                    if r["dead_node"] == victim]
            got = {b for r in recs for b in r["buckets"]} if recs else set()
            return recs if victim_buckets <= got else None

        recs = daemons.wait_for(claimed, 10, interval=0.05, what="takeover")
        t_claim = max(r["claimed_monotonic"] for r in recs) - t0
        for r in recs:
            node = next(i for i in survivors if r in daemons.status(lab, i)["takeovers"])
            _say(f"  node {node} claimed {r['claimed']} buckets "
                 f"(safety pass {r['safety_pass_s'] * 1000:.1f} ms, injected {r['injected']}, "
                 f"claim {r['claim_s'] * 1000:.1f} ms)")
        _say(f"all of node {victim}'s buckets claimed {t_claim * 1000:.0f} ms after the kill")
        vrrp_master = _vrrp_master(lab, survivors, victim) if ka else None
        if ka:
            _say(f"keepalived: node {vrrp_master} is MASTER of lbsync-{victim} (VRRP agrees: "
                 f"node {victim} is dead)" if vrrp_master else
                 f"keepalived: no survivor reports MASTER of lbsync-{victim} yet")
        time.sleep(3.0)
        for i in lab.node_ids:
            per_node[i]["after_kill"] = (len(daemons.status(lab, i)["forwarding"])
                                         if i != victim else None)
        for r in recs:
            node = next(i for i in survivors if r in daemons.status(lab, i)["takeovers"])
            per_node[node]["claimed"] = r["claimed"]
        after = traffic.snapshot()
        _say(f"flows alive after the kill: {after['alive']}/{after['flows']}, "
             f"resets {after['resets']}, NAT peer changes {after['nat_peer_changes']}")
        _say(f"bringing node {victim} back: it rejoins empty and resyncs before owning anything")
        daemons.links(lab, victim, up=True)
        daemons.start_daemon(lab, victim)
        if ka:
            daemons.start_keepalived(lab, victim)
        back = daemons.wait_for(lambda: (s := daemons.status(lab, victim))["ready"] and s,
                                30, what="rejoin")
        _say(f"node {victim} ready with {back['store_entries']} standby entries, owning "
             f"{len(back['forwarding'])} buckets; handing its share back (lbsync rebalance: "
             "planned handoff, bucket by bucket)")
        handback = _rebalance(lab, survivors[0])
        gaps = handback.get("gap_ms") or {}
        _say(f"handback: {handback['moved']} buckets moved to node {victim} in "
             f"{handback['batches']} batches, {handback['total_s']} s; forwarding gap per "
             f"bucket p50 {gaps.get('p50')} ms, max {gaps.get('max')} ms")
        owned_back = len(daemons.status(lab, victim)["forwarding"])
        if ka:
            daemons.wait_vrrp_steady(lab, timeout=20)
            _say(f"keepalived steady again: node {victim} MASTER of lbsync-{victim}")
        for i in lab.node_ids:
            st = daemons.status(lab, i)
            per_node[i]["after_handback"] = len(st["forwarding"])
            per_node[i]["standby"] = st["store_entries"]
        time.sleep(2.0)
        final = traffic.stop()
        traffic = None
        summary = {
            "nodes": args.nodes, "victim": victim, "buckets_moved": len(victim_buckets),
            "claim_after_kill_ms": round(t_claim * 1000, 1),
            "flows": final["flows"], "alive": final["alive"], "resets": final["resets"],
            "errors": final["errors"], "nat_peer_changes": final["nat_peer_changes"],
            "lost": final["flows"] - final["alive"],
            "longest_silence_p99_s": (final.get("longest_silence") or {}).get("p99"),
            "handback_buckets": handback["moved"], "victim_owns_after_handback": owned_back,
            "handback_gap_max_ms": gaps.get("max"), "vrrp_master_of_victim": vrrp_master,
            "per_node": {str(i): row for i, row in per_node.items()},
        }
    except LabError as exc:
        _say(f"demo failed: {exc}")
        return 1
    finally:
        if traffic is not None:
            traffic.kill()
        if lab is not None:
            _say("tearing the lab down")
            lab.destroy()
            daemons.remove_runtime_files(lab.prefix)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(render_summary(summary))
    ok = summary.get("lost") == 0 and summary.get("resets") == 0
    print("\nresult: every connection survived" if ok else "\nresult: connections were lost",
          file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
