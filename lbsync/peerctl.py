"""Peer control: farm commands relayed from one daemon to another over the replication network.

The CLI talks only to its own node's daemon (the Unix control socket, :mod:`lbsync.control`).
The farm commands (``rebalance``, ``drain``, ``weight``, the drills) also need the other
nodes' daemons; the local daemon forwards those requests (control command ``relay``
``{node, cmd, args, timeout}``) to the peer's daemon over TCP, to the peer's
``replication_address`` at ``replication.control_port`` (default: replication port + 1),
authenticated with the cluster key ring (the replication ring, another personalisation).

Wire, version 1: one frame per request and one per answer, on a persistent connection::

    header  magic "LBPC" | version u8 (1) | kind u8 (1 request, 2 answer) | key id u8 |
            sender u8 | receiver u8 | reserved u8 (0) | wall time u64 (ms since the epoch) |
            nonce 16 bytes | body length u32                                  (36 bytes)
    body    one JSON object, UTF-8
    tag     16 bytes: keyed BLAKE2b of header + body under key ``key id``

Rules (:class:`FrameChecker`, sans-IO: the caller passes the wall clock):
- Size before anything: a header with a bad magic, version, kind or reserved byte, or whose
  body length exceeds the bound (:data:`MAX_REQUEST` / :data:`MAX_ANSWER`), is rejected
  before the body is read.
- Authenticate before parsing: the tag (any key of the ring, ``hmac.compare_digest``); then
  the sender (a configured node, not the receiver itself), the receiver (this node), the time
  (within :data:`WINDOW` of the receiver's wall clock: two machines share no monotonic clock,
  so this needs NTP-synchronised clocks, as TLS and Kerberos do), and the nonce (never seen
  within the window: a bounded cache; when it is full of live nonces the request is refused,
  never a nonce forgotten early). Only then is the body parsed as JSON.
- A request body is ``{"cmd", "args"}`` and only :data:`RELAYABLE` commands run; an answer
  body is ``{"re": request nonce, "ok", "result" | "error", "t_recv", "t_send"}`` and the
  requester accepts it only from the node it asked, addressed to itself, for its own fresh
  nonce (so no time window or nonce cache applies to answers).
  ``t_recv``/``t_send`` are the peer's ``time.monotonic()`` when the request arrived and the
  answer left: with the requester's own send and receive instants they give an NTP-style
  estimate of the offset between the two monotonic clocks and its error bound (half the
  round trip minus the peer's service time). They are measurement only (the rebalance's
  per-bucket gap compares a seal instant on one node with a claim instant on another); no
  decision depends on them.
- Every rejection is counted by reason (:meth:`FrameChecker.statistics`). A frame that is not
  MAC'd by a configured peer gets no answer; one that is, but fails a later check (receiver,
  source address, time, nonce, body, allow-list: :data:`ANSWERED_REJECTIONS` and
  ``not_relayable``), gets an authenticated error answer naming the reason (a clock minutes
  off must not look like a dead peer) and runs nothing. After a rejection the connection is
  closed (no resynchronisation of the framing). Nothing a peer sends can raise out of the
  listener.
- Bounded: at most :data:`MAX_CONNECTIONS` served at once; a started frame must be complete
  within :data:`FRAME_TIMEOUT`, and so must the first frame of a connection; after an
  authenticated frame a connection may stay idle for :data:`IDLE_TIMEOUT`.

The asyncio side: :class:`PeerControlServer` (the listener, bounded connections, read
timeouts), :class:`PeerClient` (one persistent connection per peer, one request at a time,
reconnects when the connection went stale) and :class:`PeerControl`, which the daemon starts
and whose :meth:`PeerControl.relay` is the ``relay`` control handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lbsync.control import ControlError
from lbsync.replication.auth import KeyRing

log = logging.getLogger(__name__)

MAGIC = b"LBPC"
VERSION = 1
KIND_REQUEST = 1
KIND_ANSWER = 2
_HEADER = struct.Struct("!4sBBBBBBQ16sI")
HEADER_LEN = _HEADER.size  # 36
TAG_LEN = 16
NONCE_LEN = 16
_PERSON = b"lbsync-pctl-v1"

MAX_REQUEST = 64 * 1024  # a request body (the orchestrator's arguments are small)
MAX_ANSWER = 8 * 1024 * 1024  # an answer body (``map`` of 4096 buckets is ~0.5 MB)
WINDOW = 30.0  # seconds either side of the receiver's wall clock
REPLAY_ENTRIES = 16384  # nonces remembered (~540 requests/s over the window); full: refuse
MAX_CONNECTIONS = 32  # accepted connections served at once
FRAME_TIMEOUT = 5.0  # a started frame must be complete within this
IDLE_TIMEOUT = 300.0  # an idle accepted connection is closed after this
CLIENT_IDLE_REUSE = 120.0  # the client reconnects rather than reuse a connection this idle
CONNECT_TIMEOUT = 2.0
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 60.0

# What a peer may ask this daemon to run: what the farm orchestration (lbsync.drill,
# lbsync.ops_cli) needs, and read-only snapshots. Not ``relay`` (no chains), no test hooks.
RELAYABLE = frozenset({
    "status", "map", "ops-status", "resync-status", "rebalance-plan", "map-propose",
    "handoff-seal", "handoff-take", "set-local", "drill-fail", "drill-partition",
    "drill-counters",
})

# Rejections after the MAC and the sender were checked: answered (authenticated) with the
# reason, since only a configured peer holding the key can have sent the frame.
ANSWERED_REJECTIONS = frozenset({"wrong_receiver", "wrong_address", "stale", "replay",
                                 "replay_cache_full", "bad_body"})

# Rejection reasons, in the order the checks run (statistics list every one, zero or not).
REJECT_REASONS = (
    "bad_magic", "bad_version", "bad_kind", "too_large", "truncated", "frame_timeout",
    "unknown_key", "bad_mac", "unknown_sender", "wrong_receiver", "wrong_address", "stale",
    "replay", "replay_cache_full", "bad_body", "not_relayable", "too_many_connections",
)

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


class FrameRejected(Exception):
    """A frame failed a check; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded frame header (not yet authenticated)."""

    kind: int
    key_id: int
    sender: int
    receiver: int
    wall_ms: int
    nonce: bytes
    body_len: int


@dataclass(frozen=True, slots=True)
class Frame:
    """An authenticated frame: header and JSON body."""

    header: Header
    body: dict[str, Any]


def encode_frame(keyring: KeyRing, *, kind: int, sender: int, receiver: int, wall: float,
                 nonce: bytes, body: Mapping[str, Any]) -> bytes:
    """Header + JSON body + tag under the ring's current key."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    raw = json.dumps(body, separators=(",", ":"), default=str).encode()
    head = _HEADER.pack(MAGIC, VERSION, kind, keyring.current, sender, receiver, 0,
                        int(wall * 1000), nonce, len(raw))
    return head + raw + _tag(keyring.keys[keyring.current], head + raw)


