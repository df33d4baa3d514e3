"""``lbsync run`` (the daemon) and ``lbsync status`` (ask a node's daemon)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from lbsync.config import DEFAULT_CLUSTER_FILE, load_cluster, load_node_id
from lbsync.control import ControlError, call

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEFAULT_CLUSTER_FILE), help="cluster file")
    p.add_argument("--node-id", type=int, default=None, help="this node's id (else node.toml)")


def register(sub: Any) -> None:
    run = sub.add_parser("run", help="run the daemon on this node")
    _common(run)
    run.add_argument("--asyncio", action="store_true", help="plain asyncio instead of uvloop")
    run.set_defaults(func=_run)
    st = sub.add_parser("status", help="show this node's daemon status")
    _common(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)


def _run(args: argparse.Namespace) -> int:
    from lbsync.daemon import (
        Lifecycle,
        StartupError,
        apply_scheduling,
        new_loop_factory,
        node_lock,
        preflight,
        serve,
    )
    from lbsync.node import Node, table_exists

    path = Path(args.config)
    cfg = load_cluster(path)
    node_id = load_node_id(cfg, args.node_id)
    try:
        preflight(cfg, table_exists=table_exists)
        with node_lock(cfg.runtime_path(node_id, "lock")):
            log.info("daemon.scheduling policy=%s", apply_scheduling(cfg))
            async def main() -> int:
                life = Lifecycle(path, cfg)
                return await serve(life, node_id, Node)

            with asyncio.Runner(loop_factory=new_loop_factory(not args.asyncio)) as runner:
                return runner.run(main())
    except StartupError as exc:
        sys.stderr.write(f"lbsync: cannot start: {exc}\n")
        return 2


def node_socket(args: argparse.Namespace) -> Path:
    cfg = load_cluster(args.config)
    node_id = load_node_id(cfg, args.node_id)
    return cfg.runtime_path(node_id, "sock")


def query(args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any] | None = None,
          timeout: float = 30.0) -> Any:
    try:
        return call(node_socket(args), cmd, cmd_args, timeout=timeout)
    except ControlError as exc:
        from lbsync.cli import UsageError

        raise UsageError(str(exc)) from None


def _status(args: argparse.Namespace) -> int:
    st = query(args, "status")
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(render_status(st))
    return 0


def render_status(st: dict[str, Any]) -> str:
    lines = [f"node {st.get('node_id')} of cluster {st.get('cluster')}  pid {st.get('pid')}  "
             f"up {st.get('uptime_s')} s"]
    for key in sorted(st):
        if key in ("node_id", "cluster", "pid", "uptime_s"):
            continue
        val = st[key]
        if isinstance(val, dict):
            inner = "  ".join(f"{k}={v}" for k, v in sorted(val.items())
                              if not isinstance(v, (dict, list)))
            lines.append(f"{key:14} {inner}")
        elif not isinstance(val, list):
            lines.append(f"{key:14} {val}")
    return "\n".join(lines)
