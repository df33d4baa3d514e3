"""The traffic tool's pure parts: wire format, duplicate window, plan, scheduler, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbsync.lab import farm, traffic
from lbsync.lab.farm import LabError
from lbsync.lab.traffic import (
    REPLY,
    REQUEST,
    Client,
    EchoServer,
    FlowSpec,
    NodeView,
    ProtocolError,
    SeqWindow,
)
from tests.unit.test_lab_farm import make_lab


def test_request_golden_bytes() -> None:
    data = traffic.encode_request(0x01020304, 7, 9)
    assert data == bytes.fromhex("4c54" "01" "00" "01020304" "00000007" "00000009")
    assert len(data) == REQUEST.size == 16
    assert traffic.decode_request(data) == (0x01020304, 7, 9)


def test_reply_golden_bytes_and_round_trip() -> None:
    data = traffic.encode_reply(1, 2, 3, 4, 5, ("198.18.1.1", 24883))
    assert len(data) == REPLY.size == 44
    assert data == bytes.fromhex(
        "4c54" "01" "01" "00000001" "00000002" "00000003" "00000004" "00000005" "6133" "04"
        "c6120101" + "00" * 12 + "00")
    r = traffic.decode_reply(data)
    assert (r.run, r.flow, r.seq, r.received, r.duplicates, r.peer) == \
        (1, 2, 3, 4, 5, ("198.18.1.1", 24883))
    r6 = traffic.decode_reply(traffic.encode_reply(1, 2, 3, 0, 0, ("2001:db8::100", 1)))
    assert r6.peer == ("2001:db8::100", 1)
    # An IPv4-mapped peer (dual-stack socket) is reported as IPv4.
    r4 = traffic.decode_reply(traffic.encode_reply(1, 2, 3, 0, 0, ("::ffff:198.18.0.100", 9)))
    assert r4.peer == ("198.18.0.100", 9)


@pytest.mark.parametrize("data", [
    b"", b"LT\x01\x00" + bytes(11), b"XX\x01\x00" + bytes(12), b"LT\x02\x00" + bytes(12),
    b"LT\x01\x01" + bytes(12),
])
def test_bad_requests(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        traffic.decode_request(data)


def test_bad_replies() -> None:
    good = traffic.encode_reply(1, 2, 3, 4, 5, ("198.18.1.1", 1))
    for bad in (good[:-1], b"XX" + good[2:], good[:26] + b"\x05" + good[27:],
                traffic.encode_request(1, 2, 3) + bytes(28)):
        with pytest.raises(ProtocolError):
            traffic.decode_reply(bad)


@given(st.lists(st.integers(0, 3 * traffic.WINDOW), max_size=300))
def test_seq_window_counts_exactly_within_the_window(seqs: list[int]) -> None:
    w = SeqWindow()
    seen: set[int] = set()
    new = dup = old = 0
    highest = -1
    for s in seqs:
        if s > highest or (highest - s < traffic.WINDOW and s not in seen):
            expect = "new"
        elif highest - s >= traffic.WINDOW:
            expect = "old"
        else:
            expect = "dup"
        got = w.record(s)
        assert got == (expect == "new")
        if expect == "new":
            seen.add(s)
            new += 1
            highest = max(highest, s)
        elif expect == "dup":
            dup += 1
        else:
            old += 1
    assert (w.received, w.duplicates, w.too_old) == (new, dup, old)


def test_echo_server_reports_duplicates_and_peer() -> None:
    srv = EchoServer(max_flows=1)
    peer = ("198.18.1.1", 1234)
    r = traffic.decode_reply(srv.answer(traffic.encode_request(5, 1, 0), peer) or b"")
    assert (r.received, r.duplicates, r.peer) == (1, 0, peer)
    r = traffic.decode_reply(srv.answer(traffic.encode_request(5, 1, 0), peer) or b"")
    assert (r.received, r.duplicates) == (1, 1)
    assert srv.answer(b"garbage", peer) is None
    # Beyond max_flows: answered, not tracked, counted.
    r = traffic.decode_reply(srv.answer(traffic.encode_request(5, 2, 0), peer) or b"")
    assert (r.received, r.duplicates) == (0, 0)
    assert srv.statistics() == {"requests": 3, "bad_frames": 1, "runs": 1, "flows": 1,
                                "untracked": 1, "evicted_runs": 0, "connections": 0}


def test_echo_server_evicts_the_oldest_run() -> None:
    srv = EchoServer(max_flows=10, max_runs=2)
    peer = ("198.18.0.100", 1)
    for run in (1, 2, 3):
        for flow in range(3):
            srv.answer(traffic.encode_request(run, flow, 0), peer)
    assert list(srv.runs) == [2, 3] and srv.tracked == 6 and srv.evicted_runs == 1
    # Run 1 comes back as new (its history is gone), evicting run 2.
    r = traffic.decode_reply(srv.answer(traffic.encode_request(1, 0, 0), peer) or b"")
    assert (r.received, r.duplicates) == (1, 0) and list(srv.runs) == [3, 1]


def test_plan_flows(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, ipv6=True)
    specs = traffic.plan_flows(lab, tcp=8, udp=4, mode="mixed", families=(4, 6))
    assert [s.proto for s in specs] == ["tcp"] * 8 + ["udp"] * 4
    assert [s.mode for s in specs[:4]] == ["plain", "snat", "dnat", "egress"]
    assert [s.family for s in specs[:8]] == [4] * 4 + [6] * 4
    by_mode = {(s.mode, s.family): s for s in specs}
    a4, a6 = farm.addresses(4), farm.addresses(6)
    assert by_mode[("plain", 4)].dst == (a4.server, farm.PLAIN_PORT)
    assert by_mode[("snat", 6)].dst == (a6.server, farm.SNAT_PORT)
    assert by_mode[("dnat", 4)].dst == (a4.outside_vip, farm.DNAT_PORT)
    egress = by_mode[("egress", 4)]
    assert egress.ns == lab.server_ns and egress.dst[0] == a4.client
    assert by_mode[("plain", 4)].ns == lab.client_ns
    one = traffic.plan_flows(lab, tcp=20, udp=0, mode="egress", egress_ports=1)
    assert {s.dst for s in one} == {(a4.client, farm.EGRESS_PORT)}
    with pytest.raises(LabError, match="--mode"):
        traffic.plan_flows(lab, tcp=1, udp=0, mode="sideways")
    with pytest.raises(LabError, match="--egress-ports"):
        traffic.plan_flows(lab, tcp=1, udp=0, egress_ports=0)
    with pytest.raises(LabError, match="IPv6"):
        traffic.plan_flows(make_lab(tmp_path, ipv6=False), tcp=1, udp=0, families=(6,))


def test_effective_rate_is_capped() -> None:
    assert traffic.effective_rate(1.0, 100, 5000.0) == 1.0
    assert traffic.effective_rate(10.0, 1000, 5000.0) == 5.0
    assert traffic.effective_rate(3.0, 0, 5000.0) == 3.0
    with pytest.raises(LabError):
        traffic.effective_rate(0.0, 1, 1.0)


def test_percentiles() -> None:
    assert traffic.percentiles([]) == {"p50": None, "p90": None, "p99": None, "max": None}
    xs = [float(i) for i in range(1, 101)]
    assert traffic.percentiles(xs) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert traffic.percentiles([3.0]) == {"p50": 3.0, "p90": 3.0, "p99": 3.0, "max": 3.0}


def _client(n: int = 2, rate: float = 10.0) -> Client:
    specs = [FlowSpec(i, "udp", "snat", 4, "ns", ("198.18.1.10", 5002)) for i in range(n)]
    c = Client(specs, run_id=9, rate=rate, gap_threshold=0.25)
    for f in c.flows:
        f.state = "open"
        f.src = ("198.18.0.100", 40000 + f.spec.id)
        f.opened = c.t0
    return c


def test_client_reply_bookkeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    c = _client()
    f = c.flows[0]
    clock = [c.t0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def reply(seq: int, at: float, peer: tuple[str, int] = ("198.18.1.1", 1100),
              rx: int = 1, run: int = 9, flow: int = 0) -> None:
        clock[0] = c.t0 + at
        c.on_reply(f, traffic.encode_reply(run, flow, seq, rx, 0, peer))

    f.sent = 5
    reply(0, 0.1)
    reply(1, 0.2, rx=2)
    reply(1, 0.25)                         # the same answer twice: a duplicate reply
    reply(2, 1.0, rx=3)                    # 0.8 s of silence: a gap
    reply(3, 1.1, peer=("198.18.1.1", 1200), rx=4)   # the NAT peer changed
    reply(4, 1.2, run=8)                   # another run's reply: ignored, counted
    reply(4, 1.2, flow=1)                  # another flow's reply on this socket: the same
    c.on_reply(f, b"junk")
    assert (f.replies, f.duplicate_replies, f.peer_changes, f.server_received) == (4, 1, 1, 4)
    assert c.bad_replies == 3
    assert f.first_reply == pytest.approx(c.t0 + 0.1)
    assert f.longest_silence == pytest.approx(0.8)
    assert [(round(a, 6), round(b, 6)) for a, b in f.gaps] == [(0.2, 1.0)]
    assert f.peer == ("198.18.1.1", 1200)


def test_report(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    c = _client(n=3, rate=10.0)
    t0 = c.t0
    c.sending_started = t0
    c.sending_stopped = t0 + 10.0
    a, b, dead = c.flows
    for f, last in ((a, 9.95), (b, 4.0)):
        f.sent, f.replies = 100, 100 if f is a else 40
        f.first_reply, f.last_reply = t0 + 0.1, t0 + last
        f.longest_silence = 0.1
    b.gaps = [(4.0, 10.0)]
    dead.state, dead.error = "reset", "connection reset"
    views = {0: NodeView(nodes=(1,), mark=3, node_packets=(5, 5), received_packets=5),
             1: NodeView(nodes=(2,), mark=4), 2: NodeView(nodes=())}
    monkeypatch.setattr(time, "monotonic", lambda: t0 + 11.0)
    rep = traffic.build_report(c, lab=make_lab(tmp_path), views=views, final=True,
                               generation=1, alive_window=1.0, requested_rate=10.0,
                               max_rate=5000.0)
    assert (rep["flows"], rep["alive"], rep["resets"], rep["connected"]) == (3, 1, 1, 3)
    assert rep["lost_replies"] == 60 and rep["messages_sent"] == 200
    assert rep["achieved_rate"] == 20.0 and rep["achieved_rate_per_flow"] == pytest.approx(6.6667)
    assert rep["forwarders"] == {"1": 1, "2": 1, "none": 1}
    pf = rep["per_flow"]
    assert pf[0]["node"] == 1 and pf[0]["mark"] == 3 and pf[0]["node_packets"] == [5, 5]
    assert pf[1]["longest_silence"] == 6.0 and pf[2]["node"] is None
    assert rep["longest_silence"]["max"] == 10.0   # the reset flow never answered
    assert rep["flows_with_gap"] == 1
    curve = {round(t, 1): n for t, n in traffic.alive_over_time(rep, step=1.0)}
    assert curve[0.1] == 2 and curve[3.1] == 2 and curve[4.1] == 1 and curve[9.1] == 1
    text = traffic.summary(rep)
    assert "alive 1" in text and "resets 1" in text and "node 1: 1" in text


class _FakeUDP:
    def __init__(self, i: int, sent: list[tuple[int, bytes]]) -> None:
        self.i = i
        self.sent = sent

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append((self.i, data))

    def close(self) -> None:
        pass


class _FakeLoop:
    """Just enough of a loop for the scheduler: a clock and one pending timer."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.pending: tuple[float, Any, tuple[Any, ...]] | None = None

    def time(self) -> float:
        return self.clock[0]

    def call_at(self, when: float, cb: Any, *args: Any) -> Any:
        self.pending = (when, cb, args)
        return self

    def cancel(self) -> None:
        self.pending = None

    def run_until(self, t: float) -> None:
        while self.pending is not None and self.pending[0] <= t:
            when, cb, args = self.pending
            self.pending = None
            self.clock[0] = max(self.clock[0], when)
            cb(*args)
        self.clock[0] = t


