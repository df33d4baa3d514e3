"""`lbsync demo` (the README's main command) runs, exits 0 and loses no connection."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.kernel.conftest import lab_prefix
from tests.netns import leftover_namespaces

pytestmark = pytest.mark.kernel


def test_demo_survives_node_death_and_cleans_up() -> None:
    name = lab_prefix()
    cp = subprocess.run([sys.executable, "-m", "lbsync", "demo", "--name", name, "--json"],
                        capture_output=True, text=True, timeout=240)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    summary = json.loads(next(line for line in cp.stdout.splitlines()
                              if line.startswith("{")))
    assert summary["flows"] == 450
    assert summary["lost"] == 0 and summary["resets"] == 0
    assert summary["nat_peer_changes"] == 0
    assert summary["buckets_moved"] > 0
    # the handback: the rejoined node gets its share back by planned handoff, nobody lost
    assert summary["handback_buckets"] > 0
    assert summary["victim_owns_after_handback"] == summary["handback_buckets"]
    rows = summary["per_node"]
    assert sum(r["start"] for r in rows.values()) == 64
    assert sum(r["after_handback"] for r in rows.values()) == 64
    assert all(r["standby"] == 450 for r in rows.values())
    assert summary["vrrp_master_of_victim"] in (1, 3)  # keepalived agreed the victim died
    for step in ("claimed", "keepalived steady again", "handback:", "tearing the lab down"):
        assert step in cp.stdout, step
    assert not leftover_namespaces(name)
