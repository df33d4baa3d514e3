"""Transport adapter: the replication endpoint on a real UDP socket under asyncio/uvloop.

Thin by design: it stamps ``loop.time()``, calls the sans-IO endpoint, sends what it returns to
every destination and re-arms one timer at the endpoint's deadline. No protocol decision is
taken here.

Two modes:
- ``multicast``: one socket bound to the group and port, joined on the replication interface
  only (``ip_mreqn`` with its ifindex, ``IP_MULTICAST_ALL`` off), ``IP_MULTICAST_IF`` on that
  interface, TTL 1, loopback off; every datagram is sent once to the group.
- ``unicast``: one socket bound to the node's replication address; every datagram (data,
  NACKs, retransmissions) is sent to every peer, so that NACK suppression still works.

Socket buffers are forced large (``SO_RCVBUFFORCE``/``SO_SNDBUFFORCE`` as root, falling back to
the capped ``SO_RCVBUF``/``SO_SNDBUF``). Set-up failures raise :class:`TransportError` with an
errno-specific message.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from lbsync.replication.endpoint import ReplicationEndpoint
from lbsync.replication.events import Event

log = logging.getLogger(__name__)

SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
IP_MULTICAST_ALL = 49
# uvloop's clock ticks in milliseconds: a timer may fire up to this much before its deadline,
# which is then handled as due (as before the lazy re-arming), never re-armed in a spin
CLOCK_GRAIN = 0.001


class TransportError(OSError):
    """The replication socket could not be set up; the message says why in operator terms."""


def _explain(exc: OSError, what: str) -> TransportError:
    hints = {
        errno.ENODEV: "no such interface (is the replication link up in this namespace?)",
        errno.EADDRINUSE: "the replication port is in use (another lbsync instance?)",
        errno.EADDRNOTAVAIL: "address not configured on this node",
        errno.EPERM: "not permitted (run as root or with CAP_NET_ADMIN)",
        errno.EACCES: "not permitted (run as root or with CAP_NET_ADMIN)",
        errno.ENOBUFS: "kernel out of buffer space (too many multicast memberships?)",
    }
    hint = hints.get(exc.errno or 0, exc.strerror or str(exc))
    return TransportError(exc.errno or 0, f"{what}: {hint}")


def set_buffers(sock: socket.socket, size: int) -> None:
    """Large send and receive buffers; forced when privileged."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def interface_index(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError as exc:
        raise TransportError(errno.ENODEV, f"interface {ifname!r}: no such interface") from exc


