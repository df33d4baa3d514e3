"""Bursts of 100k entries: events accounted for or loss detected and healed; echoes suppressed.

The burst comes from a separate process injecting entries through ctnetlink in batches (as
DESIGN.md section 3 notes, such entries produce events like packet-created ones, and far faster
than real packets). The reader's model of the table (NEW/UPDATE set, DESTROY remove, a re-dump
after ENOBUFS replaces it) must end equal to ``conntrack -L``.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time

import pytest

from lbsync.config import KernelConfig
from lbsync.kernel import ctnetlink as C
from lbsync.kernel.conntrack import Conntrack
from lbsync.kernel.ctnetlink import CtEvent
from lbsync.kernel.flowrecord import flow_key
from lbsync.kernel.netns import entered
from tests.benchmarks.ctnetlink import synthetic_records
from tests.netns import NetnsSet, run

pytestmark = pytest.mark.kernel

N = 100_000
DELETED = 10_000
_LINE = re.compile(r"^(\w+)\s+(\d+)\s.*?src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)")


def conntrack_l_keys(ns: str) -> set[bytes]:
    """The kernel's table according to conntrack-tools (UDP/TCP entries of the test)."""
    import socket
    out = run(["ip", "netns", "exec", ns, "conntrack", "-L"], timeout=60).stdout
    keys = set()
    for line in out.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        _proto, num, src, dst, sport, dport = m.groups()
        fam = socket.AF_INET6 if ":" in src else socket.AF_INET
        zone = int(z.group(1)) if (z := re.search(r"zone=(\d+)", line)) else 0
        keys.add(flow_key(int(fam), int(num), zone, socket.inet_pton(fam, src),
                          socket.inet_pton(fam, dst), int(sport), int(dport)))
    return keys


async def burst(ns: str, event_buffer: int,
                late_reader: bool) -> tuple[dict[bytes, CtEvent], Conntrack]:
    model: dict[bytes, CtEvent] = {}
    last_event = [time.monotonic()]

    def on_events(evs: list[CtEvent]) -> None:
        last_event[0] = time.monotonic()
        for ev in evs:
            if ev.kind == C.KIND_DESTROY:
                model.pop(ev.key, None)
            else:
                model[ev.key] = ev

    def on_resync(table: list[CtEvent]) -> None:
        model.clear()
        model.update((e.key, e) for e in table)

    with entered(ns):
        ct = Conntrack(on_events=on_events, on_resync=on_resync,
                       config=KernelConfig(event_buffer=event_buffer))
    if not late_reader:
        ct.start()
    gen = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-m", "tests.benchmarks.ctnetlink",
        "--generate", str(N), "--delete", str(DELETED),
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert await asyncio.wait_for(gen.wait(), 120) == 0
    if late_reader:
        # the reader wakes up after the whole burst: its buffer has overflowed for sure
        last_event[0] = time.monotonic()
        ct.start()
    # quiet for 0.5 s and no re-dump running: the reader has everything it will get
    while time.monotonic() - last_event[0] < 0.5 or ct.resyncing:
        await asyncio.sleep(0.1)
    await ct.wait_resynced()
    ct.close()
    return model, ct


@pytest.mark.parametrize(("event_buffer", "late_reader"),
                         [(256 << 20, False), (4 << 20, True), (256 << 10, False)],
                         ids=["large", "overrun", "overrun-midstream"])
def test_burst_every_event_accounted_or_redumped(netns: NetnsSet, event_buffer: int,
                                                 late_reader: bool) -> None:
    ns = netns.add("burst")
    model, ct = asyncio.run(burst(ns, event_buffer, late_reader))
    st = ct.statistics().events
    print(st)
    table = conntrack_l_keys(ns)
    assert len(table) == N - DELETED
    assert set(model) == table
    assert st.decode_errors == 0
    if st.enobufs == 0:
        # nothing lost: every NEW and DESTROY arrived and was counted
        assert (st.new, st.destroy, st.resyncs) == (N, DELETED, 0)
    else:
        assert st.resyncs >= 1
    if late_reader:
        # a 4 MiB buffer cannot hold a 100k burst: the loss path must have been taken
        assert st.enobufs >= 1 and st.resyncs >= 1


def test_injection_echoes_never_reach_the_reader(netns: NetnsSet) -> None:
    ns = netns.add("echo")
    records = synthetic_records(N, seed=3)

    async def scenario() -> None:
        seen: list[CtEvent] = []
        with entered(ns):
            ct = Conntrack(on_events=seen.extend)
            control_seen: list[CtEvent] = []
            control = Conntrack(on_events=control_seen.extend, suppress_echoes=False)
        ct.start()
        control.start()
        try:
            # control: without the filter the reader does receive the echoes of its injections
            res = await control.requests.inject(records[:2000])
            assert res.failed == ()
            await asyncio.sleep(0.2)
            assert control.events.statistics().echoes == 2000
            control.close()
            before = ct.events.statistics()
            assert before.messages == 2000  # another socket's injections are real events

            res = await ct.requests.inject(records[2000:])
            assert res.failed == (), res.errno_counts()
            await asyncio.sleep(0.5)
            after = ct.events.statistics()
            # the kernel dropped all 98k echoes: not one receive on the reader
            assert after.recv_calls == before.recv_calls
            assert after.messages == before.messages and after.enobufs == 0
            assert len(await ct.requests.dump_all()) == N
        finally:
            ct.close()
            if not control.requests._sock._closed:  # type: ignore[attr-defined]
                control.close()

    asyncio.run(scenario())
