"""Shared fixtures: the kernel tier (root, own namespaces) and Hypothesis profiles."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.netns import NetnsSet, unique_prefix

settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile(
    "soak", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("-m") or ""
    skip_root = pytest.mark.skip(reason="kernel tests need root (CI runs them as root)")
    skip_soak = pytest.mark.skip(reason="soak: run with -m soak")
    for item in items:
        if "kernel" in item.keywords and not IS_ROOT:
            item.add_marker(skip_root)
        if "soak" in item.keywords and "soak" not in markexpr:
            item.add_marker(skip_soak)


@pytest.fixture
def netns() -> Iterator[NetnsSet]:
    """Namespaces for one test, with a unique prefix, torn down even when the test fails."""
    s = NetnsSet(unique_prefix())
    try:
        yield s
    finally:
        s.cleanup()


# Budgets per tier (seconds, CI on 2 cores); printed at the end of every run with --durations.
TIER_BUDGETS = {"unit": 180.0, "sim": 120.0, "kernel": 720.0}
_tier_seconds: dict[str, float] = {}


def _tier(item: pytest.Item) -> str:
    if "kernel" in item.keywords:
        return "kernel"
    if "sim" in item.keywords:
        return "sim"
    return "unit"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    tier = _tier(item)
    _tier_seconds[tier] = _tier_seconds.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    tr = terminalreporter
    tr.section("tier budgets")
    for tier, budget in TIER_BUDGETS.items():
        spent = _tier_seconds.get(tier, 0.0)
        flag = "OVER BUDGET" if spent > budget else "ok"
        tr.write_line(f"{tier:7} {spent:8.1f} s of {budget:6.0f} s  {flag}")
