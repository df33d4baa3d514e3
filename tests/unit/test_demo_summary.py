"""The demo's summary tables: every node a row, columns aligned, missing values shown as '-'."""

from __future__ import annotations

from lbsync.demo import render_summary


def test_summary_tables_rows_and_alignment() -> None:
    s = {"victim": 2, "flows": 450, "alive": 450, "lost": 0, "resets": 0, "errors": 0,
         "nat_peer_changes": 0, "buckets_moved": 21, "claim_after_kill_ms": 250.0,
         "longest_silence_p99_s": 0.9, "handback_buckets": 21, "handback_gap_max_ms": 6.8,
         "per_node": {"1": {"start": 22, "after_kill": 32, "claimed": 10, "after_handback": 22,
                            "standby": 450},
                      "2": {"start": 21, "after_kill": None, "after_handback": 21,
                            "standby": 450}}}
    text = render_summary(s)
    lines = text.splitlines()
    node_rows = [ln for ln in lines if ln.lstrip().startswith(("node 1", "node 2"))]
    assert len(node_rows) == 2
    assert "node 2 (killed)" in node_rows[1] and " - " in node_rows[1]
    header = next(ln for ln in lines if "after handback" in ln)
    assert all(len(r) == len(header) for r in node_rows)
    assert any("lost" in ln and ln.rstrip().endswith(" 0") for ln in lines)


def test_demo_without_keepalived_installed_is_one_line_exit_2() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": "/nonexistent"}
    cp = subprocess.run([sys.executable, "-m", "lbsync", "demo", "--name", "lbtnoka"],
                        capture_output=True, text=True, timeout=60, env=env)
    assert cp.returncode == 2
    assert cp.stderr.strip().count("\n") == 0
    assert "keepalived is not installed" in cp.stderr and "--no-keepalived" in cp.stderr
