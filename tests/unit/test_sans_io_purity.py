"""The membership core and hashing/ stay sans-IO (the replication cores have their own test):
no event loop, socket, clock, subprocess or netlink import anywhere in them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hashing
import lbsync.membership

FORBIDDEN = {"asyncio", "socket", "time", "pyroute2", "uvloop", "selectors", "threading",
             "subprocess", "datetime"}
PACKAGES = [Path(lbsync.membership.__file__).parent, Path(hashing.__file__).parent]


@pytest.mark.parametrize("path", [p for d in PACKAGES for p in sorted(d.glob("*.py"))],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_module_imports_nothing_io(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods = {(node.module or "").split(".")[0]}
        else:
            continue
        assert not FORBIDDEN & mods, f"{path.name} imports {sorted(FORBIDDEN & mods)}"


def test_importing_the_cores_loads_no_event_loop_or_socket() -> None:
    code = ("import sys; import lbsync.membership, hashing.ownermap, hashing.jhash; "
            "bad = {'asyncio', 'socket', 'uvloop', 'pyroute2', 'subprocess'} & set(sys.modules);"
            " print(sorted(bad)); sys.exit(1 if bad else 0)")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