def _tag(secret: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, key=secret, digest_size=TAG_LEN, person=_PERSON).digest()


def parse_header(data: bytes, *, max_body: int) -> Header:
    """Check and decode the fixed header; raises :class:`FrameRejected`."""
    if len(data) != HEADER_LEN:
        raise FrameRejected("truncated", f"header of {len(data)} bytes")
    magic, version, kind, key_id, sender, receiver, reserved, wall_ms, nonce, body_len = \
        _HEADER.unpack(data)
    if magic != MAGIC:
        raise FrameRejected("bad_magic")
    if version != VERSION or reserved != 0:
        raise FrameRejected("bad_version", f"version {version}")
    if kind not in (KIND_REQUEST, KIND_ANSWER):
        raise FrameRejected("bad_kind", f"kind {kind}")
    if body_len > max_body:
        raise FrameRejected("too_large", f"body of {body_len} bytes > {max_body}")
    return Header(kind, key_id, sender, receiver, wall_ms, nonce, body_len)


class ReplayCache:
    """Nonces seen within the time window, bounded: (sender, nonce) -> expiry (wall seconds).

    Entries are kept in insertion order; expired ones are dropped from the front (a frame is
    accepted only within the window, so an expired nonce can never be accepted again). When
    the cache is full of live nonces, :meth:`check_and_add` refuses (``full``) rather than
    forget a live nonce, which would let its frame be replayed."""

    __slots__ = ("_seen", "max_entries", "window")

    def __init__(self, *, window: float = WINDOW, max_entries: int = REPLAY_ENTRIES) -> None:
        self.window = window
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[int, bytes], float] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._seen:
            key, expiry = next(iter(self._seen.items()))
            if expiry > now:
                break
            del self._seen[key]

    def check_and_add(self, sender: int, nonce: bytes, frame_time: float, now: float) -> str:
        """``ok`` (remembered), ``replay`` (seen before) or ``full``."""
        self._expire(now)
        key = (sender, nonce)
        if key in self._seen:
            return "replay"
        if len(self._seen) >= self.max_entries:
            return "full"
        # remembered until the frame's own time leaves the window (and no shorter than now's
        # window end, so that insertion order stays expiry order closely enough)
        self._seen[key] = max(frame_time, now) + self.window
        return "ok"

    def __len__(self) -> int:
        return len(self._seen)


