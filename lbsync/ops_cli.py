"""Operator commands: ``lbsync notify`` (keepalived notify scripts -> the daemon),
``lbsync keepalived-config`` (print a node's keepalived.conf), and the farm commands
``lbsync map``, ``lbsync resync``, ``lbsync drill``, ``rebalance``, ``drain``, ``undrain``,
``weight`` (:func:`register_farm_commands`; daemon side in :mod:`lbsync.ops`, the
orchestration in :mod:`lbsync.drill`). Every command talks only to the local daemon's control
socket; requests for other nodes are relayed by it (:mod:`lbsync.peerctl`), unless
``--direct`` is given."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from lbsync.config import DEFAULT_CLUSTER_FILE, RUN_DIR, load_cluster, load_node_id
from lbsync.control import ControlError, call
from lbsync.keepalived import (
    DEFAULT_ADVERT_INT,
    NotifyError,
    default_fifo_path,
    instance_owner,
    normalise_state,
    render_keepalived_conf,
)

NOTIFY_TIMEOUT = 5.0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEFAULT_CLUSTER_FILE), metavar="FILE",
                   help="cluster file (default %(default)s)")
    p.add_argument("--node-id", type=int, default=None, metavar="N",
                   help="this node's id (default: from /etc/lbsync/node.toml)")


def _direct(p: argparse.ArgumentParser) -> None:
    p.add_argument("--direct", action="store_true",
                   help="open every node's control socket instead of relaying through this "
                        "node's daemon (only where all sockets are reachable, as in the lab)")


def register(sub: Any) -> None:
    n = sub.add_parser(
        "notify", help="pass a keepalived state change to this node's daemon",
        description="For keepalived notify scripts: `lbsync notify lbsync-2 MASTER`, or as "
                    "keepalived's generic `notify` script (INSTANCE NAME STATE PRIORITY).")
    n.add_argument("words", nargs="+", metavar="ARG",
                   help="INSTANCE STATE, or keepalived's INSTANCE|GROUP NAME STATE [PRIORITY]")
    _common(n)
    n.set_defaults(func=_notify)
    k = sub.add_parser("keepalived-config", help="print this node's keepalived.conf")
    _common(k)
    k.add_argument("--advert-int", type=float, default=DEFAULT_ADVERT_INT, metavar="S",
                   help="VRRP advert interval in seconds (default %(default)s; VRRPv3)")
    k.add_argument("--fifo", default=None, metavar="PATH",
                   help="notify FIFO (default /run/lbsync/<cluster>-<node>.vrrp.fifo)")
    k.add_argument("--run-dir", default=str(RUN_DIR), metavar="DIR",
                   help="directory of keepalived's pid files (default %(default)s)")
    k.add_argument("--notify-command", default=None, metavar="CMD",
                   help="also run CMD as every instance's notify script, e.g. "
                        "'/usr/bin/lbsync notify --node-id 1' (the FIFO is preferred)")
    k.set_defaults(func=_keepalived_config)
    register_farm_commands(sub)


def _usage(message: str) -> Exception:
    from lbsync.cli import UsageError  # lbsync.cli imports this module: import late

    return UsageError(message)


def parse_notify_words(words: list[str]) -> tuple[str, str, int] | None:
    """``(instance, STATE, priority)`` from the notify arguments, or None for a GROUP
    notification (ignored). Raises NotifyError with a one-line message."""
    kind = words[0].upper()
    if kind in ("INSTANCE", "GROUP") and len(words) in (3, 4):
        if kind == "GROUP":
            return None
        name, state = words[1], words[2]
        prio_text = words[3] if len(words) == 4 else "0"
    elif len(words) == 2:
        (name, state), prio_text = words, "0"
    else:
        raise NotifyError("expected INSTANCE STATE, or INSTANCE|GROUP NAME STATE [PRIORITY]")
    if instance_owner(name) is None:
        raise NotifyError(f"{name!r} is not an lbsync instance (lbsync-<node id>)")
    canonical = normalise_state(state)
    try:
        priority = int(prio_text)
    except ValueError:
        raise NotifyError(f"priority must be an integer, not {prio_text!r}") from None
    if not 0 <= priority <= 255:
        raise NotifyError(f"priority {priority} out of 0..255")
    return name, canonical, priority


def _notify(args: argparse.Namespace) -> int:
    try:
        parsed = parse_notify_words(args.words)
    except NotifyError as exc:
        raise _usage(f"notify: {exc}") from None
    if parsed is None:
        return 0
    name, state, priority = parsed
    cfg = load_cluster(args.config)
    node_id = load_node_id(cfg, args.node_id)
    try:
        call(cfg.runtime_path(node_id, "sock"), "notify",
             {"instance": name, "state": state, "priority": priority},
             timeout=NOTIFY_TIMEOUT)
    except ControlError as exc:
        sys.stderr.write(f"lbsync: error: {exc}\n")
        return 1
    return 0


def _keepalived_config(args: argparse.Namespace) -> int:
    cfg = load_cluster(args.config)
    node_id = load_node_id(cfg, args.node_id)
    fifo = args.fifo or default_fifo_path(cfg, node_id)
    try:
        text = render_keepalived_conf(cfg, node_id, advert_int=args.advert_int,
                                      fifo_path=fifo, run_dir=args.run_dir,
                                      notify_command=args.notify_command)
    except ValueError as exc:
        raise _usage(f"keepalived-config: {exc}") from None
    sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------ farm commands


def register_farm_commands(sub: Any) -> None:
    m = sub.add_parser("map", help="target and actual owner of every bucket",
                       description="Asks this node's daemon for the agreed target map and the "
                                   "owners every node reports (heartbeats).")
    _common(m)
    m.add_argument("--explain", type=int, default=None, metavar="BUCKET",
                   help="one bucket: owners, fallback chain and why")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=_map)
    r = sub.add_parser("resync", help="force a resync of the standby store from the owners")
    _common(r)
    r.add_argument("--bucket", type=int, default=None, metavar="B",
                   help="only this bucket (from its actual owner); default: everything")
    r.add_argument("--wait", type=float, default=30.0, metavar="S",
                   help="wait up to S seconds for the answers (0: do not wait)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=_resync)
    d = sub.add_parser("drill", help="rehearse a failure on the live farm")
    dsub = d.add_subparsers(dest="drill", metavar="KIND")
    dsub.required = True
    for kind, what, helptext, duration, duration_help in (
            ("fail", "the node to fail", "NODE stops forwarding without handoff; measure the "
             "takeover; restore it", 3.0, "how long the node stays failed (default "
             "%(default)s s)"),
            ("partition", "the node to cut off", "NODE loses its replication link for "
             "--duration; measure the takeover; the link heals after", 6.0, "how long the "
             "link stays cut (default %(default)s s; must exceed the failure detection time)")):
        d = dsub.add_parser(kind, help=helptext)
        d.add_argument("node", type=int, metavar="NODE", help=what)
        _common(d)
        _direct(d)
        d.add_argument("--duration", type=float, default=duration, metavar="S",
                       help=duration_help)
        d.add_argument("--timeout", type=float, default=20.0, metavar="S",
                       help="give up when the farm has not reacted within S seconds")
        d.add_argument("--json", action="store_true", help="print the report as JSON")
        d.set_defaults(func=_drill_fail, kind=kind)
    dd = dsub.add_parser("drain", help="NODE drains by planned handoff, measured; undrained "
                                       "after")
    dd.add_argument("node", type=int, metavar="NODE", help="the node to drain")
    _common(dd)
    _rebalance_args(dd)
    dd.set_defaults(func=_drill_drain)
    rb = sub.add_parser("rebalance", help="show or execute the plan to the target map",
                        description="Computes the target map from the ready view (weights, "
                                    "drain flags) and the actual owners, agrees on it, and "
                                    "moves buckets by planned handoff in batches.")
    _common(rb)
    _rebalance_args(rb)
    rb.add_argument("--dry-run", action="store_true", help="show the plan, move nothing")
    rb.set_defaults(func=_rebalance)
    for name, helptext in (("drain", "maintenance: move every bucket off NODE (persisted)"),
                           ("undrain", "end maintenance: NODE may own buckets again")):
        dp = sub.add_parser(name, help=helptext)
        dp.add_argument("node", type=int, metavar="NODE")
        _common(dp)
        _rebalance_args(dp)
        dp.add_argument("--no-rebalance", action="store_true",
                        help="only set the flag; move buckets later with `lbsync rebalance`")
        dp.set_defaults(func=_drain, drained=name == "drain")
    w = sub.add_parser("weight", help="set NODE's weight (share of buckets), persisted")
    w.add_argument("node", type=int, metavar="NODE")
    w.add_argument("weight", type=int, metavar="W", help="1..1000000")
    _common(w)
    _rebalance_args(w)
    w.add_argument("--no-rebalance", action="store_true",
                   help="only set the weight; move buckets later with `lbsync rebalance`")
    w.set_defaults(func=_weight)


def _rebalance_args(p: argparse.ArgumentParser) -> None:
    _direct(p)
    p.add_argument("--max-concurrent", type=int, default=8, metavar="K",
                   help="buckets moved per batch (default %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _query(args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any] | None = None) -> Any:
    from lbsync.daemon_cli import query

    return query(args, cmd, cmd_args)


def _check_bucket(args: argparse.Namespace, what: str, bucket: int) -> None:
    """A bucket an operator named, against the cluster file's bucket count (exit 2)."""
    buckets = load_cluster(args.config).cluster.buckets
    if not 0 <= bucket < buckets:
        raise _usage(f"{what} {bucket}: bucket out of range 0..{buckets - 1}")


