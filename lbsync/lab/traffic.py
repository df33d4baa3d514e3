"""The lab traffic tool: long-lived TCP connections and UDP flows through the farm, and a report.

Two processes, each one asyncio (uvloop) loop with many sockets:

- the **server** (``python -m lbsync.lab.traffic serve --lab P``), one per lab, started on
  demand by :func:`ensure_server` in the server namespace. It listens in the server namespace
  (plain, ingress-SNAT and DNAT-target ports) and in the client namespace (the "outside
  servers" that egress flows reach), creating each socket in its namespace with ``setns``.
  It answers every request with the sequence number, the source address and port it saw (so
  NAT changes show) and how many distinct requests of that flow it has received and how many
  duplicates (so "every packet exactly once" is checked per flow).
- the **client** (``python -m lbsync.lab.traffic client --lab P ...``), one per run, usually
  driven through :class:`TrafficRun`. It opens the flows (client namespace for inbound modes,
  server namespace for egress flows), sends one request per flow every ``1/rate`` seconds from
  one deadline heap (no task per flow), and on SIGUSR1 writes an interim report, on SIGTERM or
  at the end of ``--duration`` a final one: flows alive, resets, errors, NAT peer changes,
  longest silence per flow (percentiles), a per-flow timeline (first/last reply, gaps) and,
  from every node's conntrack table, which node forwarded each flow.

Wire format (big-endian, versioned): request ``"LT" ver=1 kind=0 run flow seq`` (16 bytes),
reply ``"LT" ver=1 kind=1 run flow seq received duplicates peer_port peer_family peer_addr``
(44 bytes). TCP carries back-to-back fixed-size frames; UDP one frame per datagram.

Times in reports are seconds since the run's start (``t0``); ``t0_monotonic`` (CLOCK_MONOTONIC,
shared by every namespace of the host) and ``t0_wall`` let drills align them with their own
events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import heapq
import ipaddress
import json
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from lbsync.lab import farm
from lbsync.lab.farm import Lab, LabError

log = logging.getLogger(__name__)

MAGIC = b"LT"
VERSION = 1
REQUEST = struct.Struct("!2sBBIII")
REPLY = struct.Struct("!2sBBIIIIIHB16sx")
KIND_REQUEST = 0
KIND_REPLY = 1

MODES = ("plain", "snat", "dnat", "egress")
DEFAULT_MAX_RATE = 5000.0     # messages per second over all flows (2 cores: leave room)
DEFAULT_CONNECT_TIMEOUT = 5.0
CONNECT_CONCURRENCY = 256
WINDOW = 1024                 # server: duplicate detection window per flow, sequence numbers
MAX_SERVER_FLOWS = 200_000    # server: flows tracked; beyond, counted in `untracked`
MAX_SERVER_RUNS = 16          # server: runs tracked; a new run evicts the oldest
MAX_GAPS = 64                 # client: gaps recorded per flow
NOFILE_WANTED = 1 << 20
SERVER_READY = "traffic-server.ready"
SERVER_PID = "traffic-server.pid"
SERVER_LOG = "traffic-server.log"

CLONE_NEWNET = 0x40000000


class ProtocolError(ValueError):
    """A frame is malformed (wrong size, magic, version or kind)."""


# --------------------------------------------------------------------------------------------
# Wire format


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply: what the server saw of one request."""

    run: int
    flow: int
    seq: int
    received: int
    duplicates: int
    peer: tuple[str, int]


def encode_request(run: int, flow: int, seq: int) -> bytes:
    return REQUEST.pack(MAGIC, VERSION, KIND_REQUEST, run, flow, seq)


def decode_request(data: bytes) -> tuple[int, int, int]:
    """(run, flow, seq) of a request frame."""
    if len(data) != REQUEST.size:
        raise ProtocolError(f"request must be {REQUEST.size} bytes, not {len(data)}")
    magic, ver, kind, run, flow, seq = REQUEST.unpack(data)
    if magic != MAGIC or ver != VERSION or kind != KIND_REQUEST:
        raise ProtocolError("not a version-1 request")
    return run, flow, seq