def test_scheduler_sends_at_the_rate_and_skips_after_a_stall(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    c = _client(n=4, rate=50.0)
    sent: list[tuple[int, bytes]] = []
    for f in c.flows:
        f.transport = _FakeUDP(f.spec.id, sent)  # type: ignore[assignment]
    loop = _FakeLoop(clock)
    c.start_sending(loop)  # type: ignore[arg-type]
    loop.run_until(1000.499)
    per_flow = [sum(1 for i, _ in sent if i == k) for k in range(4)]
    assert per_flow == [25, 25, 25, 25]     # 50/s for 0.5 s, phases spread over 20 ms
    # Sequence numbers count up per flow from 0.
    seqs = [traffic.decode_request(d)[2] for i, d in sent if i == 0]
    assert seqs == list(range(25)) and c.flows[0].sent == 25
    # A 1 s stall of the loop: the missed slots are skipped, not sent in a burst.
    clock[0] = 1001.5
    loop.run_until(1001.5)
    assert [sum(1 for i, _ in sent if i == k) for k in range(4)] == [26] * 4
    loop.run_until(1001.999)
    counts = [sum(1 for i, _ in sent if i == k) for k in range(4)]
    assert all(50 <= n <= 51 for n in counts), counts   # the rate again, same phases
    c.stop_sending()
    loop.run_until(1003.0)
    assert len(sent) == sum(counts)
