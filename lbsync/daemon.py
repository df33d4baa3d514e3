"""lbsyncd lifecycle: preflight, lock, one TaskGroup owning every task, signals, reload, drain.

The daemon is a thin shell around the node's components (:mod:`lbsync.node`): it checks that it
may run, takes the per-node lock, starts the control socket and the node, and stops everything
on one trigger. Signals are handled here and only here:

- SIGTERM / SIGINT: graceful stop (announce a grace period to peers, drain queues for at most
  ``DRAIN_TIMEOUT``); a second one forces.
- SIGHUP: reload the cluster file; the new config is validated first and the old one kept on
  error (logged, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lbsync.config import ClusterConfig, ConfigError, load_cluster
from lbsync.control import ControlServer
from lbsync.peerctl import PeerControl

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 3.0


class StartupError(Exception):
    """The daemon cannot start; ``str()`` says why and what to do (one line)."""


def preflight(cfg: ClusterConfig, *, table_exists: Callable[[], bool]) -> None:
    """Refuse clearly when not privileged, the replication link is missing, or no table."""
    if os.geteuid() != 0:
        raise StartupError("must run as root (needs CAP_NET_ADMIN for netlink and nftables)")
    iface = cfg.interfaces.replication
    try:
        socket.if_nametoindex(iface)
    except OSError:
        raise StartupError(
            f"replication interface {iface!r} does not exist (interfaces.replication)") from None
    if not table_exists():
        raise StartupError("nft table 'inet lbsync' is missing: run `lbsync datapath apply` first")


def apply_scheduling(cfg: ClusterConfig) -> str:
    """Set the process's scheduling policy from ``[daemon]``; returns what was set.

    Real time (rr, as conntrackd does) keeps heartbeats and lease refreshes on time on a
    loaded node: measured in the lab, a starved time-shared daemon let leases lapse (fences)
    and was declared dead while alive. The daemon is event driven, never spins.
    """
    d = cfg.daemon
    if d.sched_policy == "other":
        return "other"
    policy = os.SCHED_RR if d.sched_policy == "rr" else os.SCHED_FIFO
    try:
        os.sched_setscheduler(0, policy, os.sched_param(d.sched_priority))
    except OSError as exc:
        raise StartupError(f"cannot set scheduling policy {d.sched_policy} "
                           f"priority {d.sched_priority}: {exc.strerror}") from None
    return f"{d.sched_policy}:{d.sched_priority}"


@contextlib.contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``/run/lbsync/<cluster>-<node>.lock`` for the daemon's life."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise StartupError(
                f"another lbsync instance holds {path} (pid {other or '?'})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class Lifecycle:
    """One stop trigger, SIGHUP reload, and the clock the components share."""

    def __init__(self, config_path: Path, cfg: ClusterConfig) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.stop_requested = asyncio.Event()
        self.stop_reason = ""
        self.reloads = 0
        self.reload_failures = 0
        self.reload_listeners: list[Callable[[ClusterConfig], None]] = []
        self._signals = 0

    def install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _on_stop_signal(self, name: str) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("daemon.forced_stop signal=%s", name)
            os._exit(1)
        self.request_stop(name)

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            log.info("daemon.stopping reason=%s", reason)
            self.stop_reason = reason
            self.stop_requested.set()

    def reload(self) -> None:
        try:
            new = load_cluster(self.config_path)
            if new.cluster.name != self.cfg.cluster.name or \
                    new.cluster.buckets != self.cfg.cluster.buckets or \
                    new.cluster.hash_seed != self.cfg.cluster.hash_seed:
                raise ConfigError(str(self.config_path), "cluster",
                                  "name, buckets and hash_seed cannot change at run time")
        except ConfigError as exc:
            self.reload_failures += 1
            log.error("daemon.reload_failed error=%s (keeping the old config)", exc)
            return
        self.cfg = new
        self.reloads += 1
        log.info("daemon.reloaded file=%s", self.config_path)
        for listener in self.reload_listeners:
            listener(new)


def new_loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop]:
    if use_uvloop:
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def monotonic() -> float:
    """The daemon's one clock (components receive ``now`` from here, never read time)."""
    return time.monotonic()


def statistics_base(life: Lifecycle, node_id: int, started: float) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "cluster": life.cfg.cluster.name,
        "pid": os.getpid(),
        "uptime_s": round(monotonic() - started, 3),
        "reloads": life.reloads,
        "reload_failures": life.reload_failures,
    }


async def serve(life: Lifecycle, node_id: int, node_factory: Any) -> int:
    """Run the node under one TaskGroup until a stop trigger, then drain within a bound."""
    loop = asyncio.get_running_loop()
    life.install_signals(loop)
    started = monotonic()
    node = node_factory(life=life, node_id=node_id)

    async def status(_args: Any) -> Any:
        return {**statistics_base(life, node_id, started), **node.statistics(),
                "peer_control": dataclasses.asdict(peers.statistics())}

    handlers = {"status": status, **node.control_handlers()}
    # farm commands relayed to and from the other daemons (lbsync/peerctl.py)
    peers = PeerControl(cfg=life.cfg, node_id=node_id, keyring=lambda: node.keyring,
                        handlers=handlers)
    handlers.update(peers.handlers())
    node.peer_control = peers  # the metrics exporter reads its statistics through the node
    control = ControlServer(life.cfg.runtime_path(node_id, "sock"), handlers)
    await control.start()
    try:
        await peers.start()
    except OSError as exc:
        await control.close()
        raise StartupError(f"cannot listen for peer control on "
                           f"{peers.address}:{peers.port} (replication.control_port): "
                           f"{exc.strerror or exc}") from None
    rc = 0
    try:
        async with asyncio.TaskGroup() as tg:
            node_task = tg.create_task(node.run(), name="node")
            stop_task = tg.create_task(life.stop_requested.wait(), name="stop-trigger")
            done, _ = await asyncio.wait({node_task, stop_task},
                                         return_when=asyncio.FIRST_COMPLETED)
            if node_task in done and not stop_task.done():
                life.request_stop("node-exited")
                stop_task.cancel()
            try:
                await asyncio.wait_for(node.shutdown(), DRAIN_TIMEOUT)
            except TimeoutError:
                log.warning("daemon.drain_timeout seconds=%.1f", DRAIN_TIMEOUT)
            node_task.cancel()
    except* StartupError as eg:
        raise eg.exceptions[0] from None
    finally:
        await peers.close()
        await control.close()
    return rc
