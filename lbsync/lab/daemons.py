"""lbsyncd in the lab: one daemon per node namespace, with a generated key ring.

Files live in the lab's directory (``/run/lbsync/lab/<prefix>/``): ``cluster.key`` (mode 0600),
``state/`` (incarnation counters, planned-stop notes), ``n<i>.log`` (each daemon's log). The
daemons' control sockets and locks are ``/run/lbsync/<prefix>-<i>.{sock,lock}`` (the lab's
cluster is named after its prefix, so labs never collide); :func:`remove_runtime_files` deletes
those of a lab, as ``lab down`` does.

Failure tools for tests and drills: :func:`kill_daemon` (SIGKILL, optionally taking the node's
links down in the same step), :func:`links` (down/up), :func:`stop_daemon` (SIGTERM, planned),
:func:`kill_node` (keepalived too: the whole node dies).

keepalived (issue 9): :func:`up` with ``keepalived=True`` (``lbsync lab up --daemons
--keepalived``) adds ``[keepalived] enabled = true`` to the lab's cluster file before the daemons
start, then runs one keepalived per node in the node's namespace (VRRP only, foreground, its
configuration rendered by :func:`lbsync.keepalived.render_keepalived_conf` with the cluster's
``advert_int`` and each node's ``vrrp_fifo``; files in ``<lab>/keepalived/n<i>/``), and waits
until every node is MASTER of its own instance only. Killing a node kills keepalived's VRRP child
first: killed after its parent, the child would send a priority-0 advert (a graceful handover,
not a crash; docs/keepalived.md).
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

from lbsync.config import load_cluster
from lbsync.control import ControlError, call
from lbsync.lab import farm
from lbsync.lab.farm import Lab, LabError, netns_pids, ns_argv

KEY_FILE = "cluster.key"
STATE_SUBDIR = "state"
KEEPALIVED_SUBDIR = "keepalived"
KEEPALIVED_ADVERT_INT = 0.1


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


def dump_logs(lab: Lab, tail: int = 40) -> None:
    """The daemons' last log lines on stderr (for a failed test or benchmark run)."""
    for i in lab.node_ids:
        with contextlib.suppress(OSError):
            lines = log_path(lab, i).read_text().splitlines()[-tail:]
            sys.stderr.write(f"--- n{i}.log\n" + "\n".join(lines) + "\n")


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
    return _kill(lab, node_id, daemon_pids(lab, node_id), links_down=links_down)


def _kill(lab: Lab, node_id: int, pids: Sequence[int], *, links_down: bool) -> float:
    """SIGKILL ``pids`` in order, then (``links_down``) take every link of the node down with
    one ``ip -batch`` in its namespace (all within a millisecond of the kill); wait until the
    processes are gone. Returns t0, ``time.monotonic()`` just before the first kill."""
    batch = "".join(f"link set {lab.ifaces[r]} down\n"
                    for r in ("outside", "inside", "replication", "management"))
    t0 = time.monotonic()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if links_down:
        subprocess.run(ns_argv(lab.node_ns(node_id), ["ip", "-batch", "-"]), input=batch,
                       text=True, check=True, capture_output=True)
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
    """The lab daemons' control sockets, lock files and keepalived FIFOs (left behind by
    SIGKILL); :func:`lbsync.lab.farm.destroy` removes them too."""
    farm.remove_runtime_files(prefix)


# --------------------------------------------------------------------------------------------
# The whole farm: daemons (and keepalived) started and ready


def up(lab: Lab, *, keepalived: bool = False, advert_int: float = KEEPALIVED_ADVERT_INT,
       timeout: float = 30.0, nodes: Iterable[int] | None = None,
       env: dict[str, str] | None = None) -> None:
    """Start lbsyncd on every node (``nodes``) and, with ``keepalived``, one keepalived per
    node as lbsync's second failure signal; return when the daemons are ready, every bucket is
    owned once and (with keepalived) every node is MASTER of its own VRRP instance only.
    Raises LabError on timeout (the caller tears the lab down)."""
    ids = tuple(nodes if nodes is not None else lab.node_ids)
    if keepalived:
        enable_keepalived(lab, advert_int=advert_int)
    start_daemons(lab, nodes=ids, env=env)
    if keepalived:
        for i in ids:
            start_keepalived(lab, i)
    wait_ready(lab, ids, timeout=timeout)
    if keepalived:
        wait_vrrp_steady(lab, ids, timeout=timeout)


# --------------------------------------------------------------------------------------------
# keepalived per node


def enable_keepalived(lab: Lab, *, advert_int: float = KEEPALIVED_ADVERT_INT) -> None:
    """Append ``[keepalived] enabled = true`` (and ``advert_int``) to the lab's cluster file and
    reload ``lab.cluster_config``; before the daemons start. A no-op when already enabled."""
    if lab.cluster_config.keepalived.enabled:
        return
    with open(lab.config_path, "a") as f:
        f.write(f"\n[keepalived]\nenabled = true\nadvert_int = {float(advert_int)!r}\n")
    lab.cluster_config = load_cluster(lab.config_path)


