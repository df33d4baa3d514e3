"""The ENOBUFS -> re-dump protocol of :class:`Conntrack`, step by step and deterministic.

The sockets are real (creating them needs CAP_NET_ADMIN, hence the kernel tier) but idle: the
test drives the adapter's callbacks in a chosen order and answers the re-dump from a fake
table whose answer it releases when it wants, so every interleaving below is exact.
"""

from __future__ import annotations

import asyncio

import pytest

from lbsync.kernel import ctnetlink as C
from lbsync.kernel.conntrack import Conntrack, RequestStatistics
from lbsync.kernel.ctnetlink import CtEvent
from lbsync.kernel.netns import entered
from tests.netns import NetnsSet

pytestmark = pytest.mark.kernel


def ev(kind: int, key: str) -> CtEvent:
    return CtEvent(kind, key.encode(), 0, 17, -1, 8, b"", 0)


def new(key: str) -> CtEvent:
    return ev(C.KIND_NEW, key)


def gone(key: str) -> CtEvent:
    return ev(C.KIND_DESTROY, key)


class GatedTable:
    """A fake request side whose dumps finish when the test says so."""

    def __init__(self) -> None:
        self.gates: list[asyncio.Future[list[CtEvent]]] = []

    async def dump_all(self, **_: object) -> list[CtEvent]:
        fut: asyncio.Future[list[CtEvent]] = asyncio.get_running_loop().create_future()
        self.gates.append(fut)
        return await fut

    def close(self) -> None:
        pass

    def statistics(self) -> RequestStatistics:
        return RequestStatistics(*([0] * 10))


class Consumer:
    def __init__(self) -> None:
        self.model: dict[bytes, CtEvent] = {}
        self.log: list[str] = []

    def on_events(self, evs: list[CtEvent]) -> None:
        for e in evs:
            self.log.append(f"{C.KIND_NAMES[e.kind]}:{e.key.decode()}")
            if e.kind == C.KIND_DESTROY:
                self.model.pop(e.key, None)
            else:
                self.model[e.key] = e

    def on_resync(self, table: list[CtEvent]) -> None:
        self.log.append("resync:" + ",".join(sorted(e.key.decode() for e in table)))
        self.model = {e.key: e for e in table}

    def keys(self) -> set[str]:
        return {k.decode() for k in self.model}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def ns(netns: NetnsSet) -> str:
    return netns.add("rsync")


def make(ns: str, consumer: Consumer) -> tuple[Conntrack, GatedTable]:
    with entered(ns):
        ct = Conntrack(on_events=consumer.on_events, on_resync=consumer.on_resync)
    table = GatedTable()
    ct.requests.close()
    ct.requests = table  # type: ignore[assignment]
    return ct, table


def test_events_before_the_drain_go_first_events_after_it_follow_the_table(ns: str) -> None:
    async def run() -> None:
        c = Consumer()
        ct, table = make(ns, c)
        ct._deliver([new("a"), new("b")])
        ct._overrun()  # events were lost here
        assert ct.resyncing
        ct._deliver([new("c")])  # queued before the loss: delivered at once
        ct._drained()  # the queue was empty: the re-dump starts, later events are held
        await settle()
        assert len(table.gates) == 1
        ct._deliver([gone("a"), new("d")])
        assert "destroy:a" not in c.log
        table.gates[0].set_result([new("b"), new("c"), new("a")])  # the table at dump time
        await settle()
        assert c.log == ["new:a", "new:b", "new:c", "resync:a,b,c", "destroy:a", "new:d"]
        assert c.keys() == {"b", "c", "d"} and not ct.resyncing and ct.resyncs == 1
        ct.close()

    asyncio.run(run())


def test_loss_during_the_dump_voids_it_until_the_next_drain(ns: str) -> None:
    async def run() -> None:
        c = Consumer()
        ct, table = make(ns, c)
        ct._overrun()
        ct._drained()
        await settle()
        ct._overrun()  # a second loss while the dump runs, queue not yet drained
        ct._deliver([new("stale")])
        table.gates[0].set_result([new("x")])
        await settle()
        assert not any(line.startswith("resync") for line in c.log)  # voided
        assert ct.resyncing and len(table.gates) == 1
        ct._deliver([new("y")])  # before the next drain: delivered, the table supersedes
        ct._drained()
        await settle()
        assert len(table.gates) == 2
        ct._deliver([new("z")])
        table.gates[1].set_result([new("x"), new("y")])
        await settle()
        assert c.log[-2:] == ["resync:x,y", "new:z"]
        assert c.keys() == {"x", "y", "z"} and ct.resyncs == 2 and not ct.resyncing
        ct.close()

    asyncio.run(run())


def test_loss_then_drain_during_the_dump_restarts_from_the_drain(ns: str) -> None:
    async def run() -> None:
        c = Consumer()
        ct, table = make(ns, c)
        ct._overrun()
        ct._drained()
        await settle()
        ct._overrun()
        ct._deliver([new("stale")])  # read before the queue emptied: not replayed
        ct._drained()
        ct._deliver([gone("k")])  # after the drain: kept for after the next table
        table.gates[0].set_result([new("old")])
        await settle()
        assert len(table.gates) == 2  # dumped again at once
        table.gates[1].set_result([new("k"), new("m")])
        await settle()
        assert [line for line in c.log if line.startswith("resync")] == ["resync:k,m"]
        assert c.log[-1] == "destroy:k" and "new:stale" not in c.log
        assert c.keys() == {"m"} and ct.resyncs == 2
        ct.close()

    asyncio.run(run())


def test_held_events_past_the_bound_count_as_a_loss(ns: str) -> None:
    async def run() -> None:
        c = Consumer()
        with entered(ns):
            ct = Conntrack(on_events=c.on_events, on_resync=c.on_resync, max_held=3)
        table = GatedTable()
        ct.requests.close()
        ct.requests = table  # type: ignore[assignment]
        ct._overrun()
        ct._drained()
        await settle()
        ct._deliver([new("1"), new("2"), new("3"), new("4")])
        assert ct.held_overflows == 1 and ct.events.drain_wanted
        table.gates[0].set_result([new("t")])
        await settle()
        assert not any(line.startswith("resync") for line in c.log)
        ct._drained()
        await settle()
        table.gates[1].set_result([new("1"), new("2"), new("3"), new("4")])
        await settle()
        assert c.keys() == {"1", "2", "3", "4"} and ct.statistics().events.held_overflows == 1
        ct.close()

    asyncio.run(run())