def encode_reply(run: int, flow: int, seq: int, received: int, duplicates: int,
                 peer: tuple[str, int]) -> bytes:
    addr = ipaddress.ip_address(peer[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    packed = addr.packed.ljust(16, b"\0")
    return REPLY.pack(MAGIC, VERSION, KIND_REPLY, run, flow, seq,
                      min(received, 0xFFFFFFFF), min(duplicates, 0xFFFFFFFF), peer[1],
                      addr.version, packed)


def decode_reply(data: bytes) -> Reply:
    if len(data) != REPLY.size:
        raise ProtocolError(f"reply must be {REPLY.size} bytes, not {len(data)}")
    magic, ver, kind, run, flow, seq, rx, dup, port, fam, packed = REPLY.unpack(data)
    if magic != MAGIC or ver != VERSION or kind != KIND_REPLY or fam not in (4, 6):
        raise ProtocolError("not a version-1 reply")
    addr = ipaddress.ip_address(packed[:4] if fam == 4 else packed)
    return Reply(run=run, flow=flow, seq=seq, received=rx, duplicates=dup,
                 peer=(str(addr), port))


class SeqWindow:
    """Server side, per flow: distinct sequence numbers received, and duplicates.

    Exact within the last :data:`WINDOW` numbers below the highest seen; anything older is
    counted in ``too_old`` (neither new nor a duplicate).
    """

    __slots__ = ("bits", "duplicates", "highest", "received", "too_old")

    def __init__(self) -> None:
        self.highest = -1
        self.bits = 0         # bit i set: highest - i was received
        self.received = 0
        self.duplicates = 0
        self.too_old = 0

    def record(self, seq: int) -> bool:
        """Note ``seq``; True if it is new."""
        if seq > self.highest:
            shift = seq - self.highest if self.highest >= 0 else WINDOW
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1)
            self.highest = seq
            self.received += 1
            return True
        off = self.highest - seq
        if off >= WINDOW:
            self.too_old += 1
            return False
        if self.bits >> off & 1:
            self.duplicates += 1
            return False
        self.bits |= 1 << off
        self.received += 1
        return True


# --------------------------------------------------------------------------------------------
# Namespaces and limits


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block with the calling thread in network namespace ``name`` (None: stay).

    Sockets created inside stay in that namespace for good; nothing may ``await`` inside.
    """
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(farm.NETNS_DIR / name, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (as far as allowed); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted if hard == resource.RLIM_INFINITY else max(hard, wanted))
    for candidate in (target, hard):
        if candidate == resource.RLIM_INFINITY or candidate <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (candidate, max(candidate, hard)
                                if hard != resource.RLIM_INFINITY else hard))
            return candidate
        except (ValueError, OSError):
            continue
    return soft


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()


# --------------------------------------------------------------------------------------------
# Server


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening endpoint of the server."""

    ns: str
    family: int
    proto: str
    port: int


def server_listeners(lab: Lab) -> list[Listener]:
    out: list[Listener] = []
    for fam in lab.families:
        for proto in ("tcp", "udp"):
            for port in (farm.PLAIN_PORT, farm.SNAT_PORT, farm.SERVICE_PORT):
                out.append(Listener(lab.server_ns, fam, proto, port))
            for k in range(farm.EGRESS_PORTS):
                out.append(Listener(lab.client_ns, fam, proto, farm.EGRESS_PORT + k))
    return out


class EchoServer:
    """The server's state: per-run, per-flow sequence windows and counters.

    Bounded: at most ``max_runs`` runs (a new run evicts the oldest, counted in
    ``evicted_runs``) and ``max_flows`` flows over all runs (beyond, requests are answered
    without duplicate tracking and counted in ``untracked``).
    """

    def __init__(self, max_flows: int = MAX_SERVER_FLOWS,
                 max_runs: int = MAX_SERVER_RUNS) -> None:
        self.runs: dict[int, dict[int, SeqWindow]] = {}   # insertion order = age
        self.max_flows = max_flows
        self.max_runs = max_runs
        self.tracked = 0
        self.requests = 0
        self.bad_frames = 0
        self.untracked = 0
        self.evicted_runs = 0
        self.connections = 0

    def answer(self, data: bytes, peer: tuple[str, int]) -> bytes | None:
        try:
            run, flow, seq = decode_request(data)
        except ProtocolError:
            self.bad_frames += 1
            return None
        self.requests += 1
        flows = self.runs.get(run)
        if flows is None:
            while len(self.runs) >= self.max_runs:
                oldest = next(iter(self.runs))
                self.tracked -= len(self.runs.pop(oldest))
                self.evicted_runs += 1
            flows = self.runs[run] = {}
        w = flows.get(flow)
        if w is None:
            if self.tracked >= self.max_flows:
                self.untracked += 1
                return encode_reply(run, flow, seq, 0, 0, peer)
            w = flows[flow] = SeqWindow()
            self.tracked += 1
        w.record(seq)
        return encode_reply(run, flow, seq, w.received, w.duplicates, peer)

    def statistics(self) -> dict[str, int]:
        return {"requests": self.requests, "bad_frames": self.bad_frames,
                "runs": len(self.runs), "flows": self.tracked, "untracked": self.untracked,
                "evicted_runs": self.evicted_runs, "connections": self.connections}


class _EchoTCP(asyncio.Protocol):
    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("0.0.0.0", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: cast, never isinstance.
        self.transport = cast(asyncio.Transport, transport)
        name = transport.get_extra_info("peername")
        self.peer = (name[0], name[1])
        self.server.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = REQUEST.size
        out = []
        while len(self.buf) >= n:
            frame = bytes(self.buf[:n])
            del self.buf[:n]
            reply = self.server.answer(frame, self.peer)
            if reply is None:  # garbage: drop the connection
                assert self.transport is not None
                self.transport.close()
                return
            out.append(reply)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections -= 1


class _EchoUDP(asyncio.DatagramProtocol):
    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = self.server.answer(data, (addr[0], addr[1]))
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _listening_socket(lst: Listener) -> socket.socket:
    fam = socket.AF_INET if lst.family == 4 else socket.AF_INET6
    kind = socket.SOCK_STREAM if lst.proto == "tcp" else socket.SOCK_DGRAM
    with in_netns(lst.ns):
        s = socket.socket(fam, kind)
    try:
        if lst.proto == "tcp":
            # Rebind over TIME_WAIT. Never on UDP: there it would let a second server share
            # the port and steal datagrams.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("0.0.0.0" if lst.family == 4 else "::", lst.port))
        if lst.proto == "tcp":
            s.listen(4096)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


async def _serve(lab: Lab, ready: Path | None) -> None:
    loop = asyncio.get_running_loop()
    server = EchoServer()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    closers: list[Callable[[], None]] = []
    for lst in server_listeners(lab):
        s = _listening_socket(lst)
        if lst.proto == "tcp":
            srv = await loop.create_server(lambda: _EchoTCP(server), sock=s, backlog=4096)
            closers.append(srv.close)
        else:
            tr, _ = await loop.create_datagram_endpoint(lambda: _EchoUDP(server), sock=s)
            closers.append(tr.close)
    if ready is not None:
        _write_atomic(ready, json.dumps({"pid": os.getpid()}) + "\n")
    log.info("traffic.server.ready lab=%s listeners=%d", lab.prefix, len(closers))
    await stop.wait()
    for close in closers:
        close()
    log.info("traffic.server.stopped %s", server.statistics())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def server_running(lab: Lab) -> int | None:
    """The pid of the lab's traffic server if it runs (in the lab's server namespace)."""
    try:
        pid = int((lab.directory / SERVER_PID).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    pids = farm.netns_pids([lab.server_ns]).get(lab.server_ns, [])
    return pid if pid in pids else None


def ensure_server(lab: Lab, timeout: float = 15.0) -> int:
    """Start the lab's traffic server unless it runs; return its pid once it listens.

    Safe against a concurrent start: each start waits on its own ready file, and a server that
    cannot bind because another one just did defers to that one.
    """
    pid = server_running(lab)
    if pid is not None:
        return pid
    ready = lab.directory / f"{SERVER_READY}.{os.getpid()}.{time.monotonic_ns()}"
    with open(lab.directory / SERVER_LOG, "ab") as logf:
        proc = lab.popen(lab.server_ns,
                         [sys.executable, "-m", "lbsync.lab.traffic", "serve", "--lab",
                          lab.prefix, "--lab-root", str(lab.directory.parent),
                          "--ready", str(ready)],
                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                         start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if ready.exists():
                pid = int(json.loads(ready.read_text())["pid"])
                _write_atomic(lab.directory / SERVER_PID, f"{pid}\n")
                return pid
            if proc.poll() is not None:
                time.sleep(0.1)
                other = server_running(lab)
                if other is not None:
                    return other
                raise LabError(f"traffic server exited with {proc.returncode} "
                               f"(see {lab.directory / SERVER_LOG})")
            time.sleep(0.02)
        proc.kill()
        raise LabError(f"traffic server not ready within {timeout} s")
    finally:
        ready.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Client: the plan


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """One flow to open: where from (namespace) and where to."""

    id: int
    proto: str
    mode: str
    family: int
    ns: str
    dst: tuple[str, int]


def plan_flows(lab: Lab, *, tcp: int, udp: int, mode: str = "mixed",
               families: Sequence[int] = (4,), egress_ports: int = farm.EGRESS_PORTS
               ) -> list[FlowSpec]:
    """The flows of a run: TCP first, then UDP; modes and families assigned round-robin."""
    if mode != "mixed" and mode not in MODES:
        raise LabError(f"--mode must be mixed or one of {', '.join(MODES)}, not {mode!r}")
    if not 1 <= egress_ports <= farm.EGRESS_PORTS:
        raise LabError(f"--egress-ports must be 1..{farm.EGRESS_PORTS}")
    for f in families:
        lab.addr(f)  # LabError when the lab lacks the family
    modes = MODES if mode == "mixed" else (mode,)
    out: list[FlowSpec] = []
    for proto, count in (("tcp", tcp), ("udp", udp)):
        for k in range(count):
            m = modes[k % len(modes)]
            fam = families[(k // len(modes)) % len(families)]
            a = lab.addr(fam)
            if m == "plain":
                ns, dst = lab.client_ns, (a.server, farm.PLAIN_PORT)
            elif m == "snat":
                ns, dst = lab.client_ns, (a.server, farm.SNAT_PORT)
            elif m == "dnat":
                ns, dst = lab.client_ns, (a.outside_vip, farm.DNAT_PORT)
            else:
                ns, dst = lab.server_ns, (a.client, farm.EGRESS_PORT + k % egress_ports)
            out.append(FlowSpec(id=len(out), proto=proto, mode=m, family=fam, ns=ns, dst=dst))
    return out


def effective_rate(rate: float, flows: int, max_rate: float) -> float:
    """Per-flow message rate after the global cap."""
    if rate <= 0 or max_rate <= 0:
        raise LabError("--rate and --max-rate must be > 0")
    if flows == 0:
        return rate
    return min(rate, max_rate / flows)


# --------------------------------------------------------------------------------------------
# Client: flows


@dataclass(slots=True)
class Flow:
    """The client's live view of one flow (monotonic times)."""

    spec: FlowSpec
    state: str = "connecting"    # connecting | open | reset | error | closed | failed
    error: str = ""
    src: tuple[str, int] | None = None
    transport: asyncio.BaseTransport | None = None
    opened: float | None = None
    seq: int = 0                 # next sequence number to send
    sent: int = 0
    replies: int = 0
    duplicate_replies: int = 0
    errors: int = 0
    skipped: int = 0             # sends skipped because the socket's buffer was full
    peer: tuple[str, int] | None = None
    peer_changes: int = 0
    server_received: int = 0
    server_duplicates: int = 0
    first_reply: float | None = None
    last_reply: float | None = None
    longest_silence: float = 0.0
    gaps: list[tuple[float, float]] = field(default_factory=list)
    answered: set[int] = field(default_factory=set)
    buf: bytearray = field(default_factory=bytearray)


class Client:
    """The client's state and the send scheduler (one deadline heap)."""

    def __init__(self, specs: Sequence[FlowSpec], *, run_id: int, rate: float,
                 gap_threshold: float) -> None:
        self.flows = [Flow(s) for s in specs]
        self.run_id = run_id
        self.rate = rate
        self.interval = 1.0 / rate
        self.gap_threshold = gap_threshold
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.sending_started: float | None = None
        self.sending_stopped: float | None = None
        self.heap: list[tuple[float, int]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.bad_replies = 0

    # ---- replies

    def on_reply(self, flow: Flow, data: bytes) -> None:
        now = time.monotonic()
        try:
            r = decode_reply(data)
        except ProtocolError:
            self.bad_replies += 1
            return
        if r.run != self.run_id or r.flow != flow.spec.id:
            self.bad_replies += 1
            return
        if r.seq in flow.answered:
            flow.duplicate_replies += 1
            return
        flow.answered.add(r.seq)
        if len(flow.answered) > 2 * WINDOW:
            floor = flow.seq - WINDOW
            flow.answered = {s for s in flow.answered if s >= floor}
        flow.replies += 1
        if flow.peer is not None and r.peer != flow.peer:
            flow.peer_changes += 1
        flow.peer = r.peer
        flow.server_received = max(flow.server_received, r.received)
        flow.server_duplicates = max(flow.server_duplicates, r.duplicates)
        if flow.last_reply is None:
            flow.first_reply = now
        else:
            silence = now - flow.last_reply
            flow.longest_silence = max(flow.longest_silence, silence)
            if silence > self.gap_threshold and len(flow.gaps) < MAX_GAPS:
                flow.gaps.append((flow.last_reply - self.t0, now - self.t0))
        flow.last_reply = now

    # ---- sending

    def start_sending(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        self.sending_started = now
        n = max(1, len(self.flows))
        for i, f in enumerate(self.flows):
            if f.state == "open":
                self.heap.append((now + self.interval * i / n, i))
        heapq.heapify(self.heap)
        self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.heap and self.sending_stopped is None:
            # loop.time() and time.monotonic() are the same clock under asyncio and uvloop
            # only by convention: convert through the difference to stay exact.
            delay = max(0.0, self.heap[0][0] - time.monotonic())
            self.timer = loop.call_at(loop.time() + delay, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        while self.heap and self.heap[0][0] <= now:
            due, i = heapq.heappop(self.heap)
            f = self.flows[i]
            if f.state != "open":
                continue
            self._send(f)
            nxt = due + self.interval
            if nxt < now:  # fell behind (a stall): skip the missed slots, keep the phase
                nxt += self.interval * ((now - nxt) // self.interval + 1)
            heapq.heappush(self.heap, (nxt, i))
        self._arm(loop)

    def _send(self, f: Flow) -> None:
        data = encode_request(self.run_id, f.spec.id, f.seq)
        if f.transport is None:
            return
        if f.spec.proto == "tcp":
            tr = cast(asyncio.Transport, f.transport)
            if tr.get_write_buffer_size() > 65536:
                f.skipped += 1
                return
            tr.write(data)
        else:
            cast(asyncio.DatagramTransport, f.transport).sendto(data)
        f.seq += 1
        f.sent += 1

    def stop_sending(self) -> None:
        if self.sending_stopped is None:
            self.sending_stopped = time.monotonic()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def outstanding(self) -> int:
        return sum(f.sent - f.replies for f in self.flows if f.state == "open")


class _FlowTCP(asyncio.Protocol):
    def __init__(self, client: Client, flow: Flow) -> None:
        self.client = client
        self.flow = flow

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.flow.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.flow.buf
        buf += data
        n = REPLY.size
        while len(buf) >= n:
            self.client.on_reply(self.flow, bytes(buf[:n]))
            del buf[:n]

    def eof_received(self) -> bool | None:
        if self.flow.state == "open":
            self.flow.state = "closed"
            self.flow.error = "closed by the server"
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        f = self.flow
        if f.state != "open":
            return
        if isinstance(exc, ConnectionResetError):
            f.state, f.error = "reset", "connection reset"
        elif exc is not None:
            f.state, f.error = "error", f"{type(exc).__name__}: {exc}"
        else:
            f.state, f.error = "closed", "closed"


class _FlowUDP(asyncio.DatagramProtocol):
    def __init__(self, client: Client, flow: Flow) -> None:
        self.client = client
        self.flow = flow

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.flow.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.client.on_reply(self.flow, data)

    def error_received(self, exc: Exception) -> None:
        self.flow.errors += 1
        self.flow.error = f"{type(exc).__name__}: {exc}"


async def _open(client: Client, flow: Flow, sem: asyncio.Semaphore, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    spec = flow.spec
    fam = socket.AF_INET if spec.family == 4 else socket.AF_INET6
    kind = socket.SOCK_STREAM if spec.proto == "tcp" else socket.SOCK_DGRAM
    async with sem:
        try:
            with in_netns(spec.ns):
                s = socket.socket(fam, kind)
        except OSError as exc:
            flow.state, flow.error = "failed", f"socket: {exc}"
            return
        try:
            s.setblocking(False)
            if spec.proto == "tcp":
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await asyncio.wait_for(loop.sock_connect(s, spec.dst), timeout)
                flow.src = _addr(s.getsockname())
                flow.state = "open"   # before the protocol can report a loss
                await loop.create_connection(lambda: _FlowTCP(client, flow), sock=s)
            else:
                s.connect(spec.dst)
                flow.src = _addr(s.getsockname())
                flow.state = "open"
                await loop.create_datagram_endpoint(lambda: _FlowUDP(client, flow), sock=s)
            flow.opened = time.monotonic()
        except (TimeoutError, OSError) as exc:
            s.close()
            flow.state = "failed"
            flow.error = "connect timed out" if isinstance(exc, TimeoutError) \
                else f"connect: {exc}"


def _addr(name: Any) -> tuple[str, int]:
    return (str(name[0]), int(name[1]))


# --------------------------------------------------------------------------------------------
# Client: the report


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 90, 99, 100)
                ) -> dict[str, float | None]:
    """Nearest-rank percentiles (``p100`` is the maximum); None for an empty input."""
    xs = sorted(values)
    out: dict[str, float | None] = {}
    for p in points:
        key = "max" if p == 100 else f"p{p:g}"
        if not xs:
            out[key] = None
            continue
        rank = max(1, -(-len(xs) * p // 100))  # ceil(n * p / 100)
        out[key] = round(xs[int(rank) - 1], 4)
    return out


@dataclass(frozen=True, slots=True)
class NodeView:
    """Where a flow lives in the farm's kernels (from conntrack)."""

    nodes: tuple[int, ...]                 # nodes holding a confirmed entry of the flow
    mark: int | None = None
    node_packets: tuple[int, int] | None = None      # owner's (orig, reply) packet counts
    received_packets: int | None = None              # far end's orig packet count


def lookup_nodes(lab: Lab, flows: Sequence[Flow]) -> dict[int, NodeView]:
    """flow id -> the nodes whose conntrack holds the flow, and packet counts (acct)."""
    per_node: dict[int, list[farm.CtEntry]] = {}
    for i in lab.node_ids:
        # A node a drill has taken away (namespace gone) simply holds nothing.
        with contextlib.suppress(LabError):
            per_node[i] = farm.conntrack_entries(lab.node_ns(i))
    ends: dict[str, list[farm.CtEntry]] = {}
    for ns in (lab.client_ns, lab.server_ns):
        with contextlib.suppress(LabError):
            ends[ns] = farm.conntrack_entries(ns)
    index: dict[tuple[Any, ...], list[tuple[int, farm.CtEntry]]] = {}
    for node, entries in per_node.items():
        for e in entries:
            o = e.orig
            index.setdefault(farm.flow_key(e.proto, o.src, o.sport, o.dst, o.dport),
                             []).append((node, e))
    far: dict[str, dict[tuple[Any, ...], farm.CtEntry]] = {}
    for ns, entries in ends.items():
        far[ns] = {farm.flow_key(e.proto, e.orig.src, e.orig.sport, e.orig.dst, e.orig.dport): e
                   for e in entries}
    out: dict[int, NodeView] = {}
    for f in flows:
        if f.src is None:
            continue
        key = farm.flow_key(f.spec.proto, f.src[0], f.src[1], f.spec.dst[0], f.spec.dst[1])
        hits = index.get(key, [])
        if not hits:
            out[f.spec.id] = NodeView(nodes=())
            continue
        node, e = hits[0]
        # The far end (server, or the outside server of an egress flow) sees the owner's
        # reply tuple reversed.
        far_ns = lab.client_ns if f.spec.mode == "egress" else lab.server_ns
        r = e.reply
        fe = far.get(far_ns, {}).get(farm.flow_key(e.proto, r.dst, r.dport, r.src, r.sport))
        pk = (e.orig.packets, e.reply.packets)
        out[f.spec.id] = NodeView(
            nodes=tuple(sorted(n for n, _ in hits)), mark=e.mark,
            node_packets=(pk[0], pk[1]) if pk[0] is not None and pk[1] is not None else None,
            received_packets=fe.orig.packets if fe is not None else None)
    return out


def build_report(client: Client, *, lab: Lab | None, views: dict[int, NodeView] | None,
                 final: bool, generation: int, alive_window: float,
                 requested_rate: float, max_rate: float) -> dict[str, Any]:
    """The JSON report (see the module docstring)."""
    now = time.monotonic()
    end = client.sending_stopped or now
    start = client.sending_started or end
    t0 = client.t0
    per_flow: list[dict[str, Any]] = []
    silences: list[float] = []
    states: dict[str, int] = {}
    forwarders: dict[str, int] = {}
    alive = 0
    for f in client.flows:
        states[f.state] = states.get(f.state, 0) + 1
        longest = f.longest_silence
        if f.state == "open" or f.state in ("reset", "error", "closed"):
            since = f.last_reply if f.last_reply is not None else (f.opened or start)
            longest = max(longest, end - since)
        if f.state != "failed":
            silences.append(longest)
        is_alive = (f.state == "open" and f.last_reply is not None
                    and end - f.last_reply <= alive_window)
        alive += is_alive
        v = views.get(f.spec.id) if views is not None else None
        if v is not None:
            key = ",".join(map(str, v.nodes)) if v.nodes else "none"
            forwarders[key] = forwarders.get(key, 0) + 1
        per_flow.append({
            "id": f.spec.id, "proto": f.spec.proto, "mode": f.spec.mode,
            "family": f.spec.family, "src": list(f.src) if f.src else None,
            "dst": list(f.spec.dst), "peer": list(f.peer) if f.peer else None,
            "state": f.state, "alive": is_alive, "error": f.error, "sent": f.sent,
            "replies": f.replies, "duplicate_replies": f.duplicate_replies,
            "errors": f.errors, "skipped": f.skipped, "peer_changes": f.peer_changes,
            "server_received": f.server_received, "server_duplicates": f.server_duplicates,
            "first_reply": _rel(f.first_reply, t0), "last_reply": _rel(f.last_reply, t0),
            "longest_silence": round(longest, 4),
            "gaps": [[round(a, 4), round(b, 4)] for a, b in f.gaps],
            "node": v.nodes[0] if v is not None and len(v.nodes) == 1 else None,
            "nodes": list(v.nodes) if v is not None else None,
            "mark": v.mark if v is not None else None,
            "node_packets": list(v.node_packets) if v and v.node_packets else None,
            "received_packets": v.received_packets if v is not None else None,
        })
    sent = sum(f.sent for f in client.flows)
    elapsed = max(1e-9, end - start) if client.sending_started else 0.0
    opened = [f for f in client.flows if f.state != "failed" and f.opened is not None]
    return {
        "version": 1, "final": final, "generation": generation,
        "lab": lab.prefix if lab else None, "run": client.run_id,
        "t0_wall": client.t0_wall, "t0_monotonic": t0,
        "sending": [_rel(client.sending_started, t0), _rel(client.sending_stopped, t0)],
        "duration": round(elapsed, 3),
        "flows": len(client.flows),
        "tcp": sum(f.spec.proto == "tcp" for f in client.flows),
        "udp": sum(f.spec.proto == "udp" for f in client.flows),
        "connected": len(opened), "connect_failures": states.get("failed", 0),
        "alive": alive, "alive_window": alive_window,
        "resets": states.get("reset", 0),
        "errors": states.get("error", 0) + states.get("closed", 0)
        + sum(1 for f in client.flows if f.state == "open" and f.errors),
        "states": states,
        "nat_peer_changes": sum(f.peer_changes for f in client.flows),
        "flows_with_peer_change": sum(1 for f in client.flows if f.peer_changes),
        "messages_sent": sent, "replies": sum(f.replies for f in client.flows),
        "lost_replies": sum(f.sent - f.replies for f in client.flows),
        "duplicate_replies": sum(f.duplicate_replies for f in client.flows),
        "server_duplicates": sum(f.server_duplicates for f in client.flows),
        "bad_replies": client.bad_replies,
        "rate_requested": requested_rate, "rate_per_flow": round(client.rate, 4),
        "max_rate": max_rate,
        "achieved_rate": round(sent / elapsed, 2) if elapsed else 0.0,
        "achieved_rate_per_flow": round(sent / elapsed / max(1, len(opened)), 4)
        if elapsed else 0.0,
        "gap_threshold": client.gap_threshold,
        "longest_silence": percentiles(silences),
        "flows_with_gap": sum(1 for f in client.flows if f.gaps),
        "forwarders": forwarders,
        "per_flow": per_flow,
    }


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 4)


def alive_over_time(report: dict[str, Any], step: float = 0.1) -> list[tuple[float, int]]:
    """Flows answering at each instant of the sending period, from the moment every flow has
    had its first reply: a flow counts as alive at ``t`` unless ``t`` falls inside one of its
    gaps or more than ``alive_window`` after its last reply; a flow that never answered never
    counts. (For drills: flows-alive-over-time plots come from the per-flow timelines.)"""
    start, stop = report["sending"]
    if start is None or stop is None:
        return []
    firsts = [f["first_reply"] for f in report["per_flow"] if f["first_reply"] is not None]
    start = max([start, *firsts])
    out: list[tuple[float, int]] = []
    t = start
    while t <= stop + 1e-9:
        n = 0
        for f in report["per_flow"]:
            fr, lr = f["first_reply"], f["last_reply"]
            if fr is None or t < fr or t > lr + report["alive_window"]:
                continue
            if any(a < t < b for a, b in f["gaps"]):
                continue
            n += 1
        out.append((round(t, 4), n))
        t += step
    return out


# --------------------------------------------------------------------------------------------
# Client: the process


async def _client_main(args: argparse.Namespace) -> int:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    lab = Lab.load(args.lab, root=Path(args.lab_root))
    families = tuple(int(c) for c in args.family)
    specs = plan_flows(lab, tcp=args.tcp, udp=args.udp, mode=args.mode, families=families,
                       egress_ports=args.egress_ports)
    rate = effective_rate(args.rate, len(specs), args.max_rate)
    interval = 1.0 / rate
    gap = args.gap if args.gap is not None else max(2.0 * interval, 0.05)
    alive_window = max(3.0 * interval, 1.0)
    run_id = args.run_id if args.run_id is not None else (os.getpid() << 8 | int(time.time())
                                                          & 0xFF) & 0xFFFFFFFF
    client = Client(specs, run_id=run_id, rate=rate, gap_threshold=gap)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    generation = 0
    report_path = Path(args.report) if args.report else None

    async def write_report(final: bool) -> dict[str, Any]:
        nonlocal generation
        generation += 1
        views = None
        if not args.no_lookup:
            try:
                views = await loop.run_in_executor(None, lookup_nodes, lab, client.flows)
            except LabError as exc:
                log.warning("traffic.lookup_failed error=%s", exc)
        rep = build_report(client, lab=lab, views=views, final=final, generation=generation,
                           alive_window=alive_window, requested_rate=args.rate,
                           max_rate=args.max_rate)
        if report_path is not None:
            _write_atomic(report_path, json.dumps(rep) + "\n")
        return rep

    snapshots: set[asyncio.Task[dict[str, Any]]] = set()

    def snapshot() -> None:
        t = loop.create_task(write_report(False))
        snapshots.add(t)
        t.add_done_callback(snapshots.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, snapshot)

    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    opening = asyncio.gather(*(_open(client, f, sem, args.connect_timeout)
                               for f in client.flows))
    stopper = asyncio.ensure_future(stop.wait())
    waiters: set[asyncio.Future[Any]] = {opening, stopper}
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if not opening.done():
        opening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await opening
    client.start_sending(loop)
    if args.ready:
        _write_atomic(Path(args.ready), json.dumps({
            "pid": os.getpid(), "run": run_id, "flows": len(specs), "nofile": nofile,
            "connected": sum(f.state == "open" for f in client.flows),
            "failed": sum(f.state == "failed" for f in client.flows)}) + "\n")
    if not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stopper), args.duration)
    client.stop_sending()
    stopper.cancel()
    # Drain: let outstanding replies arrive, then let delayed ACKs settle before counting.
    deadline = time.monotonic() + args.drain
    while client.outstanding() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(min(0.3, args.drain))
    for t in list(snapshots):
        with contextlib.suppress(Exception):
            await t
    rep = await write_report(True)
    for f in client.flows:
        if f.transport is not None:
            f.state = "closed" if f.state == "open" else f.state
            f.transport.close()
    await asyncio.sleep(0)
    if args.json:
        sys.stdout.write(json.dumps(rep) + "\n")
    else:
        sys.stdout.write(summary(rep))
    return 0


def summary(rep: dict[str, Any]) -> str:
    """A human summary of a report."""
    sil = rep["longest_silence"]
    fw = ", ".join(f"node {k}: {v}" for k, v in sorted(rep["forwarders"].items()))
    return (
        f"flows {rep['flows']} (tcp {rep['tcp']}, udp {rep['udp']}): connected "
        f"{rep['connected']}, alive {rep['alive']}, resets {rep['resets']}, "
        f"errors {rep['errors']}, NAT peer changes {rep['nat_peer_changes']}\n"
        f"messages {rep['messages_sent']} in {rep['duration']} s: achieved "
        f"{rep['achieved_rate']}/s ({rep['achieved_rate_per_flow']}/s per flow, requested "
        f"{rep['rate_requested']}), lost replies {rep['lost_replies']}, server duplicates "
        f"{rep['server_duplicates']}\n"
        f"longest silence per flow: p50 {sil['p50']} p90 {sil['p90']} p99 {sil['p99']} "
        f"max {sil['max']} s; flows with a gap > {rep['gap_threshold']:.3g} s: "
        f"{rep['flows_with_gap']}\n"
        f"forwarded by: {fw or 'unknown'}\n")


# --------------------------------------------------------------------------------------------
# Python API for tests and drills


class TrafficRun:
    """A client process running in the lab's client namespace (see :meth:`start`)."""

    def __init__(self, lab: Lab, proc: subprocess.Popen[bytes], report: Path, ready: Path,
                 output: Path) -> None:
        self.lab = lab
        self.proc = proc
        self.report_path = report
        self.ready_path = ready
        self.output_path = output
        self.last_report: dict[str, Any] | None = None

    @classmethod
    def start(cls, lab: Lab, *, tcp: int = 0, udp: int = 0, rate: float = 1.0,
              duration: float | None = None, mode: str = "mixed", families: str = "4",
              egress_ports: int = farm.EGRESS_PORTS, max_rate: float = DEFAULT_MAX_RATE,
              gap: float | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
              drain: float = 1.0, lookup: bool = True, tag: str | None = None) -> TrafficRun:
        """Start the server if needed, then a client; returns at once (see
        :meth:`wait_ready`)."""
        ensure_server(lab)
        tag = tag or f"{os.getpid()}-{time.monotonic_ns()}"
        report = lab.directory / f"traffic-{tag}.json"
        ready = lab.directory / f"traffic-{tag}.ready"
        output = lab.directory / f"traffic-{tag}.log"
        argv = client_argv(lab, tcp=tcp, udp=udp, rate=rate, duration=duration, mode=mode,
                           families=families, egress_ports=egress_ports, max_rate=max_rate,
                           gap=gap, connect_timeout=connect_timeout, drain=drain,
                           lookup=lookup, report=report, ready=ready, as_json=False)
        with open(output, "wb") as out:
            proc = lab.popen(lab.client_ns, argv, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=out, start_new_session=True)
        return cls(lab, proc, report, ready, output)

    def _failed(self, what: str) -> LabError:
        try:
            tail = self.output_path.read_text()[-2000:].strip()
        except OSError:
            tail = ""
        return LabError(f"traffic client {what} (exit {self.proc.returncode}): {tail}")

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until every flow is open (or failed); the ready record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_path.exists():
                info: dict[str, Any] = json.loads(self.ready_path.read_text())
                return info
            if self.proc.poll() is not None:
                raise self._failed("exited before it was ready")
            time.sleep(0.02)
        raise LabError(f"traffic client not ready within {timeout} s")

    def _read(self) -> dict[str, Any] | None:
        try:
            rep: dict[str, Any] = json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            return None
        return rep

    def snapshot(self, timeout: float = 30.0) -> dict[str, Any]:
        """An interim report (the client keeps running)."""
        before = self._read()
        gen = before["generation"] if before else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rep = self._read()
            if rep is not None and rep["generation"] > gen:
                self.last_report = rep
                return rep
            if self.proc.poll() is not None:
                raise self._failed("exited")
            time.sleep(0.02)
        raise LabError(f"no traffic report within {timeout} s")

    def wait(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for the client to finish (``duration``); the final report."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LabError(f"traffic client still running after {timeout} s") from None
        rep = self._read()
        if self.proc.returncode != 0 or rep is None or not rep.get("final"):
            raise self._failed("failed")
        self.last_report = rep
        return rep

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGTERM the client; its final report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> TrafficRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def client_argv(lab: Lab, *, tcp: int, udp: int, rate: float, duration: float | None,
                mode: str, families: str, egress_ports: int, max_rate: float,
                gap: float | None, connect_timeout: float, drain: float, lookup: bool,
                report: Path | None, ready: Path | None, as_json: bool = True) -> list[str]:
    argv = [sys.executable, "-m", "lbsync.lab.traffic", "client", "--lab", lab.prefix,
            "--lab-root", str(lab.directory.parent), "--tcp", str(tcp), "--udp", str(udp),
            "--rate", repr(rate), "--mode", mode, "--family", families,
            "--egress-ports", str(egress_ports), "--max-rate", repr(max_rate),
            "--connect-timeout", repr(connect_timeout), "--drain", repr(drain)]
    if duration is not None:
        argv += ["--duration", repr(duration)]
    if gap is not None:
        argv += ["--gap", repr(gap)]
    if not lookup:
        argv.append("--no-lookup")
    if report is not None:
        argv += ["--report", str(report)]
    if ready is not None:
        argv += ["--ready", str(ready)]
    if as_json:
        argv.append("--json")
    return argv


# --------------------------------------------------------------------------------------------
# Entry point (the processes)


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``lbsync lab traffic`` and the client process."""
    p.add_argument("--tcp", type=_count, default=0, metavar="N", help="TCP connections")
    p.add_argument("--udp", type=_count, default=0, metavar="N", help="UDP flows")
    p.add_argument("--rate", type=_positive, default=1.0, metavar="R",
                   help="messages per second per flow (default %(default)s)")
    p.add_argument("--duration", type=_positive, default=None, metavar="S",
                   help="seconds of sending (default: until SIGTERM / Ctrl-C)")
    p.add_argument("--mode", default="mixed", choices=("mixed", *MODES),
                   help="plain | snat (ingress SNAT) | dnat | egress (egress SNAT) | mixed")
    p.add_argument("--family", default="4", choices=("4", "6", "46"),
                   help="address family: 4, 6, or 46 (alternate)")
    p.add_argument("--egress-ports", type=_count, default=farm.EGRESS_PORTS, metavar="K",
                   help="outside server ports egress flows spread over (1..%(default)s)")
    p.add_argument("--max-rate", type=_positive, default=DEFAULT_MAX_RATE, metavar="R",
                   help="cap on messages per second over all flows (default %(default)s)")
    p.add_argument("--gap", type=_positive, default=None, metavar="S",
                   help="silence recorded as a gap (default: 2 intervals, >= 0.05 s)")
    p.add_argument("--connect-timeout", type=_positive, default=DEFAULT_CONNECT_TIMEOUT,
                   metavar="S", help="per-connection connect timeout")
    p.add_argument("--drain", type=_nonneg, default=1.0, metavar="S",
                   help="wait for outstanding replies after sending stops")
    p.add_argument("--no-lookup", action="store_true",
                   help="skip the conntrack lookup of which node forwarded each flow")
    p.add_argument("--json", action="store_true", help="print the JSON report")


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {v}")
    return v


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return v


def _nonneg(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _positive(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lbsync.lab.traffic")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("serve", help="the lab's echo server")
    c = sub.add_parser("client", help="one traffic run")
    for q in (s, c):
        q.add_argument("--lab", required=True, metavar="PREFIX")
        q.add_argument("--lab-root", default=str(farm.LAB_ROOT), metavar="DIR")
        q.add_argument("--ready", default=None, metavar="FILE")
    add_client_arguments(c)
    c.add_argument("--report", default=None, metavar="FILE")
    c.add_argument("--run-id", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    raise_nofile()
    loop = new_loop()
    try:
        if args.role == "serve":
            lab = Lab.load(args.lab, root=Path(args.lab_root))
            loop.run_until_complete(_serve(lab, Path(args.ready) if args.ready else None))
            return 0
        return loop.run_until_complete(_client_main(args))
    except LabError as exc:
        sys.stderr.write(f"lbsync lab traffic: error: {exc}\n")
        return 2
    finally:
        loop.close()


__all__ = [
    "Client", "EchoServer", "Flow", "FlowSpec", "NodeView", "Reply", "SeqWindow", "TrafficRun",
    "alive_over_time", "build_report", "decode_reply", "decode_request", "effective_rate",
    "encode_reply", "encode_request", "ensure_server", "lookup_nodes", "percentiles",
    "plan_flows", "summary",
]

if __name__ == "__main__":
    raise SystemExit(main())

