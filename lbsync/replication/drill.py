"""Replication drill: one node's endpoint on a real socket with synthetic records.

``python -m lbsync.replication.drill --node-id 1 --nodes 1,2,3 --iface repl0`` runs the
endpoint under uvloop, owns the buckets ``b`` with ``nodes[b % len(nodes)] == node-id``, writes
``--records`` synthetic flow updates and deletes to them during ``--traffic`` seconds, keeps
replicating for ``--quiet`` seconds, then prints one JSON line: the per-bucket (count, digest)
of its store and its statistics. Used by the kernel test (three namespaces, real multicast,
nftables loss) and handy in the lab.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from dataclasses import asdict

import uvloop

from lbsync.replication.auth import KeyRing
from lbsync.replication.endpoint import ReplicationEndpoint
from lbsync.replication.events import Event
from lbsync.replication.params import ProtocolParams
from lbsync.replication.transport import ReplicationTransport, open_multicast, open_unicast

DRILL_KEYRING = KeyRing({7: bytes(range(100, 132))}, 7)


async def _run(args: argparse.Namespace) -> dict[str, object]:
    nodes = [int(n) for n in args.nodes.split(",")]
    params = ProtocolParams(buckets=args.buckets, idle=args.idle, idle_max=args.idle_max,
                            silent_after=3 * args.idle_max)
    loop = asyncio.get_running_loop()
    ep = ReplicationEndpoint(node_id=args.node_id, incarnation=args.incarnation,
                             keyring=DRILL_KEYRING, params=params, now=loop.time(),
                             rng=random.Random(args.node_id << 32 | args.incarnation),
                             nodes=nodes)
    owned = [b for b in range(args.buckets) if nodes[b % len(nodes)] == args.node_id]
    for b in owned:
        ep.claim(b, 1, loop.time())
    events: dict[str, int] = {}

    def on_event(e: Event) -> None:
        events[type(e).__name__] = events.get(type(e).__name__, 0) + 1

    tr: ReplicationTransport
    if args.mode == "multicast":
        tr = await open_multicast(ep, group=args.group, port=args.port, ifname=args.iface,
                                  buffer=args.buffer, on_event=on_event)
    else:
        tr = await open_unicast(ep, address=args.address, port=args.port,
                                peers=args.peers.split(","), buffer=args.buffer,
                                on_event=on_event)
    await asyncio.sleep(args.start_delay)
    rng = random.Random(1000 + args.node_id)
    live: list[tuple[int, bytes]] = []
    slices = max(1, int(args.traffic / 0.01))
    per_slice = max(1, args.records // slices)
    written = 0
    while written < args.records:
        for _ in range(min(per_slice, args.records - written)):
            written += 1
            if live and rng.random() < 0.15:
                bucket, key = live.pop(rng.randrange(len(live)))
                ep.delete_flow(bucket, key, loop.time())
            else:
                bucket = rng.choice(owned)
                key = b"n%d-%d" % (args.node_id, written)
                ep.update_flow(bucket, key, rng.randbytes(rng.randint(60, 140)), loop.time())
                live.append((bucket, key))
        tr.pump()
        await asyncio.sleep(0.01)
    await asyncio.sleep(args.quiet)
    stats = ep.statistics()
    tr.close()
    return {
        "node": args.node_id,
        "owned": owned,
        "digests": {str(b): list(ep.store.digest(b)) for b in range(args.buckets)},
        "entries": len(ep.store),
        "rejected": dict(stats.rejected),
        "sender": asdict(stats.sender),
        "receiver": asdict(stats.receiver),
        "transport": asdict(tr.statistics()),
        "events": events,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lbsync.replication.drill")
    ap.add_argument("--node-id", type=int, required=True)
    ap.add_argument("--nodes", required=True, help="comma-separated node ids")
    ap.add_argument("--incarnation", type=int, default=1)
    ap.add_argument("--mode", choices=("multicast", "unicast"), default="multicast")
    ap.add_argument("--iface", default="repl0")
    ap.add_argument("--group", default="239.18.0.1")
    ap.add_argument("--address", default="")
    ap.add_argument("--peers", default="")
    ap.add_argument("--port", type=int, default=7946)
    ap.add_argument("--buckets", type=int, default=48)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--traffic", type=float, default=1.0)
    ap.add_argument("--quiet", type=float, default=3.0)
    ap.add_argument("--start-delay", type=float, default=0.3)
    ap.add_argument("--idle", type=float, default=0.02)
    ap.add_argument("--idle-max", type=float, default=0.25)
    ap.add_argument("--buffer", type=int, default=4 * 1024 * 1024)
    args = ap.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(_run(args))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