def keepalived_dir(lab: Lab, node_id: int) -> Path:
    """Node ``node_id``'s keepalived files: keepalived.conf, keepalived.log, pid files."""
    return lab.directory / KEEPALIVED_SUBDIR / f"n{node_id}"


def write_keepalived_conf(lab: Lab, node_id: int) -> Path:
    """Render node ``node_id``'s keepalived.conf from the lab's cluster file."""
    from lbsync.keepalived import render_keepalived_conf

    cfg = lab.cluster_config
    d = keepalived_dir(lab, node_id)
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "keepalived.conf"
    conf.write_text(render_keepalived_conf(cfg, node_id, advert_int=cfg.keepalived.advert_int,
                                           fifo_path=str(cfg.vrrp_fifo(node_id)),
                                           run_dir=str(d)))
    return conf


def start_keepalived(lab: Lab, node_id: int) -> subprocess.Popen[bytes]:
    """Run keepalived (VRRP only, foreground) in node ``node_id``'s namespace; its output is
    appended to ``keepalived.log``. The token addresses live on ``lo``, which keepalived
    tracks: it is brought up first (the lab does, but a test may have taken it down)."""
    from lbsync.keepalived import keepalived_argv

    if not lab.cluster_config.keepalived.enabled:
        raise LabError("keepalived is not enabled in the lab's cluster file "
                       "(daemons.enable_keepalived before the daemons start)")
    conf = write_keepalived_conf(lab, node_id)
    d = conf.parent
    for name in ("keepalived.pid", "keepalived-vrrp.pid", "keepalived-checkers.pid"):
        with contextlib.suppress(FileNotFoundError):
            (d / name).unlink()
    ns = lab.node_ns(node_id)
    subprocess.run(ns_argv(ns, ["ip", "link", "set", "lo", "up"]), check=True,
                   capture_output=True)
    out = open(d / "keepalived.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(ns_argv(ns, keepalived_argv(str(conf), str(d))),
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()


def keepalived_pids(lab: Lab, node_id: int) -> tuple[int | None, list[int]]:
    """(the VRRP child's pid from its pid file, every keepalived process in the namespace)."""
    ns = lab.node_ns(node_id)
    pids = []
    for pid in netns_pids([ns]).get(ns, []):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "keepalived":
                pids.append(pid)
        except OSError:
            continue
    try:
        child: int | None = int(
            (keepalived_dir(lab, node_id) / "keepalived-vrrp.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        child = None
    return (child if child in pids else None), pids


def kill_keepalived(lab: Lab, node_id: int, *, wait: bool = True) -> list[int]:
    """SIGKILL node ``node_id``'s keepalived, the VRRP child first (a child outliving its
    parent's SIGKILL by a moment sends a priority-0 advert: a graceful handover that would
    make the crash look planned). Returns the pids killed."""
    child, pids = keepalived_pids(lab, node_id)
    order = ([child] if child is not None else []) + [p for p in pids if p != child]
    for pid in order:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if wait:
        for pid in order:
            _wait_gone(pid)
    return order


def stop_keepalived(lab: Lab, node_id: int, timeout: float = 10.0) -> None:
    """Graceful stop (SIGTERM to the parent): keepalived sends priority-0 adverts, its peers
    take its instance at once, and the node's daemon reads STOP (``VrrpSignalLost``)."""
    child, pids = keepalived_pids(lab, node_id)
    for pid in [p for p in pids if p != child]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        _wait_gone(pid, timeout)


def kill_node(lab: Lab, node_id: int, *, links_down: bool = True) -> float:
    """Crash node ``node_id``: SIGKILL keepalived's VRRP child, keepalived and the daemon, and
    (``links_down``) take its links down in the same step. Returns t0 (``time.monotonic()``
    just before the first kill)."""
    child, ka = keepalived_pids(lab, node_id)
    pids = ([child] if child is not None else []) + [p for p in ka if p != child]
    return _kill(lab, node_id, [*pids, *daemon_pids(lab, node_id)], links_down=links_down)


def vrrp_states(lab: Lab, node_id: int) -> dict[str, str]:
    """instance -> state as node ``node_id``'s daemon last read it from keepalived."""
    st = status(lab, node_id)
    vrrp = st.get("vrrp") or {}
    return dict((vrrp.get("interpreter") or {}).get("states") or {})


def wait_vrrp_steady(lab: Lab, nodes: Iterable[int] | None = None,
                     timeout: float = 20.0) -> None:
    """Until every given node's daemon has read from keepalived that it is MASTER of its own
    instance and BACKUP of every other given node's."""
    from lbsync.keepalived import instance_name

    ids = tuple(nodes if nodes is not None else lab.node_ids)

    def ok() -> bool:
        for i in ids:
            states = vrrp_states(lab, i)
            for j in ids:
                if states.get(instance_name(j)) != ("MASTER" if i == j else "BACKUP"):
                    return False
        return True

    wait_for(ok, timeout, what=f"keepalived on {ids}: each node MASTER of its own instance")