class FrameChecker:
    """The receiving side's rules (module docstring), with the rejections counted by reason.

    ``keyring`` is read at every check, so a reloaded ring applies at once. ``addresses``
    maps node id -> its configured replication address (the TCP source a peer's client binds
    to): a frame from another address is refused (``wrong_address``) when the caller passes
    the address it came from."""

    def __init__(self, *, node_id: int, keyring: Callable[[], KeyRing],
                 addresses: Mapping[int, str], window: float = WINDOW,
                 replay_entries: int = REPLAY_ENTRIES) -> None:
        self.node_id = node_id
        self.keyring = keyring
        self.addresses = {n: ipaddress.ip_address(a) for n, a in addresses.items()}
        self.window = window
        self.replay = ReplayCache(window=window, max_entries=replay_entries)
        self.rejected: Counter[str] = Counter()
        self.accepted = 0

    def count(self, reason: str) -> None:
        self.rejected[reason] += 1

    def check(self, head: Header, rest: bytes, *, raw_header: bytes, now_wall: float,
              kind: int, peer_address: str | None = None, expect_sender: int | None = None,
              fresh: bool = True) -> Frame:
        """Authenticate ``rest`` (body + tag) of a frame whose header was parsed, then parse
        the body. Raises :class:`FrameRejected` (counted) on any failure. ``fresh``: check
        the time window and the nonce cache (requests); an answer needs neither, it must
        name the requester's own fresh nonce."""
        try:
            return self._check(head, rest, raw_header, now_wall, kind, peer_address,
                               expect_sender, fresh)
        except FrameRejected as exc:
            self.count(exc.reason)
            raise

    def _check(self, head: Header, rest: bytes, raw_header: bytes, now_wall: float,
               kind: int, peer_address: str | None, expect_sender: int | None,
               fresh: bool) -> Frame:
        if len(rest) != head.body_len + TAG_LEN:
            raise FrameRejected("truncated", f"{len(rest)} of {head.body_len + TAG_LEN} bytes")
        body, tag = rest[:head.body_len], rest[head.body_len:]
        ring = self.keyring()
        secret = ring.keys.get(head.key_id)
        if secret is None:
            raise FrameRejected("unknown_key", f"key id {head.key_id}")
        if not hmac.compare_digest(_tag(secret, raw_header + body), tag):
            raise FrameRejected("bad_mac")
        if head.kind != kind:
            raise FrameRejected("bad_kind", f"kind {head.kind}, expected {kind}")
        if head.sender not in self.addresses or head.sender == self.node_id or \
                (expect_sender is not None and head.sender != expect_sender):
            raise FrameRejected("unknown_sender", f"node {head.sender}")
        if head.receiver != self.node_id:
            raise FrameRejected("wrong_receiver", f"node {head.receiver}")
        if peer_address is not None:
            try:
                src = ipaddress.ip_address(peer_address)
            except ValueError:
                raise FrameRejected("wrong_address", peer_address) from None
            if isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped is not None:
                src = src.ipv4_mapped
            if src != self.addresses[head.sender]:
                raise FrameRejected("wrong_address", f"{src} is not node {head.sender}'s")
        frame_time = head.wall_ms / 1000.0
        if fresh and abs(now_wall - frame_time) > self.window:
            raise FrameRejected("stale", f"{frame_time - now_wall:+.1f} s off")
        if fresh:
            verdict = self.replay.check_and_add(head.sender, head.nonce, frame_time, now_wall)
            if verdict == "replay":
                raise FrameRejected("replay")
            if verdict == "full":
                raise FrameRejected("replay_cache_full")
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise FrameRejected("bad_body", str(exc)[:80]) from None
        if not isinstance(obj, dict):
            raise FrameRejected("bad_body", "not an object")
        self.accepted += 1
        return Frame(head, obj)

    def statistics(self) -> dict[str, int]:
        return {r: self.rejected.get(r, 0) for r in REJECT_REASONS}


