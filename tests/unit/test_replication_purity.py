"""The protocol cores stay sans-IO: no asyncio, socket, time or netlink in them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lbsync.replication

CORE = ["auth", "endpoint", "events", "fec", "params", "rangeset", "receiver", "sender", "sim",
        "store", "wire"]
FORBIDDEN = {"asyncio", "socket", "time", "pyroute2", "uvloop", "selectors", "threading"}


def test_core_modules_import_nothing_io() -> None:
    root = Path(lbsync.replication.__file__).parent
    for name in CORE:
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not FORBIDDEN & set(mods), f"{name}.py imports {mods}"


def test_importing_the_cores_loads_no_event_loop_or_socket() -> None:
    code = ("import sys; import lbsync.replication.endpoint, lbsync.replication.sim; "
            "bad = {'asyncio', 'socket', 'uvloop', 'pyroute2'} & set(sys.modules); "
            "print(sorted(bad)); sys.exit(1 if bad else 0)")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