def _map(args: argparse.Namespace) -> int:
    import json

    if args.explain is not None:
        _check_bucket(args, "map: --explain", args.explain)
        res = _query(args, "map", {"explain": args.explain})
        if args.json:
            print(json.dumps(res, indent=2, sort_keys=True))
            return 0
        print(f"bucket {res['bucket']}: target node {res['target']}, actual "
              f"{', '.join(map(str, res['actual'])) or 'none'}, chain "
              f"{' > '.join(map(str, res['chain'])) or '-'}, {res['store_entries']} entries")
        for line in res["why"]:
            print(f"  {line}")
        return 0
    res = _query(args, "map")
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    print(render_map(res))
    return 0


def render_map(res: dict[str, Any]) -> str:
    lines = [f"map epoch {res['map_epoch']} (proposer {res['map_proposer']}), "
             f"{res['buckets']} buckets, seen from node {res['node_id']}"]
    lines.append("node  target  actual  state")
    for n, c in res["counts"].items():
        mem = res["members"].get(n, {})
        state = mem.get("state", "?") + (" fenced" if mem.get("fenced") else "") + \
            ("" if mem.get("ready") else " not-ready") + \
            (" drained" if mem.get("drained") else "") + f" weight {mem.get('weight')}"
        lines.append(f"{n:>4}  {c['target']:>6}  {c['actual']:>6}  {state}")
    lines.append(f"misplaced {res['misplaced']}  unowned {res['unowned']}  "
                 f"multiple owners {res['multiple']}")
    lines.append("bucket  target  actual  entries")
    for row in res["rows"]:
        actual = ",".join(map(str, row["actual"])) or "-"
        flag = "" if row["actual"] == [row["target"]] else "  *"
        lines.append(f"{row['bucket']:>6}  {row['target']:>6}  {actual:>6}  "
                     f"{row['store_entries']:>7}{flag}")
    return "\n".join(lines)


