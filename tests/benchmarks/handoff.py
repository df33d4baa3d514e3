"""Handoff benchmark: per-bucket forwarding gap and total time of a rebalance that moves 25 %
of the buckets by planned handoff, under traffic.

Run from the repository root as root: ``python -m tests.benchmarks.handoff [--quick]``.
One case builds a 4-node lab (64 buckets, the lab's NAT rules; prefix ``lbth``), starts
``lbsyncd`` on every node and removes everything again:

1. node 4 is killed (SIGKILL, links up): the survivors take its buckets over;
2. traffic through the farm: ``--tcp`` TCP connections and ``--udp`` UDP flows (default 1000 and
   500, the issue's figure; ``--quick``: 200 and 100), mixed plain / ingress SNAT / DNAT /
   egress SNAT, 2 requests/s per flow;
3. node 4 is started again (empty: it rejoins and resyncs; the readiness gate) and, once ready,
   ``lbsync rebalance --max-concurrent K --node-id 1`` runs (default K 8): the plan moves a
   quarter of the buckets (those ``hashing`` gives back to node 4), each by seal on the old
   owner and take on node 4 after its stream reached the seal. ``--transport relay`` (the
   default, what the CLI does): the CLI opens node 1's control socket only and node 1's
   daemon relays the other nodes' requests over the replication network (lbsync/peerctl.py);
   ``direct``: the CLI opens every node's socket (``--direct``, the lab-only mode);
4. figures: moves, batches, per-bucket forwarding gap (take's claim commit - seal's release
   commit, ``time.monotonic()`` of two namespaces of one host) p50/p90/p99/max, the total
   rebalance time (plan, map agreement, every batch), and what the traffic saw: flows alive,
   resets, errors, NAT peer changes (target: 0 connections lost; gap <= 50 ms per bucket);
5. the cost of a relay, with its baseline from the same run: ``ops-status`` of node 2 asked
   ``--calls`` times directly on node 2's socket and as many times relayed by node 1
   (``relay``), per-call p50/p99 and the ratio relayed / direct.

Membership timing is the tolerant custom profile the kernel tests use (T_hb 0.5 s, T_dead 4 s):
the gap of a planned handoff does not depend on failure detection, and on a busy host the
default profile's 0.1 s stall threshold fences nodes on their own.
Every figure is a line; the last line of stdout is one JSON object with all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from lbsync.control import call
from lbsync.lab import daemons
from lbsync.lab.farm import Lab
from lbsync.lab.traffic import TrafficRun
from tests.netns import unique_prefix

BUCKETS = 64
NODES = 4


def say(msg: str) -> None:
    print(msg, flush=True)


def relay_cost(lab: Lab, calls: int) -> dict[str, Any]:
    """Per-call time of ``ops-status`` on node 2: direct (its socket) and relayed by node 1."""
    def timed(fn: Any) -> list[float]:
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return sorted(out)

    def pct(xs: list[float], q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 3)

    direct = timed(lambda: call(daemons.socket_path(lab, 2), "ops-status"))
    relayed = timed(lambda: call(daemons.socket_path(lab, 1), "relay",
                                 {"node": 2, "cmd": "ops-status"}))
    return {"calls": calls,
            "direct_ms": {"p50": pct(direct, 0.5), "p99": pct(direct, 0.99)},
            "relayed_ms": {"p50": pct(relayed, 0.5), "p99": pct(relayed, 0.99)},
            "ratio_p50": round(pct(relayed, 0.5) / max(pct(direct, 0.5), 1e-3), 2)}


def run_case(tcp: int, udp: int, k: int, transport: str = "relay",
             calls: int = 200) -> dict[str, Any]:
    lab = Lab.create(unique_prefix("h"), NODES, buckets=BUCKETS)
    traffic: TrafficRun | None = None
    try:
        with open(lab.config_path, "a") as f:
            f.write('\n[membership]\nprofile = "custom"\nheartbeat_ms = 500\nmiss_count = 8\n')
        daemons.start_daemons(lab)
        daemons.wait_ready(lab, timeout=60)
        daemons.kill_daemon(lab, NODES)
        survivors = [i for i in lab.node_ids if i != NODES]
        daemons.wait_for(lambda: sorted(b for i in survivors
                                        for b in daemons.status(lab, i)["forwarding"])
                         == list(range(BUCKETS)), 60, what="survivors own every bucket")
        say(f"node {NODES} killed; {len(survivors)} survivors own all {BUCKETS} buckets")
        traffic = TrafficRun.start(lab, tcp=tcp, udp=udp, rate=2.0, mode="mixed",
                                   lookup=False)
        traffic.wait_ready(timeout=120)
        daemons.wait_for(lambda: all(daemons.status(lab, i)["store_entries"] >= tcp + udp
                                     for i in survivors), 60, what="replication")
        before = traffic.snapshot()
        say(f"traffic: {before['alive']}/{before['flows']} flows alive")
        t_start = time.monotonic()
        daemons.start_daemon(lab, NODES)
        back = daemons.wait_for(lambda: (s := daemons.status(lab, NODES))["ready"] and s,
                                60, what="rejoin")
        say(f"node {NODES} ready {time.monotonic() - t_start:.2f} s after its start, "
            f"{back['store_entries']} standby entries, owning {len(back['owned'])}")
        # the plan uses the ready view as node 1 sees it: wait for node 4's ready heartbeat
        daemons.wait_for(lambda: any(v[0] == NODES for v in daemons.request(
            lab, 1, "rebalance-plan", {"max_concurrent": k})["view"]), 30,
            what=f"node {NODES} in node 1's ready view")
        cp = subprocess.run([sys.executable, "-m", "lbsync", "rebalance", "--json",
                             "--max-concurrent", str(k), "--config", str(lab.config_path),
                             "--node-id", "1", *(["--direct"] if transport == "direct" else [])],
                            capture_output=True, text=True, timeout=120)
        if cp.returncode != 0:
            raise RuntimeError(f"rebalance failed: {cp.stderr.strip()[-300:]}")
        rep = json.loads(cp.stdout)
        time.sleep(3.0)  # TCP retransmissions of moved flows land on the new owners
        final = traffic.stop()
        traffic = None
        owned4 = len(daemons.status(lab, NODES)["forwarding"])
        cost = relay_cost(lab, calls)
        return {
            "transport": transport, "relay_cost": cost,
            "clock_error_ms": rep.get("clock_error_ms"),
            "tcp": tcp, "udp": udp, "max_concurrent": k, "buckets": BUCKETS, "nodes": NODES,
            "moves": rep["moves"], "moved": rep["moved"], "batches": rep["batches"],
            "moved_fraction": round(rep["moved"] / BUCKETS, 3), "node4_owns": owned4,
            "gap_ms": rep["gap_ms"], "incomplete_seals": rep["incomplete"],
            "rebalance_total_s": rep["total_s"], "attempts": rep.get("attempts", 1),
            "flows": final["flows"], "alive": final["alive"], "resets": final["resets"],
            "errors": final["errors"], "nat_peer_changes": final["nat_peer_changes"],
            "lost": final["flows"] - final["alive"],
            "longest_silence": final.get("longest_silence"),
        }
    finally:
        if traffic is not None:
            traffic.kill()
        lab.destroy()
        daemons.remove_runtime_files(lab.prefix)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 TCP + 100 UDP flows")
    ap.add_argument("--tcp", type=int, default=None)
    ap.add_argument("--udp", type=int, default=None)
    ap.add_argument("--max-concurrent", type=int, default=8)
    ap.add_argument("--transport", choices=("relay", "direct"), default="relay",
                    help="how the CLI reaches the other nodes (default: relayed by node 1)")
    ap.add_argument("--calls", type=int, default=None,
                    help="requests per mode for the relay cost (default 200; --quick 50)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print(json.dumps({"error": "needs root"}))
        return 2
    tcp = args.tcp if args.tcp is not None else (200 if args.quick else 1000)
    udp = args.udp if args.udp is not None else (100 if args.quick else 500)
    calls = args.calls if args.calls is not None else (50 if args.quick else 200)
    fig = run_case(tcp, udp, args.max_concurrent, args.transport, calls)
    for key in ("transport", "moved", "moved_fraction", "batches", "gap_ms",
                "rebalance_total_s", "clock_error_ms", "flows", "alive", "resets",
                "nat_peer_changes", "lost", "relay_cost"):
        say(f"{key:20} {fig[key]}")
    print(json.dumps(fig, sort_keys=True))
    return 0 if fig["lost"] == 0 and fig["resets"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
