"""The daemon's CPU-yield decision (issue 7): a busy loop yields, and sleeps a little only
after being busy for a while (bulk work) on an overcommitted host; /proc/loadavg's running
count against the CPU count decides that. Also the owner sweep's CPU budget (its interval)."""

from __future__ import annotations

from pathlib import Path

from lbsync.node import (
    SWEEP_CPU_SHARE,
    SWEEP_INTERVAL,
    YIELD_BUSY_CHECK,
    YIELD_OVERCOMMIT_AFTER,
    YIELD_OVERCOMMIT_SLEEP,
    _host_overcommitted,
    sweep_interval,
    yield_plan,
)


def test_idle_loop_neither_yields_nor_asks_about_the_host() -> None:
    asked: list[bool] = []

    def overcommitted() -> bool:
        asked.append(True)
        return True

    assert yield_plan(YIELD_BUSY_CHECK / 2, 0.0, overcommitted) == (False, 0.0)
    assert yield_plan(YIELD_BUSY_CHECK / 2, 10.0, overcommitted) == (False, 0.0)
    assert asked == []  # /proc is read only when the loop was busy


def test_bulk_work_yields_and_sleeps_only_when_overcommitted() -> None:
    busy = YIELD_BUSY_CHECK * 0.9
    bulk = YIELD_OVERCOMMIT_AFTER
    assert yield_plan(busy, bulk, lambda: False) == (True, 0.0)
    assert yield_plan(busy, bulk, lambda: True) == (True, YIELD_OVERCOMMIT_SLEEP)


def test_short_busy_spell_yields_without_sleeping_or_asking_about_the_host() -> None:
    """Replication bursts (a few busy checks) must not pay a 3 ms sleep (issue 6: p99 lag)."""
    asked: list[bool] = []

    def overcommitted() -> bool:
        asked.append(True)
        return True

    busy = YIELD_BUSY_CHECK * 0.9
    for busy_for in (0.0, YIELD_BUSY_CHECK, YIELD_OVERCOMMIT_AFTER * 0.9):
        assert yield_plan(busy, busy_for, overcommitted) == (True, 0.0)
    assert asked == []


def test_overcommit_reads_running_tasks_against_cpus(tmp_path: Path) -> None:
    f = tmp_path / "loadavg"
    f.write_text("2.10 1.50 1.20 3/412 98765\n")
    assert _host_overcommitted(str(f), ncpu=2)
    assert not _host_overcommitted(str(f), ncpu=3)
    f.write_text("0.10 0.10 0.10 1/412 98765\n")
    assert not _host_overcommitted(str(f), ncpu=2)


def test_unreadable_or_garbled_loadavg_is_not_overcommitted(tmp_path: Path) -> None:
    assert not _host_overcommitted(str(tmp_path / "missing"), ncpu=1)
    f = tmp_path / "loadavg"
    for text in ("", "1 2 3", "1 2 3 x/y 4", "\x00\x01"):
        f.write_text(text)
        assert not _host_overcommitted(str(f), ncpu=1), text


def test_sweep_interval_keeps_the_dump_within_its_cpu_share() -> None:
    assert sweep_interval(0.0) == SWEEP_INTERVAL
    assert sweep_interval(SWEEP_INTERVAL * SWEEP_CPU_SHARE) == SWEEP_INTERVAL
    for busy in (0.2, 1.0, 3.0):  # ~70k, 330k, 1M entries at ~3 us each
        gap = sweep_interval(busy)
        assert gap > SWEEP_INTERVAL and busy / gap <= SWEEP_CPU_SHARE + 1e-12
