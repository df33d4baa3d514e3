"""The control socket: the local CLI talks to its node's daemon over a root-only Unix socket.

Wire: one JSON object per line each way. Request ``{"cmd": NAME, "args": {...}}``; answer
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``. Requests are bounded in
size; a handler's exception becomes an error answer, never a dead daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


class ControlError(Exception):
    """The daemon refused a request, or could not be reached; ``str()`` is one line."""


class ControlServer:
    """Serves registered command handlers on a Unix socket (mode 0600)."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self.requests = 0
        self.errors = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._answer(writer, {"ok": False, "error": "request too large"})
                    return
                if not line:
                    return
                self.requests += 1
                await self._answer(writer, await self._dispatch(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("request must be an object with a string 'cmd'")
            args = req.get("args", {})
            if not isinstance(args, dict):
                raise ValueError("'args' must be an object")
        except ValueError as exc:
            self.errors += 1
            return {"ok": False, "error": f"bad request: {exc}"}
        handler = self.handlers.get(req["cmd"])
        if handler is None:
            self.errors += 1
            return {"ok": False, "error": f"unknown command {req['cmd']!r}"}
        try:
            return {"ok": True, "result": await handler(args)}
        except ControlError as exc:
            self.errors += 1
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a handler bug must not take the daemon down
            self.errors += 1
            log.exception("control.handler_failed cmd=%s", req["cmd"])
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, obj: Mapping[str, Any]) -> None:
        writer.write(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")
        await writer.drain()


def call(path: Path, cmd: str, args: Mapping[str, Any] | None = None,
         timeout: float = 30.0) -> Any:
    """Blocking client for the CLI: one request, one answer; raises ControlError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no daemon socket at {path} (is `lbsync run` running?)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path} (root only)") from None
        except ConnectionRefusedError:
            raise ControlError(f"daemon socket {path} refuses connections (stale?)") from None
        s.sendall(json.dumps({"cmd": cmd, "args": dict(args or {})}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ControlError("daemon closed the control connection")
            buf += chunk
    except TimeoutError:
        raise ControlError(f"daemon did not answer within {timeout:.0f} s") from None
    finally:
        s.close()
    ans = json.loads(buf)
    if not ans.get("ok"):
        raise ControlError(str(ans.get("error")))
    return ans.get("result")
