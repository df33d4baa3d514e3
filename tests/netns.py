"""Scaffolding for kernel tests: namespaces with a unique prefix, always torn down.

Tests create namespaces only through :class:`NetnsSet`, whose names start with the run's
unique prefix; :meth:`NetnsSet.cleanup` kills every process in them and deletes them (and the
links inside go with them). Nothing touches the root namespace except ``ip netns add/del``.
Addresses: 198.18.0.0/15 and 2001:db8::/32 only.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence


def unique_prefix(tag: str = "t") -> str:
    """A short unique namespace prefix (interface names are <= 15 chars: keep it short)."""
    return f"lbt{tag}{uuid.uuid4().hex[:5]}"


def run(cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 60,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {cp.returncode}: {cp.stderr.strip()}")
    return cp


class NetnsSet:
    """Namespaces created by one test, named ``<prefix>-<short>``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.names: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, short: str) -> str:
        name = f"{self.prefix}-{short}"
        run(["ip", "netns", "add", name])
        self.names.append(name)
        self.ns(name, "ip link set lo up")
        return name

    def ns(self, name: str, cmd: Sequence[str] | str, *, check: bool = True,
           timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return run(["ip", "netns", "exec", name, *argv], check=check, timeout=timeout,
                   input=input)

    def popen(self, name: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", name, *argv], **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p  # type: ignore[no-any-return]

    def veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        """A veth pair between namespaces ``a`` and ``b`` (created inside ``a``)."""
        self.ns(a, ["ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if,
                    "netns", b])
        self.ns(a, ["ip", "link", "set", a_if, "up"])
        self.ns(b, ["ip", "link", "set", b_if, "up"])

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        for name in reversed(self.names):
            kill_netns_pids(name)
            run(["ip", "netns", "del", name], check=False)
        self.names.clear()


def kill_netns_pids(name: str) -> None:
    cp = run(["ip", "netns", "pids", name], check=False)
    pids = [int(p) for p in cp.stdout.split() if p.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        time.sleep(0.05)


def leftover_namespaces(prefix: str = "lbt") -> list[str]:
    cp = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in cp.stdout.splitlines()
            if line.split() and line.split()[0].startswith(prefix)]
