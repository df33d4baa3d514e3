"""lbsyncd in the lab: one daemon per node namespace, with a generated key ring.

Files live in the lab's directory (``/run/lbsync/lab/<prefix>/``): ``cluster.key`` (mode 0600),
``state/`` (incarnation counters, planned-stop notes), ``n<i>.log`` (each daemon's log). The
daemons' control sockets and locks are ``/run/lbsync/<prefix>-<i>.{sock,lock}`` (the lab's
cluster is named after its prefix, so labs never collide); :func:`remove_runtime_files` deletes
those of a lab, as ``lab down`` does.

Failure tools for tests and drills: :func:`kill_daemon` (SIGKILL, optionally taking the node's
links down in the same step), :func:`links` (down/up), :func:`stop_daemon` (SIGTERM, planned).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lbsync.config import RUN_DIR
from lbsync.control import ControlError, call
from lbsync.lab.farm import Lab, LabError, ns_argv

KEY_FILE = "cluster.key"
STATE_SUBDIR = "state"


def write_keyring(lab: Lab) -> Path:
    """A fresh random key ring at the path the lab's cluster file names."""
    path = Path(lab.cluster_config.cluster.key_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# lab {lab.prefix}: generated key ring\n1 {secrets.token_hex(32)}\ncurrent 1\n")
    return path


def socket_path(lab: Lab, node_id: int) -> Path:
    return lab.cluster_config.runtime_path(node_id, "sock")


def log_path(lab: Lab, node_id: int) -> Path:
    return lab.directory / f"n{node_id}.log"


def daemon_argv(lab: Lab, node_id: int, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "lbsync", "-v", "run", "--config", str(lab.config_path),
            "--node-id", str(node_id), *extra]


def start_daemon(lab: Lab, node_id: int, *, extra: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start node ``node_id``'s daemon in its namespace (log appended to ``n<i>.log``)."""
    if not Path(lab.cluster_config.cluster.key_file).exists():
        write_keyring(lab)
    full_env = {**os.environ, "LBSYNC_STATE_DIR": str(lab.directory / STATE_SUBDIR),
                **(env or {})}
    log = open(log_path(lab, node_id), "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(ns_argv(lab.node_ns(node_id), daemon_argv(lab, node_id, extra)),
                                stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
    finally:
        log.close()


def start_daemons(lab: Lab, *, nodes: Iterable[int] | None = None, extra: Sequence[str] = (),
                  env: dict[str, str] | None = None) -> dict[int, subprocess.Popen[bytes]]:
    return {i: start_daemon(lab, i, extra=extra, env=env)
            for i in (nodes if nodes is not None else lab.node_ids)}


def status(lab: Lab, node_id: int, timeout: float = 5.0) -> dict[str, Any]:
    result = call(socket_path(lab, node_id), "status", timeout=timeout)
    if not isinstance(result, dict):
        raise LabError(f"node {node_id}: status is not an object")
    return result


def request(lab: Lab, node_id: int, cmd: str, args: dict[str, Any] | None = None,
            timeout: float = 30.0) -> Any:
    return call(socket_path(lab, node_id), cmd, args, timeout=timeout)


def wait_for(predicate: Any, timeout: float, interval: float = 0.1, what: str = "") -> Any:
    """Poll ``predicate()`` until it returns something truthy; raise LabError on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (ControlError, OSError, LabError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise LabError(f"timed out after {timeout:.1f} s waiting for {what or predicate}"
                   + (f" (last error: {last_exc})" if last_exc else ""))


def wait_ready(lab: Lab, nodes: Iterable[int] | None = None, timeout: float = 20.0) -> None:
    """Until every given daemon is ready, unfenced, and the farm owns every bucket once."""
    ids = tuple(nodes if nodes is not None else lab.node_ids)

    def ok() -> bool:
        owned: list[int] = []
        for i in ids:
            st = status(lab, i)
            if not st.get("ready") or st.get("fenced") or not st.get("map_epoch"):
                return False
            owned += st["forwarding"]
        return sorted(owned) == list(range(lab.buckets))

    wait_for(ok, timeout, what=f"daemons {ids} ready and every bucket owned once")


def daemon_pids(lab: Lab, node_id: int) -> list[int]:
    """PIDs of ``lbsync run`` processes in the node's namespace."""
    cp = subprocess.run(["ip", "netns", "pids", lab.node_ns(node_id)], capture_output=True,
                        text=True, check=False)
    out = []
    for p in cp.stdout.split():
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"run" in argv and any(a.endswith(b"lbsync") for a in argv):
            out.append(int(p))
    return out


def links(lab: Lab, node_id: int, up: bool,
          roles: Sequence[str] = ("outside", "inside", "replication", "management")) -> None:
    ifs = lab.ifaces
    for role in roles:
        subprocess.run(ns_argv(lab.node_ns(node_id),
                               ["ip", "link", "set", ifs[role], "up" if up else "down"]),
                       check=True, capture_output=True)


def kill_daemon(lab: Lab, node_id: int, *, links_down: bool = False) -> float:
    """SIGKILL the node's daemon (and take its links down in the same step); returns t0
    (``time.monotonic()`` just before the kill)."""
    pids = daemon_pids(lab, node_id)
    if links_down:
        # one `ip -batch` in the namespace: all links go down within a millisecond of the kill
        batch = "".join(f"link set {lab.ifaces[r]} down\n"
                        for r in ("outside", "inside", "replication", "management"))
        t0 = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(ns_argv(lab.node_ns(node_id), ["ip", "-batch", "-"]), input=batch,
                       text=True, check=True, capture_output=True)
    else:
        t0 = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in pids:
        _wait_gone(pid)
    return t0


def stop_daemon(lab: Lab, node_id: int, timeout: float = 10.0) -> None:
    """Planned stop (SIGTERM), waiting until the process is gone."""
    for pid in daemon_pids(lab, node_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        _wait_gone(pid, timeout)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    raise LabError(f"process {pid} did not exit within {timeout:.0f} s")


def remove_runtime_files(prefix: str) -> None:
    """The lab daemons' control sockets and lock files (left behind by SIGKILL)."""
    for p in RUN_DIR.glob(f"{prefix}-*"):
        if p.suffix in (".sock", ".lock") and (p.is_file() or p.is_socket()):
            with contextlib.suppress(OSError):
                p.unlink()
