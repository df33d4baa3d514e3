"""Kernel tier: the lab fixture factory and the end-of-session leak check.

- ``lab_factory`` (module scope) builds labs with unique ``lbtl...`` prefixes and always tears
  them down, then asserts that their namespaces, processes and state directory are gone.
- At the end of the session, every ``lbt*`` namespace that appeared during the session, any
  process of a lab this session built, and any new link in the root namespace fails the run
  (exit status 1, listed in the summary). While another pytest session runs on the same host
  (a developer's machine, never CI), namespaces and links it may own are reported as a warning
  only; the labs this session built are always checked strictly.
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


def _ancestors() -> set[int]:
    out: set[int] = set()
    pid = os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def other_pytest_sessions() -> list[int]:
    """Pids of pytest processes that are neither this session nor its ancestors."""
    mine = _ancestors()
    out: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"pytest") or a == b"pytest" for a in argv[:3]):
            out.append(int(entry.name))
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.geteuid() != 0:
        return
    problems: list[str] = []
    maybe: list[str] = []
    others = other_pytest_sessions()
    new_ns = sorted(set(leftover_namespaces(TEST_PREFIX)) - _NS_BEFORE)
    ours = [n for n in new_ns if n.split("-", 1)[0] in _PREFIXES]
    theirs = [n for n in new_ns if n not in ours]
    if ours:
        problems.append(f"lab namespaces left behind: {', '.join(ours)}")
    if theirs:
        (maybe if others else problems).append(f"namespaces left behind: {', '.join(theirs)}")
    procs = lab_processes(_PREFIXES)
    if procs:
        problems.append(f"lab processes left behind: {procs}")
    new_links = sorted(set(os.listdir("/sys/class/net")) - _LINKS_BEFORE)
    if new_links:
        (maybe if others else problems).append(
            f"links left in the root namespace: {', '.join(new_links)}")
    dirs = [p for p in _PREFIXES if (farm.LAB_ROOT / p).exists()]
    if dirs:
        problems.append(f"lab directories left behind: {', '.join(dirs)}")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in maybe:
            reporter.write_line(f"leak check (another pytest session runs: {others}, maybe "
                                f"theirs): {line}", yellow=True)
        for line in problems:
            reporter.write_line(f"LEAK CHECK FAILED: {line}", red=True)
    if problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