def _resync(args: argparse.Namespace) -> int:
    import json
    import time

    if args.bucket is not None and args.bucket < 0:
        raise _usage("resync: --bucket must be >= 0")
    if args.wait < 0:
        raise _usage("resync: --wait must be >= 0")
    if args.bucket is not None:
        _check_bucket(args, "resync: --bucket", args.bucket)
    cmd_args = {} if args.bucket is None else {"bucket": args.bucket}
    res = _query(args, "resync", cmd_args)
    done = res
    deadline = time.monotonic() + args.wait
    while args.wait and done["pending"] and time.monotonic() < deadline:
        time.sleep(0.1)
        done = _query(args, "resync-status")
    out = {"asked": res["asked"], "pending": done["pending"],
           "resyncs_completed": done["completed"] - res["completed"],
           "buckets_resynced": done["buckets_resynced"] - res["buckets_resynced"],
           "store_entries_before": res["store_entries"], "store_entries": done["store_entries"]}
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        who = ", ".join(f"node {k}" + (f" (bucket {v[0]})" if v else "")
                        for k, v in out["asked"].items()) or "nobody"
        print(f"asked {who}; {out['resyncs_completed']} resyncs completed, "
              f"{out['buckets_resynced']} buckets resynced, store "
              f"{out['store_entries_before']} -> {out['store_entries']} entries"
              + (f"; {out['pending']} still pending" if out["pending"] else ""))
    return 0 if not out["pending"] or not args.wait else 1


