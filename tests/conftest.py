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
