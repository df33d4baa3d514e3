"""The thin adapter between keepalived and :class:`lbsync.keepalived.VrrpInterpreter`.

- :class:`FifoReader` reads keepalived's ``vrrp_notify_fifo``: it creates the FIFO (mode 0600)
  if it is absent, opens it non-blocking for reading, watches it with ``loop.add_reader``,
  splits lines (a line longer than ``max_line`` is dropped up to its newline, and counted) and
  hands each line to the interpreter, delivering the resulting events to a callback. When the
  last writer closes the FIFO (keepalived stopped or died) it reports that to the interpreter
  and reopens the FIFO (recreating it if it was removed): on Linux a freshly opened reader does
  not see a hang-up until a new writer has come and gone, so the reopened FIFO waits quietly for
  the next keepalived. keepalived 2.2.7's VRRP child creates the FIFO (0600) if absent and opens
  it read-write and non-blocking, so lines written before lbsync opens it wait in the pipe.
- :func:`notify_handler` is the control-socket handler behind ``lbsync notify``.
- :class:`VrrpSignal` is what the daemon runs when ``[keepalived] enabled``: one interpreter
  fed by the FIFO reader and by the ``notify`` control command, its events handed to a
  :class:`VrrpSink` (the node's operator layer, :class:`lbsync.ops.Ops`): a peer's verdict
  goes to membership (rule 3b), the own instance's FAULT to the link handoff.
- ``python -m lbsync.vrrp_adapter --fifo F --self-id N --nodes 1,2,3`` prints one JSON object
  per event with a monotonic timestamp (for the lab and the kernel tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import stat
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lbsync.keepalived import (
    MAX_NOTIFY_LINE,
    NotifyError,
    VrrpEvent,
    VrrpInstanceChanged,
    VrrpInterpreter,
    VrrpOwnLinkFailed,
    VrrpOwnLinkRecovered,
    VrrpPeerDeclaredDead,
    VrrpPeerReturned,
    VrrpSignalLost,
)

log = logging.getLogger(__name__)

READ_CHUNK = 4096

Deliver = Callable[[VrrpEvent], None]


class FifoError(OSError):
    """The FIFO path exists but is not a FIFO, or cannot be created or opened."""


def ensure_fifo(path: Path) -> bool:
    """Create the FIFO with mode 0600 if absent; True if it was created. Raises
    :class:`FifoError` if something else sits at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            pass  # keepalived created it meanwhile
        else:
            os.chmod(path, 0o600)  # mkfifo honours the umask; make the mode exact
            return True
        st = os.lstat(path)
    if not stat.S_ISFIFO(st.st_mode):
        raise FifoError(errno.EEXIST, f"{path} exists and is not a FIFO")
    return False