def _drill_fail(args: argparse.Namespace) -> int:
    import json
    import time

    from lbsync.drill import DrillError, render_report, run_fail_drill

    cfg = load_cluster(args.config)
    if args.node not in cfg.node_ids:
        raise _usage(f"drill {args.kind}: node {args.node} is not in the cluster "
                     f"({', '.join(map(str, cfg.node_ids))})")
    if not 0 < args.duration <= 60:
        raise _usage(f"drill {args.kind}: --duration must be in (0, 60] seconds")
    if args.timeout <= 0:
        raise _usage(f"drill {args.kind}: --timeout must be > 0")
    farm = make_farm(args, cfg)

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr if args.json else
              sys.stdout, flush=True)

    try:
        report = run_fail_drill(farm, args.node, duration=args.duration, timeout=args.timeout,
                                progress=progress, kind=args.kind)
    except (DrillError, ControlError) as exc:
        sys.stderr.write(f"lbsync: drill failed: {exc}\n")
        return 1
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(render_report(report))
    return 0 if report["restored"] else 1


def make_farm(args: argparse.Namespace, cfg: Any) -> Any:
    """The farm the command orchestrates: relayed through the local daemon (default), or
    every node's control socket opened directly (``--direct``)."""
    from lbsync.drill import Farm

    if getattr(args, "direct", False):
        return Farm.direct({n: cfg.runtime_path(n, "sock") for n in cfg.node_ids})
    local = load_node_id(cfg, args.node_id)
    return Farm.relayed(local, cfg.runtime_path(local, "sock"), cfg.node_ids)


def _farm(args: argparse.Namespace) -> tuple[Any, int]:
    cfg = load_cluster(args.config)
    local = load_node_id(cfg, args.node_id)
    node = getattr(args, "node", None)
    if node is not None and node not in cfg.node_ids:
        what = " ".join(filter(None, (getattr(args, "command", None),
                                      getattr(args, "drill", None))))
        raise _usage(f"{what}: node {node} is not in the cluster "
                     f"({', '.join(map(str, cfg.node_ids))})")
    if args.max_concurrent < 1:
        raise _usage("--max-concurrent must be >= 1")
    return make_farm(args, cfg), local


def _print_rebalance(args: argparse.Namespace, report: dict[str, Any]) -> None:
    import json

    if args.json:
        print(json.dumps(report, sort_keys=True))
        return
    if report["dry_run"]:
        print(f"plan: {report['moves']} moves in {report['batches']} batches "
              f"(map epoch {report['map_epoch']} -> {report['new_epoch']})")
        for i, batch in enumerate(report["plan"], 1):
            print(f"  batch {i}: " + ", ".join(f"{b}:{s}->{d}" for b, s, d in batch))
        return
    print(f"moved {report['moved']} buckets in {report['batches']} batches, "
          f"{report['total_s']} s; forwarding gap per bucket (ms) {report['gap_ms']}; "
          f"incomplete seals {report['incomplete']}")


def _run_rebalance(args: argparse.Namespace, farm: Any, local: int, dry_run: bool) -> int:
    import time

    from lbsync.drill import DrillError, run_rebalance

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr if args.json else
              sys.stdout, flush=True)

    try:
        report = run_rebalance(farm, local, max_concurrent=args.max_concurrent,
                               dry_run=dry_run, progress=progress)
    except (DrillError, ControlError) as exc:
        sys.stderr.write(f"lbsync: rebalance failed: {exc}\n")
        return 1
    _print_rebalance(args, report)
    return 0