def check_request(body: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(cmd, args)`` of an authenticated request body; raises :class:`FrameRejected`."""
    cmd = body.get("cmd")
    args = body.get("args", {})
    if not isinstance(cmd, str) or not isinstance(args, dict):
        raise FrameRejected("bad_body", "request must be {cmd: str, args: object}")
    if cmd not in RELAYABLE:
        raise FrameRejected("not_relayable", cmd[:40])
    return cmd, args


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One NTP-style estimate of a peer's ``time.monotonic()`` minus ours, from one relayed
    request: the true offset lies within ``offset_s`` ± ``error_s``."""

    offset_s: float
    error_s: float
    rtt_s: float


def clock_sample(t0: float, t_recv: float, t_send: float, t3: float) -> ClockSample:
    """Requester sent at ``t0`` and got the answer at ``t3`` (its clock); the peer received
    at ``t_recv`` and answered at ``t_send`` (the peer's clock)."""
    service = max(0.0, t_send - t_recv)
    rtt = max(0.0, (t3 - t0) - service)
    return ClockSample(offset_s=((t_recv - t0) + (t_send - t3)) / 2.0, error_s=rtt / 2.0,
                       rtt_s=t3 - t0)


# ------------------------------------------------------------------------------ asyncio side


@dataclass(frozen=True, slots=True)
class PeerControlStatistics:
    """Snapshot of one daemon's peer control (listener and clients)."""

    listen: str
    served: int
    served_by_sender: dict[str, int]
    answered_errors: int
    rejected: dict[str, int]
    connections_open: int
    replay_cache_entries: int
    relayed: int
    relay_failures: int
    relay_connects: int
    relayed_by_peer: dict[str, int] = field(default_factory=dict)


_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, bound with IP_FREEBIND: the daemon may start
    before its replication address is configured (boot order, an address moved in by hand);
    the listener answers as soon as the address exists. Raises OSError (port in use...)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class PeerControlServer:
    """The listener: authenticated requests from peers, dispatched to the allow-listed
    control handlers of this daemon."""

    def __init__(self, *, host: str, port: int, checker: FrameChecker,
                 handlers: Mapping[str, Handler], node_id: int,
                 keyring: Callable[[], KeyRing], wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.port = port
        self.checker = checker
        self.handlers = handlers
        self.node_id = node_id
        self.keyring = keyring
        self.wall = wall
        self.mono = mono
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.served = 0
        self.served_by_sender: Counter[int] = Counter()
        self.answered_errors = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, sock=listen_socket(
            self.host, self.port), limit=64 * 1024)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._conns):  # their reads end (EOF), their tasks return
                w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    def _reject(self, reason: str, peer: str, detail: str = "") -> None:
        self.checker.count(reason)
        self._log_rejection(reason, peer, detail)

    def _log_rejection(self, reason: str, peer: str, detail: str) -> None:
        n = self.checker.rejected[reason]
        if n & (n - 1) == 0:  # 1, 2, 4, 8...: remote garbage never floods the log
            log.warning("peerctl.rejected reason=%s count=%d peer=%s detail=%s", reason, n,
                        peer, detail)

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else "?"
        if len(self._conns) >= MAX_CONNECTIONS:
            self._reject("too_many_connections", peer)
            writer.close()
            return
        self._conns.add(writer)
        try:
            await self._serve(reader, writer, peer)
        except (ConnectionError, OSError):
            pass
        except Exception:  # the listener never dies of what a peer sent
            log.exception("peerctl.serve_failed peer=%s", peer)
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: str) -> None:
        authenticated = False
        while True:
            # a connection that never sent an authenticated frame gets FRAME_TIMEOUT, not
            # IDLE_TIMEOUT: silent or trickling connections cannot hold the slots
            try:
                first = await asyncio.wait_for(
                    reader.readexactly(1), IDLE_TIMEOUT if authenticated else FRAME_TIMEOUT)
            except TimeoutError:
                if not authenticated:
                    self._reject("frame_timeout", peer, "nothing sent")
                return
            except asyncio.IncompleteReadError:
                return
            try:
                try:
                    raw = first + await asyncio.wait_for(
                        reader.readexactly(HEADER_LEN - 1), FRAME_TIMEOUT)
                except TimeoutError:
                    raise FrameRejected("frame_timeout", "header") from None
                except asyncio.IncompleteReadError as exc:
                    raise FrameRejected("truncated",
                                        f"header of {1 + len(exc.partial)} bytes") from None
                t_recv = self.mono()
                head = parse_header(raw, max_body=MAX_REQUEST)
                try:
                    rest = await asyncio.wait_for(
                        reader.readexactly(head.body_len + TAG_LEN), FRAME_TIMEOUT)
                except TimeoutError:
                    raise FrameRejected("frame_timeout") from None
                except asyncio.IncompleteReadError as exc:
                    raise FrameRejected("truncated", f"{len(exc.partial)} bytes") from None
            except FrameRejected as exc:
                self._reject(exc.reason, peer, str(exc))
                return
            try:
                frame = self.checker.check(head, rest, raw_header=raw, now_wall=self.wall(),
                                           kind=KIND_REQUEST, peer_address=peer)
            except FrameRejected as exc:
                self._log_rejection(exc.reason, peer, str(exc))
                if exc.reason in ANSWERED_REJECTIONS:
                    # a configured peer's valid MAC: tell it why (a clock off by minutes
                    # would otherwise look like a dead connection); nothing ran
                    self.answered_errors += 1
                    await self._answer(writer, head, {
                        "re": head.nonce.hex(), "ok": False,
                        "error": f"refused by node {self.node_id}: {exc}"}, t_recv)
                return  # no resync of framing after a rejection: the connection ends
            authenticated = True
            await self._answer(writer, head, await self._run(frame, peer), t_recv)

    async def _answer(self, writer: asyncio.StreamWriter, head: Header,
                      answer: dict[str, Any], t_recv: float) -> None:
        answer["t_recv"] = t_recv
        answer["t_send"] = self.mono()
        data = encode_frame(self.keyring(), kind=KIND_ANSWER, sender=self.node_id,
                            receiver=head.sender, wall=self.wall(), nonce=os.urandom(16),
                            body=answer)
        if len(data) > MAX_ANSWER + HEADER_LEN + TAG_LEN:
            answer = {"re": head.nonce.hex(), "ok": False,
                      "error": f"answer too large ({len(data)} bytes)",
                      "t_recv": t_recv, "t_send": self.mono()}
            data = encode_frame(self.keyring(), kind=KIND_ANSWER, sender=self.node_id,
                                receiver=head.sender, wall=self.wall(),
                                nonce=os.urandom(16), body=answer)
        writer.write(data)
        await writer.drain()

    async def _run(self, frame: Frame, peer: str) -> dict[str, Any]:
        head = frame.header
        re = head.nonce.hex()
        try:
            cmd, args = check_request(frame.body)
        except FrameRejected as exc:
            self._reject(exc.reason, peer, str(exc))
            self.answered_errors += 1
            return {"re": re, "ok": False, "error": f"refused: {exc}"}
        handler = self.handlers.get(cmd)
        if handler is None:
            self.answered_errors += 1
            return {"re": re, "ok": False, "error": f"unknown command {cmd!r}"}
        self.served += 1
        self.served_by_sender[head.sender] += 1
        try:
            return {"re": re, "ok": True, "result": await handler(args)}
        except ControlError as exc:
            self.answered_errors += 1
            return {"re": re, "ok": False, "error": str(exc)}
        except Exception as exc:  # a handler bug must not take the listener down
            self.answered_errors += 1
            log.exception("peerctl.handler_failed cmd=%s sender=%d", cmd, head.sender)
            return {"re": re, "ok": False, "error": f"internal error: {type(exc).__name__}: "
                                                    f"{exc}"}


