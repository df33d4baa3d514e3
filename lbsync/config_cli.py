"""``lbsync config check FILE`` and ``lbsync config describe``."""

from __future__ import annotations

import argparse
from typing import Any

from lbsync.config import ClusterConfig, describe, load_cluster


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="validate or describe the cluster configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", parser_class=type(p))
    csub.required = True
    check = csub.add_parser("check", help="validate a cluster file")
    check.add_argument("file", help="cluster TOML file")
    check.set_defaults(func=_check)
    desc = csub.add_parser("describe", help="list every option with its default and help")
    desc.set_defaults(func=_describe)


def _check(args: argparse.Namespace) -> int:
    cfg = load_cluster(args.file)
    print(f"{args.file}: ok: cluster {cfg.cluster.name!r}, {len(cfg.nodes)} nodes, "
          f"{cfg.cluster.buckets} buckets, {len(cfg.nat)} NAT rules")
    return 0


def _describe(args: argparse.Namespace) -> int:
    for key, default, text in describe(ClusterConfig):
        print(f"{key:36} {default:24} {text}")
    return 0
