"""One conntrack event socket per lab node namespace, each read by a thread: the shared part of
the kernel tests' DESTROY watcher (tests/kernel/daemon_checks.py) and the replication
benchmark's NEW-event sampler (tests/benchmarks/replication.py).

A subclass says what one read means in :meth:`NamespaceEventListener.handle` (called in the
reader thread with the node, the datagram and the read time); ``prepare`` may attach a BPF
filter to a socket before its thread starts, and ``on_thread_start`` runs first in each thread
(e.g. to raise its scheduling priority). ENOBUFS and other socket errors are counted in
``overruns`` and the reading goes on.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from lbsync.kernel.conntrack import open_netfilter_socket
from lbsync.lab.traffic import in_netns


class NamespaceEventListener:
    """Reads ctnetlink multicast ``groups`` in each of ``nodes``' namespaces of ``lab``."""

    def __init__(self, lab: Any, nodes: Iterable[int], groups: tuple[int, ...], *,
                 clock: Callable[[], float] = time.monotonic, recv_size: int = 1 << 17,
                 rcvbuf: int = 64 << 20) -> None:
        self.overruns = 0
        self._clock = clock
        self._recv_size = recv_size
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for node in nodes:
            with in_netns(lab.node_ns(node)):
                sock = open_netfilter_socket(rcvbuf=rcvbuf, groups=groups)
            self.prepare(node, sock)
            sock.settimeout(0.1)
            t = threading.Thread(target=self._run, args=(node, sock), daemon=True)
            t.start()
            self._threads.append(t)

    def prepare(self, node: int, sock: socket.socket) -> None:
        """Before node's reader starts (default: nothing)."""

    def on_thread_start(self) -> None:
        """First thing in every reader thread (default: nothing)."""

    def handle(self, node: int, data: bytes, t: float) -> None:
        raise NotImplementedError

    def _run(self, node: int, sock: socket.socket) -> None:
        self.on_thread_start()
        try:
            while not self._stop.is_set():
                try:
                    data = sock.recv(self._recv_size)
                except TimeoutError:
                    continue
                except OSError:
                    self.overruns += 1  # ENOBUFS: the kernel dropped events for us
                    continue
                self.handle(node, data, self._clock())
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)

    def __enter__(self) -> NamespaceEventListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
