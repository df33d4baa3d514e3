"""The event reader with the C accelerator and without it, on the same real event stream.

Two :class:`ConntrackEvents` sockets in one namespace receive the same kernel events (creates,
updates, deletes, IPv4 and IPv6, TCP and UDP, SNAT) from a generator process; one is read
through the C receive loop, the other through the Python one. They must deliver equal events.
"""

from __future__ import annotations

import subprocess

import pytest

from lbsync.config import KernelConfig
from lbsync.kernel import ctnetlink as C
from lbsync.kernel.conntrack import ConntrackEvents
from lbsync.kernel.ctnetlink import CtEvent
from lbsync.kernel.netns import entered
from tests.benchmarks.ctnetlink import generator_cmd
from tests.netns import NetnsSet

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(C._c_recv_events is None, reason="C accelerator disabled")]

N = 5000


def test_c_and_python_readers_deliver_the_same_events(netns: NetnsSet) -> None:
    ns = netns.add("rdr")
    got: dict[str, list[CtEvent]] = {"c": [], "python": []}
    with entered(ns):
        readers = {name: ConntrackEvents(on_events=got[name].extend,
                                         config=KernelConfig(event_buffer=64 << 20),
                                         marks=set(range(0, 64, 2)), read_budget=64)
                   for name in got}
    try:
        # creates, half deleted again, twice (the second round's creates of the same tuples)
        subprocess.run(generator_cmd(ns, N, delete=N // 2, rounds=2, cpu=0), check=True,
                       timeout=120)
        # everything is queued now: read both sockets empty, in slices of 64 receives
        _drain(readers["c"], C._c_recv_events)
        _drain(readers["python"], None)
        stats = {k: r.statistics() for k, r in readers.items()}
    finally:
        for r in readers.values():
            r.close()
    assert stats["c"].enobufs == stats["python"].enobufs == 0
    assert stats["c"].decode_errors == stats["python"].decode_errors == 0
    assert stats["c"] == stats["python"]
    assert got["c"] == got["python"]
    kinds = {ev.kind for ev in got["c"]}
    assert kinds >= {C.KIND_NEW, C.KIND_DESTROY}
    assert stats["c"].messages >= 2 * (N + N // 2)
    assert all(type(ev) is CtEvent for ev in got["c"])


def _drain(reader: ConntrackEvents, recv_events: object) -> None:
    saved = C._c_recv_events
    C._c_recv_events = recv_events  # type: ignore[assignment]
    try:
        while True:
            before = reader.recv_calls
            reader.read_ready()
            if reader.recv_calls == before:
                return
    finally:
        C._c_recv_events = saved
