"""The FIFO reader adapter (a real FIFO, a real event loop), the ``notify`` control handler and
the ``lbsync notify`` / ``lbsync keepalived-config`` commands."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbsync import config
from lbsync.cli import main
from lbsync.config import load_cluster
from lbsync.control import ControlServer
from lbsync.keepalived import (
    NotifyError,
    VrrpEvent,
    VrrpInstanceChanged,
    VrrpInterpreter,
    VrrpOwnLinkFailed,
    VrrpPeerDeclaredDead,
    VrrpSignalLost,
    render_keepalived_conf,
)
from lbsync.ops_cli import parse_notify_words
from lbsync.vrrp_adapter import FifoError, FifoReader, LineSplitter, ensure_fifo, notify_handler

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "configs" / "cluster.toml"


def semantic(events: list[VrrpEvent]) -> list[VrrpEvent]:
    return [e for e in events if not isinstance(e, VrrpInstanceChanged)]


async def until(pred: Callable[[], bool], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=10),
       st.integers(min_value=1, max_value=30))
def test_line_splitter_is_independent_of_chunking(lines: list[bytes], cuts: list[int],
                                                  max_line: int) -> None:
    """However the stream is cut into reads, the same lines come out: those of at most
    ``max_line`` bytes, in order; the others are counted."""
    stream = b"".join(line + b"\n" for line in lines)
    sp = LineSplitter(max_line)
    out: list[bytes] = []
    pos, k = 0, 0
    while pos < len(stream):
        n = cuts[k % len(cuts)]
        out += sp.feed(stream[pos:pos + n])
        pos, k = pos + n, k + 1
    assert out == [line for line in lines if len(line) <= max_line]
    assert sp.overlong == sum(1 for line in lines if len(line) > max_line)


def test_line_splitter_reset_drops_partial_line() -> None:
    sp = LineSplitter(10)
    assert sp.feed(b"abc") == []
    sp.reset()
    assert sp.feed(b"de\nfg\n") == [b"de", b"fg"]
    assert sp.feed(b"x" * 11) == [] and sp.overlong == 1
    sp.reset()
    assert sp.feed(b"ok\n") == [b"ok"]


def test_ensure_fifo_creates_0600_and_refuses_other_files(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert ensure_fifo(tmp_path / "sub" / "f.fifo") is True
    finally:
        os.umask(old)
    st = os.stat(tmp_path / "sub" / "f.fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert ensure_fifo(tmp_path / "sub" / "f.fifo") is False
    (tmp_path / "plain").write_text("x")
    with pytest.raises(FifoError):
        ensure_fifo(tmp_path / "plain")


def test_reader_lines_partial_writes_overlong_eof_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "vrrp.fifo"
    events: list[VrrpEvent] = []

    async def scenario() -> None:
        reader = FifoReader(path, VrrpInterpreter(1, [1, 2, 3]), events.append, max_line=64)
        reader.start()
        try:
            # keepalived opens its end read-write and non-blocking; a plain writer will do
            w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(w, b'INSTANCE "lbsync-1" BACKUP 254\nINSTANCE "lbs')
            await until(lambda: len(events) == 1)
            os.write(w, b'ync-2" MASTER 200\n' + b"x" * 100)
            await until(lambda: len(events) == 3)
            assert semantic(events) == [VrrpPeerDeclaredDead(node_id=2)]
            # the overlong line is dropped up to its newline; the next line is intact
            os.write(w, b"y" * 100 + b'\nINSTANCE "lbsync-1" FAULT 254\n')
            await until(lambda: VrrpOwnLinkFailed() in events)
            os.write(w, b"garbage\n")
            await until(lambda: reader.statistics().lines == 4)
            os.close(w)  # the last writer goes: keepalived stopped
            await until(lambda: VrrpSignalLost(reason="fifo_closed") in events)
            s = reader.statistics()
            assert (s.opens, s.eofs, s.overlong_lines) == (2, 1, 1)
            # reopened: no hang-up until a new writer comes and goes (no busy loop)
            await asyncio.sleep(0.2)
            assert reader.statistics().eofs == 1
            w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(w, b'INSTANCE "lbsync-3" MASTER 250\n')
            await until(lambda: VrrpPeerDeclaredDead(node_id=3) in events)
            os.close(w)
            await until(lambda: reader.statistics().eofs == 2)
            s = reader.statistics()
            assert s.opens == 3 and s.events == len(events)
            it = reader.interpreter.statistics()
            assert it.malformed_lines == 1 and it.states["lbsync-3"] == "MASTER"
        finally:
            reader.close()

    asyncio.run(scenario())


def test_reader_recreates_a_removed_fifo_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "vrrp.fifo"
    events: list[VrrpEvent] = []

    async def scenario() -> None:
        reader = FifoReader(path, VrrpInterpreter(1, [1, 2]), events.append)
        reader.start()
        try:
            w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            path.unlink()
            os.close(w)
            await until(lambda: reader.statistics().opens == 2)
            assert stat.S_ISFIFO(os.stat(path).st_mode)
            w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(w, b'INSTANCE "lbsync-2" MASTER 200\n')
            os.close(w)
            await until(lambda: VrrpPeerDeclaredDead(node_id=2) in events)
        finally:
            reader.close()

    asyncio.run(scenario())


def test_reader_sees_lines_written_before_it_opened(tmp_path: Path) -> None:
    """keepalived opens its end read-write, so it can write before lbsync reads."""
    path = tmp_path / "vrrp.fifo"
    ensure_fifo(path)
    early = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    os.write(early, b'INSTANCE "lbsync-2" MASTER 200\n')
    events: list[VrrpEvent] = []

    async def scenario() -> None:
        reader = FifoReader(path, VrrpInterpreter(1, [1, 2]), events.append)
        reader.start()
        try:
            await until(lambda: VrrpPeerDeclaredDead(node_id=2) in events)
        finally:
            reader.close()

    try:
        asyncio.run(scenario())
    finally:
        os.close(early)


def test_notify_handler_through_control_socket_and_cli(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``lbsync notify`` reaches a daemon's ``notify`` handler; bad requests come back."""
    monkeypatch.setattr(config, "RUN_DIR", tmp_path)
    cfg = load_cluster(CLUSTER)
    events: list[VrrpEvent] = []
    rcs: list[int] = []

    async def scenario() -> None:
        server = ControlServer(cfg.runtime_path(1, "sock"),
                               {"notify": notify_handler(VrrpInterpreter(1, cfg.node_ids),
                                                         events.append)})
        await server.start()
        try:
            base = ["--config", str(CLUSTER), "--node-id", "1"]
            for argv in (["notify", "lbsync-3", "master", *base],
                         ["notify", "INSTANCE", "lbsync-1", "FAULT", "254", *base],
                         ["notify", "GROUP", "g", "MASTER", *base],
                         ["notify", "lbsync-99", "BACKUP", *base]):
                rcs.append(await asyncio.to_thread(main, argv))
            handler = server.handlers["notify"]
            from lbsync.control import ControlError
            for bad in ({"instance": 3, "state": "MASTER"},
                        {"instance": "lbsync-1", "state": "MASTER", "priority": 999},
                        {"instance": "lbsync-1", "state": "nope"}):
                with pytest.raises(ControlError):
                    await handler(bad)
        finally:
            await server.close()

    asyncio.run(scenario())
    # lbsync-99 is no node of this cluster: the daemon counts and ignores it (exit 0)
    assert rcs == [0, 0, 0, 0]
    assert semantic(events) == [VrrpPeerDeclaredDead(node_id=3), VrrpOwnLinkFailed()]


