"""Operator commands: ``lbsync notify`` (keepalived notify scripts -> the daemon) and
``lbsync keepalived-config`` (print a node's keepalived.conf)."""

from __future__ import annotations

import argparse
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
