"""Kernel tier: the lab fixture factory and the end-of-session leak check.

- ``lab_factory`` (module scope) builds labs with unique ``lbtl...`` prefixes and always tears
  them down, then asserts that their namespaces, processes and state directory are gone.
- At the end of the session, every ``lbt*`` namespace that appeared during the session, any
  process of a lab this session built, and any new link in the root namespace fails the run
  (exit status 1, listed in the summary). Run concurrently with another test session on the
  same host, the other session's namespaces would show up here too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lbsync.lab import farm
from lbsync.lab.farm import Lab
from tests.netns import leftover_namespaces, unique_prefix

TEST_PREFIX = "lbt"
_NS_BEFORE = set(leftover_namespaces(TEST_PREFIX))
_LINKS_BEFORE = set(os.listdir("/sys/class/net"))
_PREFIXES: list[str] = []   # every lab prefix this session handed out


def lab_prefix() -> str:
    """A unique lab prefix, remembered for the end-of-session check."""
    prefix = unique_prefix("l")
    _PREFIXES.append(prefix)
    return prefix


def lab_processes(prefixes: list[str]) -> list[tuple[int, str]]:
    """Processes whose command line names one of the labs (traffic server, clients...)."""
    out: list[tuple[int, str]] = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        words = {a.decode(errors="replace") for a in argv}
        if any(p in words or f"{farm.LAB_ROOT}/{p}" in " ".join(words) for p in prefixes):
            out.append((int(entry.name), " ".join(sorted(words))[:120]))
    return out


def assert_lab_gone(prefix: str) -> None:
    left_ns = farm.lab_namespaces(prefix)
    left_procs = lab_processes([prefix])
    left_dir = (farm.LAB_ROOT / prefix).exists()
    assert not (left_ns or left_procs or left_dir), \
        f"lab {prefix} left namespaces {left_ns}, processes {left_procs}, directory {left_dir}"


@pytest.fixture(scope="module")
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """``make(nodes=3, ipv6=False, buckets=64, nat=None) -> Lab``: torn down after the module."""
    labs: list[Lab] = []

    def make(nodes: int = 3, **kw: Any) -> Lab:
        lab = Lab.create(lab_prefix(), nodes, **kw)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.destroy()
        for lab in labs:
            assert_lab_gone(lab.prefix)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.geteuid() != 0:
        return
    problems: list[str] = []
    new_ns = sorted(set(leftover_namespaces(TEST_PREFIX)) - _NS_BEFORE)
    if new_ns:
        problems.append(f"namespaces left behind: {', '.join(new_ns)}")
    procs = lab_processes(_PREFIXES)
    if procs:
        problems.append(f"lab processes left behind: {procs}")
    new_links = sorted(set(os.listdir("/sys/class/net")) - _LINKS_BEFORE)
    if new_links:
        problems.append(f"links left in the root namespace: {', '.join(new_links)}")
    dirs = [p for p in _PREFIXES if (farm.LAB_ROOT / p).exists()]
    if dirs:
        problems.append(f"lab directories left behind: {', '.join(dirs)}")
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for line in problems:
            if reporter is not None:
                reporter.write_line(f"LEAK CHECK FAILED: {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
