"""The asyncio/uvloop adapter on real loopback UDP sockets (unicast mode), and its errors."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest
import uvloop

from lbsync.replication.auth import KeyRing
from lbsync.replication.endpoint import ReplicationEndpoint
from lbsync.replication.events import Event, RecordsApplied
from lbsync.replication.params import ProtocolParams
from lbsync.replication.transport import (
    ReplicationTransport,
    TransportError,
    multicast_socket,
    open_unicast,
    unicast_socket,
)

KR = KeyRing({1: b"t" * 32}, 1)
P = ProtocolParams(buckets=8)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _two_nodes() -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    port = free_port()
    applied: list[Event] = []
    eps = [ReplicationEndpoint(node_id=i, incarnation=1, keyring=KR, params=P,
                               now=loop.time(), rng=random.Random(i)) for i in (1, 2)]
    # Two addresses on loopback, same port: unicast peers as in a farm.
    trs: list[ReplicationTransport] = []
    for i, ep in enumerate(eps, 1):
        trs.append(await open_unicast(ep, address=f"127.0.0.{i}", port=port,
                                      peers=[f"127.0.0.{3 - i}"], buffer=1 << 20,
                                      on_event=applied.append))
    eps[0].claim(3, 1, loop.time())
    for i in range(500):
        eps[0].update_flow(3, b"k%d" % i, b"r" * 80, loop.time())
        if i % 50 == 0:
            trs[0].pump()
            await asyncio.sleep(0.001)
    trs[0].pump()
    for _ in range(200):
        if eps[1].store.snapshot(3) == eps[0].store.snapshot(3):
            break
        await asyncio.sleep(0.01)
    for tr in trs:
        tr.close()
    assert eps[1].store.snapshot(3) == eps[0].store.snapshot(3)
    assert any(isinstance(e, RecordsApplied) for e in applied)
    return trs[0].statistics().datagrams_out, trs[1].statistics().datagrams_in


def test_unicast_over_loopback_under_uvloop() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out, received = runner.run(_two_nodes())
    assert out > 0 and received > 0


def test_setup_errors_are_explained() -> None:
    with pytest.raises(TransportError, match="no such interface"):
        multicast_socket("239.18.0.1", free_port(), "nonexistent0", buffer=1 << 20)
    with pytest.raises(TransportError, match="not configured"):
        unicast_socket("198.18.254.254", free_port(), buffer=1 << 20)


async def _flush_on_idle() -> tuple[list[int], int]:
    """A flush delay far beyond the test: what leaves is sealed by ``flush_soon``."""
    loop = asyncio.get_running_loop()
    port = free_port()
    params = ProtocolParams(buckets=8, flush_delay=3600.0)
    applied: list[Event] = []
    eps = [ReplicationEndpoint(node_id=i, incarnation=1, keyring=KR, params=params,
                               now=loop.time(), rng=random.Random(i)) for i in (1, 2)]
    trs = [await open_unicast(ep, address=f"127.0.0.{i}", port=port,
                              peers=[f"127.0.0.{3 - i}"], buffer=1 << 20,
                              on_event=applied.append) for i, ep in enumerate(eps, 1)]
    eps[0].claim(3, 1, loop.time())
    trs[0].pump()
    sent = []
    for burst in (1, 5):  # one record; then a burst written in one callback
        before = eps[0].sender.datagrams_sent
        for i in range(burst):
            eps[0].update_flow(3, b"b%d-%d" % (burst, i), b"r" * 40, loop.time())
            trs[0].flush_soon()
        assert eps[0].sender.datagrams_sent == before  # not before the callbacks are done
        await asyncio.sleep(0)  # one loop turn
        sent.append(eps[0].sender.datagrams_sent - before)
    for _ in range(200):
        if eps[1].store.snapshot(3) == eps[0].store.snapshot(3):
            break
        await asyncio.sleep(0.01)
    for tr in trs:
        tr.close()
    return sent, len(eps[1].store.snapshot(3)[0])


def test_flush_soon_seals_after_the_current_callbacks() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sent, copies = runner.run(_flush_on_idle())
    assert sent == [1, 1]  # within one turn despite the flush delay; the burst shares one
    assert copies == 6


class _ClockEndpoint:
    """An endpoint stand-in with a settable deadline that records handle_timer calls."""

    def __init__(self, deadline: float) -> None:
        self.deadline: float | None = deadline
        self.handled: list[float] = []

    def datagrams_to_send(self) -> list[bytes]:
        return []

    def next_event(self) -> None:
        return None

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self.handled.append(now)
        self.deadline = None


async def _moved_deadline() -> tuple[list[float], float, int, int]:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ep = _ClockEndpoint(t0 + 0.02)
    tr = ReplicationTransport(ep, [], lambda _e: None, loop)  # type: ignore[arg-type]
    tr.pump()                     # armed at t0 + 20 ms
    ep.deadline = t0 + 0.08
    tr.pump()                     # later: the armed timer stays (no cancel + call_at)
    await asyncio.sleep(0.15)
    return ep.handled, t0 + 0.08, tr.early_fires, tr.timer_fires


def test_a_deadline_moved_later_keeps_the_armed_timer_and_never_runs_early() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        handled, due, early, fires = runner.run(_moved_deadline())
    assert early == 1                      # woke at the old deadline, only re-armed
    assert fires == 1 and len(handled) == 1
    assert handled[0] >= due - 0.001       # uvloop's millisecond clock