@pytest.mark.parametrize("argv, message", [
    (["notify", "lbsync-1"], "expected INSTANCE STATE"),
    (["notify", "lbsync-1", "sleepy"], "unknown VRRP state"),
    (["notify", "VI_1", "MASTER"], "not an lbsync instance"),
    (["notify", "INSTANCE", "lbsync-1", "MASTER", "high"], "priority must be an integer"),
    (["notify", "a", "b", "c", "d", "e"], "expected INSTANCE STATE"),
])
def test_notify_bad_arguments_one_line_exit_2(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--config", str(CLUSTER), "--node-id", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_notify_without_daemon_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(config, "RUN_DIR", tmp_path)
    assert main(["notify", "lbsync-2", "MASTER", "--config", str(CLUSTER), "--node-id", "1"]) == 1
    assert "no daemon socket" in capsys.readouterr().err


def test_parse_notify_words() -> None:
    assert parse_notify_words(["lbsync-2", "backup"]) == ("lbsync-2", "BACKUP", 0)
    assert parse_notify_words(["INSTANCE", "lbsync-2", "MASTER", "250"]) == \
        ("lbsync-2", "MASTER", 250)
    assert parse_notify_words(["GROUP", "g", "MASTER", "0"]) is None
    with pytest.raises(NotifyError):
        parse_notify_words(["INSTANCE", "lbsync-2", "MASTER", "256"])


def test_keepalived_config_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keepalived-config", "--config", str(CLUSTER), "--node-id", "2",
                 "--advert-int", "1", "--fifo", "/tmp/k.fifo", "--run-dir", "/tmp/kd"]) == 0
    out = capsys.readouterr().out
    assert out == render_keepalived_conf(load_cluster(CLUSTER), 2, advert_int=1,
                                         fifo_path="/tmp/k.fifo", run_dir="/tmp/kd")
    assert main(["keepalived-config", "--config", str(CLUSTER), "--node-id", "2",
                 "--advert-int", "0.001"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "advert_int" in err
    assert main(["keepalived-config", "--config", str(CLUSTER), "--node-id", "7"]) == 2
    assert main(["keepalived-config", "--config", str(CLUSTER), "--node-id", "1",
                 "--notify-command", "/usr/bin/lbsync notify --node-id 1"]) == 0
    assert 'notify "/usr/bin/lbsync notify --node-id 1"' in capsys.readouterr().out