class PeerUnreachable(ControlError):
    """The peer's daemon could not be reached or did not answer in time."""


class PeerClient:
    """One persistent connection to one peer's listener; one request at a time."""

    def __init__(self, *, node_id: int, peer_id: int, host: str, port: int, source: str,
                 keyring: Callable[[], KeyRing], checker: FrameChecker,
                 wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.node_id = node_id
        self.peer_id = peer_id
        self.host = host
        self.port = port
        self.source = source
        self.keyring = keyring
        self.checker = checker
        self.wall = wall
        self.mono = mono
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0
        self.connects = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.close()
        try:
            # bound to our replication address: the listener checks the source
            r, w = await asyncio.wait_for(asyncio.open_connection(
                self.host, self.port, local_addr=(self.source, 0)), CONNECT_TIMEOUT)
        except TimeoutError:
            raise PeerUnreachable(f"node {self.peer_id} ({self.host}:{self.port}): connect "
                                  f"timed out") from None
        except OSError as exc:
            raise PeerUnreachable(f"node {self.peer_id} ({self.host}:{self.port}): "
                                  f"{exc.strerror or exc}") from None
        self.connects += 1
        self._reader, self._writer = r, w
        return r, w

    async def request(self, cmd: str, args: Mapping[str, Any], timeout: float
                      ) -> tuple[dict[str, Any], ClockSample]:
        """The peer's answer body (``ok``, ``result`` or ``error``) and a clock sample.
        Raises :class:`PeerUnreachable`."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._request(cmd, args), timeout)
            except TimeoutError:
                self.close()  # a late answer must never be read as the next one's
                raise PeerUnreachable(f"node {self.peer_id} did not answer {cmd!r} within "
                                      f"{timeout:.1f} s") from None
            except BaseException:
                self.close()
                raise

    async def _request(self, cmd: str, args: Mapping[str, Any]
                       ) -> tuple[dict[str, Any], ClockSample]:
        reused = self._writer is not None and \
            self.mono() - self._last_used < CLIENT_IDLE_REUSE
        for attempt in (1, 2):
            if reused and attempt == 1:
                assert self._reader is not None and self._writer is not None
                r, w = self._reader, self._writer
            else:
                r, w = await self._connect()
            nonce = os.urandom(NONCE_LEN)
            data = encode_frame(self.keyring(), kind=KIND_REQUEST, sender=self.node_id,
                                receiver=self.peer_id, wall=self.wall(), nonce=nonce,
                                body={"cmd": cmd, "args": dict(args)})
            t0 = self.mono()
            try:
                w.write(data)
                await w.drain()
                raw = await r.readexactly(HEADER_LEN)
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                self.close()
                if reused and attempt == 1:
                    continue  # the peer closed an idle connection (or restarted): once more
                raise PeerUnreachable(f"node {self.peer_id}: connection lost ({exc!r})"
                                      ) from None
            try:
                head = parse_header(raw, max_body=MAX_ANSWER)
                rest = await r.readexactly(head.body_len + TAG_LEN)
                t3 = self.mono()
                frame = self.checker.check(head, rest, raw_header=raw, now_wall=self.wall(),
                                           kind=KIND_ANSWER, expect_sender=self.peer_id,
                                           fresh=False)
            except FrameRejected as exc:
                if exc.reason in ("bad_magic", "bad_version", "bad_kind", "too_large"):
                    self.checker.count(exc.reason)
                self.close()
                raise PeerUnreachable(f"node {self.peer_id}: bad answer ({exc})") from None
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                self.close()
                raise PeerUnreachable(f"node {self.peer_id}: connection lost ({exc!r})"
                                      ) from None
            body = frame.body
            if body.get("re") != nonce.hex():
                self.checker.count("replay")
                self.close()
                raise PeerUnreachable(f"node {self.peer_id}: answer to another request")
            self._last_used = t3
            try:
                sample = clock_sample(t0, float(body["t_recv"]), float(body["t_send"]), t3)
            except (KeyError, TypeError, ValueError):
                sample = ClockSample(0.0, float("inf"), t3 - t0)
            return body, sample
        raise AssertionError("unreachable")


class PeerControl:
    """What the daemon starts: the listener on this node's replication address and the
    clients behind the ``relay`` control command."""

    def __init__(self, *, cfg: Any, node_id: int, keyring: Callable[[], KeyRing],
                 handlers: Mapping[str, Handler],
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.keyring = keyring
        port = cfg.replication.peer_control_port
        self.port = port
        addresses = {n.id: n.replication_address for n in cfg.nodes}
        self.address = addresses[node_id]
        self.checker = FrameChecker(node_id=node_id, keyring=keyring, addresses=addresses)
        self.server = PeerControlServer(host=self.address, port=port, checker=self.checker,
                                        handlers=handlers, node_id=node_id, keyring=keyring,
                                        wall=wall)
        self.clients = {n: PeerClient(node_id=node_id, peer_id=n, host=a, port=port,
                                      source=self.address, keyring=keyring,
                                      checker=self.checker, wall=wall)
                        for n, a in addresses.items() if n != node_id}
        self.relayed: Counter[int] = Counter()
        self.relay_failures = 0

    async def start(self) -> None:
        await self.server.start()
        log.info("peerctl.listening address=%s port=%d", self.address, self.port)

    async def close(self) -> None:
        for c in self.clients.values():
            c.close()
        await self.server.close()

    async def relay(self, args: Mapping[str, Any]) -> Any:
        """Control handler ``relay``: ``{node, cmd, args, timeout}`` -> ``{result, clock}``
        (the peer's result, and the clock sample of this exchange)."""
        try:
            node = int(args.get("node"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ControlError(f"relay: node must be an integer, not {args.get('node')!r}"
                               ) from None
        cmd = args.get("cmd")
        cmd_args = args.get("args", {})
        if node == self.node_id:
            raise ControlError(f"relay: node {node} is this node (ask it directly)")
        client = self.clients.get(node)
        if client is None:
            raise ControlError(f"relay: node {node} is not in the cluster file")
        if not isinstance(cmd, str) or cmd not in RELAYABLE:
            raise ControlError(f"relay: {cmd!r} is not a relayable command "
                               f"({', '.join(sorted(RELAYABLE))})")
        if not isinstance(cmd_args, dict):
            raise ControlError("relay: args must be an object")
        try:
            timeout = float(args.get("timeout", DEFAULT_TIMEOUT))
        except (TypeError, ValueError):
            raise ControlError("relay: timeout must be a number") from None
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ControlError(f"relay: timeout must be in (0, {MAX_TIMEOUT:.0f}] seconds")
        try:
            body, sample = await client.request(cmd, cmd_args, timeout)
        except PeerUnreachable:
            self.relay_failures += 1
            raise
        self.relayed[node] += 1
        if not body.get("ok"):
            raise ControlError(str(body.get("error")))
        return {"result": body.get("result"),
                "clock": {"offset_s": sample.offset_s, "error_s": sample.error_s,
                          "rtt_s": sample.rtt_s}}

    def handlers(self) -> dict[str, Handler]:
        return {"relay": self.relay}

    def statistics(self) -> PeerControlStatistics:
        s = self.server
        return PeerControlStatistics(
            listen=f"{self.address}:{self.port}", served=s.served,
            served_by_sender={str(k): v for k, v in sorted(s.served_by_sender.items())},
            answered_errors=s.answered_errors, rejected=self.checker.statistics(),
            connections_open=len(s._conns), replay_cache_entries=len(self.checker.replay),
            relayed=sum(self.relayed.values()), relay_failures=self.relay_failures,
            relay_connects=sum(c.connects for c in self.clients.values()),
            relayed_by_peer={str(k): v for k, v in sorted(self.relayed.items())})