def _rebalance(args: argparse.Namespace) -> int:
    farm, local = _farm(args)
    return _run_rebalance(args, farm, local, args.dry_run)


def _set_local_then_rebalance(args: argparse.Namespace, change: dict[str, Any]) -> int:
    import time

    farm, local = _farm(args)
    try:
        res = farm.request(args.node, "set-local", change)
    except ControlError as exc:
        sys.stderr.write(f"lbsync: node {args.node}: {exc}\n")
        return 1
    print(f"node {args.node}: drained={res['drained']} weight={res['weight']} "
          f"(persisted in {res['persisted']})", file=sys.stderr if args.json else sys.stdout)
    if args.no_rebalance:
        return 0
    # the local daemon learns the change from the node's next heartbeats
    deadline = time.monotonic() + 5.0
    want = [args.node, res["weight"], res["drained"]]
    while time.monotonic() < deadline:
        try:
            view = farm.request(local, "rebalance-plan", {"max_concurrent": 1})["view"]
        except ControlError:
            view = []
        if want in view or (res["drained"] and args.node not in [v[0] for v in view]):
            break
        time.sleep(0.05)
    return _run_rebalance(args, farm, local, False)


def _drain(args: argparse.Namespace) -> int:
    return _set_local_then_rebalance(args, {"drained": args.drained})


def _weight(args: argparse.Namespace) -> int:
    if not 1 <= args.weight <= 1_000_000:
        raise _usage("weight: W must be 1..1000000")
    return _set_local_then_rebalance(args, {"weight": args.weight})


def _drill_drain(args: argparse.Namespace) -> int:
    """Drain NODE by planned handoff with reset counters on every node, then undrain it."""
    import json
    import time

    from lbsync.drill import DrillError, run_rebalance

    farm, local = _farm(args)
    out = sys.stderr if args.json else sys.stdout

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=out, flush=True)

    nodes = list(farm.nodes)
    report: dict[str, Any] = {"drill": "drain", "node": args.node}
    try:
        for n in nodes:
            farm.request(n, "drill-counters", {"action": "install"})
        rst0 = {n: farm.request(n, "drill-counters", {"action": "read"}) for n in nodes}
        farm.request(args.node, "set-local", {"drained": True})
        progress(f"node {args.node} drained; moving its buckets away by handoff")
        _wait_view(farm, local, args.node, drained=True)
        report["drain"] = run_rebalance(farm, local, max_concurrent=args.max_concurrent,
                                        progress=progress)
        rst1 = {n: farm.request(n, "drill-counters", {"action": "read"}) for n in nodes}
        farm.request(args.node, "set-local", {"drained": False})
        progress(f"restoring: node {args.node} undrained; its share moves back by handoff")
        _wait_view(farm, local, args.node, drained=False)
        report["undrain"] = run_rebalance(farm, local, max_concurrent=args.max_concurrent,
                                          progress=progress)
        rst2 = {n: farm.request(n, "drill-counters", {"action": "read"}) for n in nodes}
    except (DrillError, ControlError) as exc:
        sys.stderr.write(f"lbsync: drill failed: {exc}\n")
        return 1
    finally:
        for n in nodes:
            with contextlib.suppress(ControlError):
                farm.request(n, "drill-counters", {"action": "remove"})

    def resets(a: dict[int, Any], b: dict[int, Any]) -> int:
        return sum(b[n][k] - a[n].get(k, 0) for n in b for k in b[n])

    report["resets_drain"] = resets(rst0, rst1)
    report["resets_undrain"] = resets(rst1, rst2)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        for phase in ("drain", "undrain"):
            r = report[phase]
            print(f"{phase}: {r['moved']} buckets moved in {r['batches']} batches, "
                  f"{r['total_s']} s; gap per bucket (ms) {r['gap_ms']}; resets "
                  f"{report['resets_' + phase]}")
    return 0


def _wait_view(farm: Any, local: int, node: int, *, drained: bool) -> None:
    import time

    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            view = farm.request(local, "rebalance-plan", {"max_concurrent": 1})["view"]
        except ControlError:
            view = []
        if any(v[0] == node and v[2] == drained for v in view):
            return
        time.sleep(0.05)