class LineSplitter:
    """Bytes in, complete lines out (without the newline), each at most ``max_line`` bytes: a
    longer line is dropped whole, up to its newline, and counted in ``overlong``."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.overlong = 0
        self._buf = bytearray()
        self._discarding = False

    def feed(self, chunk: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                if not self._discarding:
                    self._buf += chunk[start:]
                    if len(self._buf) > self.max_line:
                        self.overlong += 1
                        self._discarding = True
                        self._buf.clear()
                return lines
            piece = chunk[start:nl]
            start = nl + 1
            if self._discarding:
                self._discarding = False
                continue
            self._buf += piece
            line = bytes(self._buf)
            self._buf.clear()
            if len(line) > self.max_line:
                self.overlong += 1
                continue
            lines.append(line)

    def reset(self) -> None:
        """Forget a partial line (its writer is gone)."""
        self._buf.clear()
        self._discarding = False


@dataclass(frozen=True, slots=True)
class FifoReaderStatistics:
    """Counters of a :class:`FifoReader` (an immutable snapshot)."""

    opens: int
    eofs: int
    bytes_read: int
    lines: int
    overlong_lines: int
    read_errors: int
    events: int


class FifoReader:
    """Reads keepalived's notify FIFO into a :class:`VrrpInterpreter` (see module docstring)."""

    def __init__(self, path: Path | str, interpreter: VrrpInterpreter, deliver: Deliver, *,
                 max_line: int = MAX_NOTIFY_LINE,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.path = Path(path)
        self.interpreter = interpreter
        self._deliver = deliver
        self._splitter = LineSplitter(max_line)
        self._loop = loop
        self._fd: int | None = None
        self._opens = 0
        self._eofs = 0
        self._bytes = 0
        self._lines = 0
        self._read_errors = 0
        self._events = 0

    def start(self) -> None:
        """Create (if needed) and open the FIFO, and start watching it."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        ensure_fifo(self.path)
        self._open()

    def close(self) -> None:
        """Stop watching and close the FIFO (the FIFO file stays)."""
        if self._fd is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def statistics(self) -> FifoReaderStatistics:
        return FifoReaderStatistics(
            opens=self._opens, eofs=self._eofs, bytes_read=self._bytes, lines=self._lines,
            overlong_lines=self._splitter.overlong, read_errors=self._read_errors,
            events=self._events)

    # ----------------------------------------------------------------------------------------

    def _open(self) -> None:
        assert self._loop is not None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise FifoError(exc.errno, f"cannot open {self.path}: {exc.strerror}") from None
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise FifoError(errno.EEXIST, f"{self.path} is not a FIFO")
        self._fd = fd
        self._opens += 1
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        assert self._fd is not None
        try:
            chunk = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._read_errors += 1
            log.warning("vrrp_fifo.read_failed path=%s error=%s", self.path, exc.strerror)
            return
        if not chunk:
            self._eof()
            return
        self._bytes += len(chunk)
        self._split(chunk)

    def _split(self, chunk: bytes) -> None:
        for line in self._splitter.feed(chunk):
            self._lines += 1
            self._emit(self.interpreter.feed_line(line))

    def _eof(self) -> None:
        # Every writer is gone: a partial line will never be completed.
        self._eofs += 1
        self._splitter.reset()
        self.close()
        self._emit(self.interpreter.notifier_closed())
        try:
            ensure_fifo(self.path)  # someone may have removed it meanwhile
            self._open()
        except OSError as exc:
            self._read_errors += 1
            log.error("vrrp_fifo.reopen_failed path=%s error=%s", self.path, exc)

    def _emit(self, events: Sequence[VrrpEvent]) -> None:
        for ev in events:
            self._events += 1
            self._deliver(ev)


def notify_handler(interpreter: VrrpInterpreter, deliver: Deliver
                   ) -> Callable[[Mapping[str, Any]], Awaitable[Any]]:
    """The daemon's ``notify`` control handler: ``{"instance": str, "state": str}`` (and an
    optional integer ``priority``) into the interpreter, events to ``deliver``. Answers the
    number of events; a bad request raises ControlError (one line back to ``lbsync notify``)."""
    from lbsync.control import ControlError

    async def handle(args: Mapping[str, Any]) -> Any:
        instance = args.get("instance")
        state = args.get("state")
        priority = args.get("priority", 0)
        if not isinstance(instance, str) or not isinstance(state, str):
            raise ControlError("notify needs string 'instance' and 'state'")
        if isinstance(priority, bool) or not isinstance(priority, int) \
                or not 0 <= priority <= 255:
            raise ControlError("notify: 'priority' must be an integer 0..255")
        try:
            events = interpreter.notify(instance, state, priority)
        except NotifyError as exc:
            raise ControlError(f"notify: {exc}") from None
        for ev in events:
            deliver(ev)
        return {"events": [type(ev).__name__ for ev in events]}

    return handle


# --------------------------------------------------------------------------------------------
# The daemon's side


RECENT_EVENTS = 32


class VrrpSink(Protocol):
    """Who acts on keepalived's verdicts (the node's :class:`lbsync.ops.Ops`)."""

    def vrrp_peer_verdict(self, peer: int, dead: bool) -> None:
        """keepalived took over ``peer``'s instance (``dead``) or gave it back."""

    def vrrp_own_link(self, failed: bool) -> None:
        """This node's own instance entered FAULT (``failed``) or left it."""

    def vrrp_signal_lost(self, reason: str) -> None:
        """keepalived stopped or closed the FIFO: its earlier verdicts no longer hold."""