def multicast_socket(group: str, port: int, ifname: str, *, buffer: int) -> socket.socket:
    """A non-blocking UDP socket joined to ``group`` on ``ifname`` only, TTL 1, no loopback."""
    ifindex = interface_index(ifname)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_buffers(sock, buffer)
        try:
            sock.bind((group, port))
        except OSError as exc:
            raise _explain(exc, f"bind {group}:{port}") from exc
        mreqn = socket.inet_aton(group) + socket.inet_aton("0.0.0.0") + struct.pack("@i", ifindex)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        except OSError as exc:
            raise _explain(exc, f"join {group} on {ifname}") from exc
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def unicast_socket(address: str, port: int, *, buffer: int) -> socket.socket:
    """A non-blocking UDP socket bound to this node's replication address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        set_buffers(sock, buffer)
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise _explain(exc, f"bind {address}:{port}") from exc
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, slots=True)
class TransportStatistics:
    """Snapshot of a :class:`ReplicationTransport`."""

    datagrams_in: int
    datagrams_out: int
    send_errors: int
    timer_fires: int
    early_fires: int = 0
    """Timer wake-ups that found the deadline moved later and only re-armed."""


class ReplicationTransport(asyncio.DatagramProtocol):
    """Drives one :class:`ReplicationEndpoint` on a datagram socket.

    After calling endpoint methods directly (``update_flow``...), call :meth:`pump` so that
    what they produced is sent and the timer re-armed.
    """

    def __init__(self, endpoint: ReplicationEndpoint, destinations: Sequence[tuple[str, int]],
                 on_event: Callable[[Event], None], loop: asyncio.AbstractEventLoop) -> None:
        self.endpoint = endpoint
        self.destinations = list(destinations)
        self._on_event = on_event
        self._loop = loop
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.send_errors = 0
        self.timer_fires = 0
        self.early_fires = 0
        self._delivering = False  # pump() is delivering events: a nested pump() only asks
        self._pump_again = False  # the running one for another round (no nested re-arming)
        self.closed = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport: no isinstance
        self._transport = cast(asyncio.DatagramTransport, transport)
        self.pump()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.datagrams_in += 1
        self.endpoint.datagram_received(data, self._loop.time())
        self.pump()

    def error_received(self, exc: Exception) -> None:
        self.send_errors += 1
        log.debug("replication_socket_error error=%s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.closed.done():
            self.closed.set_result(None)

    def now(self) -> float:
        return self._loop.time()

    def pump(self) -> None:
        """Send what the endpoint produced, deliver its events, re-arm its timer. Called from
        an event handler (a heartbeat received makes the node answer), it only asks the
        running pump for one more round: what the handler queued is sent when the handler
        returns, within the same callback, and the timer is re-armed once."""
        if self._delivering:
            self._pump_again = True
            return
        ep = self.endpoint
        tr = self._transport
        self._delivering = True
        try:
            again = True
            while again:
                self._pump_again = False
                if tr is not None:
                    for data in ep.datagrams_to_send():
                        for dest in self.destinations:
                            tr.sendto(data, dest)
                            self.datagrams_out += 1
                while (event := ep.next_event()) is not None:
                    self._on_event(event)
                again = self._pump_again
        finally:
            self._delivering = False
        self._arm(ep.get_timer())

    def _arm(self, when: float | None) -> None:
        """Keep one loop timer at or before the endpoint's deadline.

        A timer already armed earlier than ``when`` stays: most datagrams only push a deadline
        later (a peer's silence deadline moves with every datagram it sends), and a cancel
        plus ``call_at`` per datagram was a measurable share of an idle daemon's CPU. The early
        timer then wakes the loop, finds nothing due and re-arms at the real deadline
        (:meth:`_fire`), so nothing ever runs late."""
        at = self._timer_at
        if when == at or (when is not None and at is not None and at < when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if when is None else self._loop.call_at(when, self._fire)
        self._timer_at = when

    def flush_soon(self) -> None:
        """Seal the open datagram once the callbacks ready now have run, then pump.

        A burst read in one callback still shares datagrams, but a record written when the
        loop is about to idle leaves within one loop turn instead of waiting for the flush
        delay (which stays the upper bound: the sender's own timer)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_idle)

    def _flush_idle(self) -> None:
        self._flush_scheduled = False
        if self.closed.done():
            return
        self.endpoint.flush(self._loop.time())
        self.pump()

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._loop.time()
        when = self.endpoint.get_timer()
        if when is not None and now < when - CLOCK_GRAIN:
            self.early_fires += 1  # armed for an earlier deadline that has moved: re-arm
            self._arm(when)
            return
        self.timer_fires += 1
        self.endpoint.handle_timer(now)
        self.pump()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def statistics(self) -> TransportStatistics:
        return TransportStatistics(self.datagrams_in, self.datagrams_out, self.send_errors,
                                   self.timer_fires, self.early_fires)


async def open_multicast(endpoint: ReplicationEndpoint, *, group: str, port: int, ifname: str,
                         buffer: int, on_event: Callable[[Event], None]
                         ) -> ReplicationTransport:
    loop = asyncio.get_running_loop()
    sock = multicast_socket(group, port, ifname, buffer=buffer)
    proto = ReplicationTransport(endpoint, [(group, port)], on_event, loop)
    await loop.create_datagram_endpoint(lambda: proto, sock=sock)
    return proto


async def open_unicast(endpoint: ReplicationEndpoint, *, address: str, port: int,
                       peers: Sequence[str], buffer: int, on_event: Callable[[Event], None]
                       ) -> ReplicationTransport:
    loop = asyncio.get_running_loop()
    sock = unicast_socket(address, port, buffer=buffer)
    proto = ReplicationTransport(endpoint, [(p, port) for p in peers], on_event, loop)
    await loop.create_datagram_endpoint(lambda: proto, sock=sock)
    return proto
