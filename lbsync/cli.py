"""The ``lbsync`` command line: one argparse tree, subcommands registered by their modules.

Every subcommand module exposes ``register(subparsers)``; it adds its parser(s) and sets
``func`` (taking the parsed namespace, returning an exit code). Errors the user can fix
(bad arguments, bad config) print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from lbsync.config import ConfigError

# Modules that contribute subcommands; a module that does not exist yet is skipped.
SUBCOMMAND_MODULES = (
    "lbsync.config_cli",
    "lbsync.datapath",
    "lbsync.lab.cli",
    "lbsync.daemon_cli",
    "lbsync.ops_cli",
    "lbsync.demo",
)


class UsageError(Exception):
    """A user error detected after parsing: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One clear line, exit 2 (argparse's own code), no usage dump.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lbsync", description="Active-active conntrack replication.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        rc: int = args.func(args)
    except (ConfigError, UsageError) as exc:
        sys.stderr.write(f"lbsync: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