class VrrpSignal:
    """keepalived as the daemon's second failure signal: a :class:`VrrpInterpreter` fed by a
    :class:`FifoReader` on the node's FIFO and by the ``notify`` control command
    (:meth:`handler`); every event except :class:`VrrpInstanceChanged` goes to ``sink``.
    Events are remembered (the last :data:`RECENT_EVENTS`, with ``time.monotonic()``, which
    every namespace of a host shares, so tests compare them with the instant they failed a
    node) and counted by kind."""

    def __init__(self, *, self_id: int, node_ids: Sequence[int], fifo: Path | str,
                 sink: VrrpSink, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.interpreter = VrrpInterpreter(self_id, node_ids)
        self.reader = FifoReader(fifo, self.interpreter, self._deliver, loop=loop)
        self.sink = sink
        self.fifo_error = ""
        self.reporting = False
        """keepalived has reported an instance state and has not stopped since (the daemon
        then leaves link tracking to it)."""
        self._counts: Counter[str] = Counter()
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)

    def start(self) -> bool:
        """Open the FIFO; False (logged, shown in statistics) if it cannot be opened: the
        daemon runs on, with heartbeats and the link poll only."""
        try:
            self.reader.start()
        except OSError as exc:
            self.fifo_error = str(exc)
            log.error("vrrp.fifo_failed path=%s error=%s", self.reader.path, exc)
            return False
        log.info("vrrp.reading fifo=%s", self.reader.path)
        return True

    def close(self) -> None:
        self.reader.close()

    def handler(self) -> Callable[[Mapping[str, Any]], Awaitable[Any]]:
        """The ``notify`` control handler (``lbsync notify``) on the same interpreter."""
        return notify_handler(self.interpreter, self._deliver)

    def _deliver(self, ev: VrrpEvent) -> None:
        name = type(ev).__name__
        self._counts[name] += 1
        if isinstance(ev, VrrpInstanceChanged):
            self.reporting = ev.state not in ("STOP", "DELETED") or (
                ev.node_id != self.interpreter.self_id and self.reporting)
            return
        if isinstance(ev, VrrpSignalLost):
            self.reporting = False
        self._recent.append(event_record(ev, time.monotonic()))
        log.warning("vrrp.%s %s", name,
                    " ".join(f"{k}={v}" for k, v in dataclasses.asdict(ev).items()))
        try:
            if isinstance(ev, VrrpPeerDeclaredDead):
                self.sink.vrrp_peer_verdict(ev.node_id, True)
            elif isinstance(ev, VrrpPeerReturned):
                self.sink.vrrp_peer_verdict(ev.node_id, False)
            elif isinstance(ev, VrrpOwnLinkFailed):
                self.sink.vrrp_own_link(True)
            elif isinstance(ev, VrrpOwnLinkRecovered):
                self.sink.vrrp_own_link(False)
            elif isinstance(ev, VrrpSignalLost):
                self.sink.vrrp_signal_lost(ev.reason)
        except Exception as exc:  # a failing consumer must not stop the reader
            self._counts["sink_errors"] += 1
            log.error("vrrp.sink_failed event=%s error=%r", name, exc)

    def statistics(self) -> dict[str, Any]:
        """Plain snapshot for ``status --json``: FIFO, interpreter and reader counters, events
        by kind, the recent events."""
        return {"fifo": str(self.reader.path), "fifo_error": self.fifo_error,
                "reporting": self.reporting,
                "interpreter": _plain(self.interpreter.statistics()),
                "reader": dataclasses.asdict(self.reader.statistics()),
                "events": dict(self._counts), "recent": list(self._recent)}


def _plain(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = dict(v) if isinstance(v, Mapping) else v
    return out


# --------------------------------------------------------------------------------------------
# `python -m lbsync.vrrp_adapter`: print events as JSON lines


def event_record(ev: VrrpEvent, now: float) -> dict[str, Any]:
    """An event as a JSON-ready dict: ``{"t": now, "event": name, ...fields}``."""
    rec: dict[str, Any] = {"t": now, "event": type(ev).__name__}
    rec.update(dataclasses.asdict(ev))
    return rec


async def _watch(fifo: str, self_id: int, nodes: Sequence[int]) -> None:
    interp = VrrpInterpreter(self_id, nodes)

    def deliver(ev: VrrpEvent) -> None:
        sys.stdout.write(json.dumps(event_record(ev, time.monotonic())) + "\n")
        sys.stdout.flush()

    reader = FifoReader(fifo, interp, deliver)
    reader.start()
    sys.stdout.write(json.dumps({"t": time.monotonic(), "event": "ready"}) + "\n")
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()  # until cancelled (SIGTERM/SIGINT end the process)
    finally:
        reader.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lbsync.vrrp_adapter",
                                description="print lbsync VRRP events read from a FIFO")
    p.add_argument("--fifo", required=True)
    p.add_argument("--self-id", type=int, required=True)
    p.add_argument("--nodes", required=True, help="comma-separated node ids")
    args = p.parse_args(argv)
    try:
        nodes = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        p.error("--nodes: comma-separated integers")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_watch(args.fifo, args.self_id, nodes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
