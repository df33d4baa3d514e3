"""Peer control (lbsync/peerctl.py): the frame rules on their own (a virtual wall clock), then
the asyncio listener and client on real loopback TCP sockets: every hostile frame (wrong key,
bad MAC, replay, stale or future timestamp, unknown sender, wrong receiver or source address,
oversized, truncated, random garbage, a command outside the allow-list) is rejected, counted
by reason, and runs nothing; the relay answers with the peer's result on one persistent
connection. Also the ``replication.control_port`` key, and the CLI side's :class:`Farm` in
relay mode (only the local socket is opened; instants of other nodes are brought to the local
clock)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lbsync.config import ConfigError, parse_cluster
from lbsync.control import ControlError
from lbsync.drill import DrillError, Farm, rebalance_once, run_fail_drill
from lbsync.peerctl import (
    HEADER_LEN,
    KIND_ANSWER,
    KIND_REQUEST,
    MAX_REQUEST,
    REJECT_REASONS,
    WINDOW,
    FrameChecker,
    FrameRejected,
    PeerControl,
    PeerUnreachable,
    ReplayCache,
    check_request,
    clock_sample,
    encode_frame,
    parse_header,
)
from lbsync.replication.auth import KeyRing

RING = KeyRing({1: b"k" * 32}, 1)
OTHER_SECRET = KeyRing({1: b"x" * 32}, 1)  # same key id, another secret
OTHER_ID = KeyRing({7: b"k" * 32}, 7)  # a key id the receiver does not hold
ADDRS = {1: "127.0.0.1", 2: "127.0.0.2", 3: "127.0.0.3"}
NOW = 1_800_000_000.0


def checker(node_id: int = 2, ring: KeyRing = RING, **kw: Any) -> FrameChecker:
    return FrameChecker(node_id=node_id, keyring=lambda: ring, addresses=ADDRS, **kw)


def request(*, ring: KeyRing = RING, sender: int = 1, receiver: int = 2, wall: float = NOW,
            nonce: bytes | None = None, body: dict[str, Any] | None = None,
            kind: int = KIND_REQUEST) -> bytes:
    return encode_frame(ring, kind=kind, sender=sender, receiver=receiver, wall=wall,
                        nonce=nonce or random.randbytes(16),
                        body=body if body is not None else {"cmd": "status", "args": {}})


def check(c: FrameChecker, data: bytes, *, now: float = NOW, peer: str | None = "127.0.0.1",
          kind: int = KIND_REQUEST) -> Any:
    head = parse_header(data[:HEADER_LEN], max_body=MAX_REQUEST)
    return c.check(head, data[HEADER_LEN:], raw_header=data[:HEADER_LEN], now_wall=now,
                   kind=kind, peer_address=peer)


# ------------------------------------------------------------------------------ frame rules


def test_a_good_request_is_accepted_and_parsed() -> None:
    c = checker()
    f = check(c, request(body={"cmd": "handoff-seal", "args": {"buckets": [3]}}))
    assert f.header.sender == 1 and f.header.receiver == 2
    assert check_request(f.body) == ("handoff-seal", {"buckets": [3]})
    assert c.accepted == 1 and sum(c.statistics().values()) == 0


@pytest.mark.parametrize(("frame", "reason", "kw"), [
    (lambda: request(ring=OTHER_SECRET), "bad_mac", {}),
    (lambda: request(ring=OTHER_ID), "unknown_key", {}),
    (lambda: request(sender=9), "unknown_sender", {}),
    (lambda: request(sender=2), "unknown_sender", {}),  # "from" the receiver itself
    (lambda: request(receiver=3), "wrong_receiver", {}),
    (lambda: request(wall=NOW - WINDOW - 1), "stale", {}),
    (lambda: request(wall=NOW + WINDOW + 1), "stale", {}),
    (lambda: request(), "wrong_address", {"peer": "127.0.0.3"}),
    (lambda: request(kind=KIND_ANSWER), "bad_kind", {}),
])
def test_hostile_frames_are_rejected_and_counted(frame: Any, reason: str,
                                                 kw: dict[str, Any]) -> None:
    c = checker()
    with pytest.raises(FrameRejected) as exc:
        check(c, frame(), **kw)
    assert exc.value.reason == reason
    assert c.statistics()[reason] == 1 and c.accepted == 0


def test_any_flipped_bit_fails_the_mac() -> None:
    c = checker()
    good = request()
    for i in range(HEADER_LEN, len(good)):  # body and tag; header bits may fail earlier
        bad = bytearray(good)
        bad[i] ^= 0x04
        with pytest.raises(FrameRejected) as exc:
            check(c, bytes(bad))
        assert exc.value.reason == "bad_mac"
    assert c.accepted == 0


def test_a_replayed_frame_is_rejected_within_the_window() -> None:
    c = checker()
    data = request()
    check(c, data)
    with pytest.raises(FrameRejected, match="replay"):
        check(c, data, now=NOW + 5)
    # after the window it is stale, never accepted again
    with pytest.raises(FrameRejected, match="stale"):
        check(c, data, now=NOW + WINDOW + 1)
    assert c.statistics()["replay"] == 1 and c.accepted == 1


def test_the_replay_cache_is_bounded_and_refuses_rather_than_forgets() -> None:
    c = checker(replay_entries=4)
    for _ in range(4):
        check(c, request())
    with pytest.raises(FrameRejected, match="replay_cache_full"):
        check(c, request())
    assert len(c.replay) == 4
    # once their window has passed the entries expire and new frames are accepted
    check(c, request(wall=NOW + WINDOW + 1), now=NOW + WINDOW + 1)
    assert len(c.replay) == 1


def test_replay_cache_expires_in_order() -> None:
    cache = ReplayCache(window=10.0, max_entries=100)
    assert cache.check_and_add(1, b"a" * 16, 0.0, 0.0) == "ok"
    assert cache.check_and_add(1, b"a" * 16, 0.0, 9.0) == "replay"
    assert cache.check_and_add(3, b"a" * 16, 0.0, 9.0) == "ok"  # per sender
    assert cache.check_and_add(1, b"a" * 16, 0.0, 11.0) == "ok"  # expired (stale anyway)
    assert len(cache) == 2


def test_oversized_and_truncated_frames() -> None:
    head = struct.pack("!4sBBBBBBQ16sI", b"LBPC", 1, KIND_REQUEST, 1, 1, 2, 0,
                       int(NOW * 1000), b"n" * 16, MAX_REQUEST + 1)
    with pytest.raises(FrameRejected, match="too_large"):
        parse_header(head, max_body=MAX_REQUEST)
    with pytest.raises(FrameRejected, match="truncated"):
        parse_header(head[:20], max_body=MAX_REQUEST)
    c = checker()
    data = request()
    with pytest.raises(FrameRejected, match="truncated"):
        check(c, data[:-3])
    assert c.statistics()["truncated"] == 1


def test_an_authenticated_body_that_is_not_json_is_bad_body() -> None:
    c = checker()
    data = bytearray(request(body={"cmd": "status"}))
    # re-sign a frame whose body is not JSON: a peer with the key but a bug
    from lbsync.peerctl import _HEADER, _tag
    body = b"\xff{not json"
    head = _HEADER.pack(b"LBPC", 1, KIND_REQUEST, 1, 1, 2, 0, int(NOW * 1000),
                        bytes(data[12:28]), len(body))
    with pytest.raises(FrameRejected, match="bad_body"):
        check(c, head + body + _tag(b"k" * 32, head + body))
    deep = b"[" * 30_000 + b"]" * 30_000
    head = _HEADER.pack(b"LBPC", 1, KIND_REQUEST, 1, 1, 2, 0, int(NOW * 1000),
                        b"d" * 16, len(deep))
    with pytest.raises(FrameRejected, match="bad_body"):
        check(c, head + deep + _tag(b"k" * 32, head + deep))


def test_random_garbage_never_raises_anything_but_a_rejection() -> None:
    rng = random.Random(8)
    c = checker()
    good = request()
    for i in range(3000):
        if i % 3 == 0:
            data = rng.randbytes(rng.randrange(0, 200))
        elif i % 3 == 1:  # a valid magic and version with random rest
            data = b"LBPC\x01" + rng.randbytes(rng.randrange(0, 200))
        else:  # the good frame with a few random bytes changed
            b = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b)
            if data == good:
                continue
        try:
            head = parse_header(data[:HEADER_LEN], max_body=MAX_REQUEST)
            c.check(head, data[HEADER_LEN:], raw_header=data[:HEADER_LEN], now_wall=NOW,
                    kind=KIND_REQUEST, peer_address="127.0.0.1")
        except FrameRejected as exc:
            assert exc.reason in REJECT_REASONS
        else:
            raise AssertionError(f"garbage accepted: {data!r}")
    assert c.accepted == 0


def test_only_allow_listed_commands_are_relayable() -> None:
    for cmd in ("relay", "store-corrupt", "store", "notify", "nope"):
        with pytest.raises(FrameRejected, match="not_relayable"):
            check_request({"cmd": cmd, "args": {}})
    for body in ({"cmd": 3}, {"cmd": "status", "args": []}, {}):
        with pytest.raises(FrameRejected, match="bad_body"):
            check_request(body)


def test_clock_sample_brackets_the_offset() -> None:
    # peer clock = ours + 100; 2 ms each way; 1 ms service
    s = clock_sample(t0=10.0, t_recv=110.002, t_send=110.003, t3=10.005)
    assert s.offset_s == pytest.approx(100.0)
    assert s.error_s == pytest.approx(0.002)
    # asymmetric paths: the true offset stays within the bound
    s = clock_sample(t0=10.0, t_recv=110.0035, t_send=110.0045, t3=10.005)
    assert abs(s.offset_s - 100.0) <= s.error_s + 1e-9


# ------------------------------------------------------------------------------ config


def _cluster(**replication: Any) -> dict[str, Any]:
    return {"cluster": {"name": "t"}, "replication": {"mode": "unicast", **replication},
            "nodes": [{"id": 1, "replication_address": "198.18.0.1"},
                      {"id": 2, "replication_address": "198.18.0.2"}]}


def test_control_port_defaults_to_replication_port_plus_one() -> None:
    assert parse_cluster(_cluster()).replication.peer_control_port == 7947
    assert parse_cluster(_cluster(port=9000)).replication.peer_control_port == 9001
    assert parse_cluster(_cluster(control_port=8000)).replication.peer_control_port == 8000


@pytest.mark.parametrize(("kw", "match"), [
    ({"control_port": -1}, "replication.control_port"),
    ({"control_port": 70000}, "replication.control_port"),
    ({"control_port": "x"}, "replication.control_port"),
    ({"port": 65535}, "replication.control_port: port \\+ 1"),
])
def test_bad_control_port_is_one_error_naming_the_key(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_cluster(_cluster(**kw))


# ------------------------------------------------------------------------------ over TCP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class _Repl:
    peer_control_port: int


@dataclass(frozen=True)
class _Node:
    id: int
    replication_address: str


@dataclass(frozen=True)
class _Cfg:
    replication: _Repl
    nodes: tuple[_Node, ...] = tuple(_Node(i, a) for i, a in ADDRS.items())


@dataclass
class Peer:
    """A node's PeerControl with handlers that record what ran."""

    ctl: PeerControl
    ran: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def make_peer(node_id: int, port: int, ring: KeyRing = RING,
              wall: Any = time.time) -> Peer:
    ran: list[tuple[str, dict[str, Any]]] = []

    def handler(name: str) -> Any:
        async def h(args: Any) -> Any:
            ran.append((name, dict(args)))
            if args.get("fail"):
                raise ControlError("refused by the handler")
            if args.get("big"):
                return "x" * int(args["big"])
            return {"node_id": node_id, "cmd": name, "monotonic": time.monotonic()}
        return h

    handlers = {n: handler(n) for n in ("status", "handoff-seal", "store-corrupt")}
    ctl = PeerControl(cfg=_Cfg(_Repl(port)), node_id=node_id, keyring=lambda: ring,
                      handlers=handlers, wall=wall)
    return Peer(ctl, ran)


async def _raw(port: int, data: bytes, *, close: bool = True) -> bytes:
    """Send ``data`` from 127.0.0.1 to node 2's listener; whatever comes back before EOF."""
    r, w = await asyncio.open_connection("127.0.0.2", port, local_addr=("127.0.0.1", 0))
    try:
        w.write(data)
        await w.drain()
        if close:
            w.write_eof()
        return await asyncio.wait_for(r.read(), 5.0)
    except ConnectionResetError:  # closed by the listener with our bytes unread
        return b""
    finally:
        w.close()


def answer_error(data: bytes) -> str:
    """The error of an answer frame (its tag not checked here: the relay tests do)."""
    head = parse_header(data[:HEADER_LEN], max_body=1 << 20)
    assert head.kind == KIND_ANSWER and len(data) == HEADER_LEN + head.body_len + 16
    body = json.loads(data[HEADER_LEN:HEADER_LEN + head.body_len])
    assert body["ok"] is False
    return str(body["error"])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_relay_reaches_the_peer_on_one_persistent_connection() -> None:
    async def main() -> None:
        port = _free_port()
        one, two = make_peer(1, port), make_peer(2, port)
        await two.ctl.start()
        try:
            for _ in range(3):
                ans = await one.ctl.relay({"node": 2, "cmd": "status", "args": {"x": 1}})
                assert ans["result"]["node_id"] == 2
                assert abs(ans["clock"]["offset_s"]) <= ans["clock"]["error_s"] + 1e-3
            assert two.ran == [("status", {"x": 1})] * 3
            st1, st2 = one.ctl.statistics(), two.ctl.statistics()
            assert st1.relayed == 3 and st1.relay_connects == 1
            assert st2.served == 3 and st2.served_by_sender == {"1": 3}
            assert sum(st2.rejected.values()) == 0
            # a handler's refusal comes back as the relay's error, one line
            with pytest.raises(ControlError, match="refused by the handler"):
                await one.ctl.relay({"node": 2, "cmd": "handoff-seal",
                                     "args": {"fail": True}})
            # the peer restarts: the stale connection is replaced once, transparently
            await two.ctl.close()
            two = make_peer(2, port)
            await two.ctl.start()
            ans = await one.ctl.relay({"node": 2, "cmd": "status"})
            assert ans["result"]["node_id"] == 2
            assert one.ctl.statistics().relay_connects == 2
        finally:
            await two.ctl.close()
            await one.ctl.close()

    run(main())


def test_relay_refuses_bad_requests_locally() -> None:
    async def main() -> None:
        one = make_peer(1, _free_port())
        for args, match in (({"node": 1, "cmd": "status"}, "this node"),
                            ({"node": 9, "cmd": "status"}, "not in the cluster"),
                            ({"node": "x", "cmd": "status"}, "integer"),
                            ({"node": 2, "cmd": "store-corrupt"}, "not a relayable"),
                            ({"node": 2, "cmd": "relay"}, "not a relayable"),
                            ({"node": 2, "cmd": "status", "timeout": 0}, "timeout"),
                            ({"node": 2, "cmd": "status", "args": [1]}, "object")):
            with pytest.raises(ControlError, match=match):
                await one.ctl.relay(args)
        # nobody listening: a one-line unreachable error, counted
        with pytest.raises(PeerUnreachable, match="node 2"):
            await one.ctl.relay({"node": 2, "cmd": "status", "timeout": 2})
        assert one.ctl.statistics().relay_failures == 1
        await one.ctl.close()

    run(main())


def test_hostile_peers_over_tcp_run_nothing_and_are_counted() -> None:
    async def main() -> None:
        port = _free_port()
        two = make_peer(2, port)
        await two.ctl.start()
        try:
            rng = random.Random(3)
            # random garbage, no answer
            for _ in range(20):
                assert await _raw(port, rng.randbytes(rng.randrange(1, 300))) == b""
            # wrong key, unknown key id, from an unknown node: no answer
            for frame in (request(ring=OTHER_SECRET), request(ring=OTHER_ID),
                          request(sender=9, wall=time.time())):
                assert await _raw(port, frame) == b""
            # a configured peer's valid MAC but stale, or for another node: told why
            for frame, reason in ((request(wall=time.time() - 120), "stale"),
                                  (request(receiver=3, wall=time.time()), "wrong_receiver")):
                assert answer_error(await _raw(port, frame)).startswith(
                    f"refused by node 2: {reason}")
            # oversized: refused from the header alone
            head = struct.pack("!4sBBBBBBQ16sI", b"LBPC", 1, KIND_REQUEST, 1, 1, 2, 0,
                               int(time.time() * 1000), b"n" * 16, 10 * MAX_REQUEST)
            assert await _raw(port, head + b"x" * 1000) == b""
            # truncated: half a frame, then EOF
            good = request(wall=time.time())
            assert await _raw(port, good[:len(good) // 2]) == b""
            # a good frame from the wrong source address
            r, w = await asyncio.open_connection("127.0.0.2", port,
                                                 local_addr=("127.0.0.3", 0))
            w.write(request(wall=time.time()))
            w.write_eof()
            assert "wrong_address" in answer_error(await asyncio.wait_for(r.read(), 5.0))
            w.close()
            assert two.ran == []
            # replay: the first copy runs, the second is refused
            frame = request(wall=time.time(), body={"cmd": "handoff-seal",
                                                    "args": {"buckets": [1]}})
            first = await _raw(port, frame)
            assert first and parse_header(first[:HEADER_LEN], max_body=1 << 20).kind == \
                KIND_ANSWER
            assert "replay" in answer_error(await _raw(port, frame))
            assert two.ran == [("handoff-seal", {"buckets": [1]})]
            # an authenticated request outside the allow-list: an error answer, nothing runs
            ans = await _raw(port, request(wall=time.time(),
                                           body={"cmd": "store-corrupt",
                                                 "args": {"bucket": 1}}))
            assert b"not_relayable" in ans
            assert two.ran == [("handoff-seal", {"buckets": [1]})]
            st = two.ctl.statistics()
            rej = st.rejected
            for reason in ("bad_mac", "unknown_key", "stale", "unknown_sender",
                           "wrong_receiver", "too_large", "truncated", "wrong_address",
                           "replay", "not_relayable"):
                assert rej[reason] >= 1, (reason, rej)
            assert sum(rej.values()) >= 30
            # and it still serves a good relay
            one = make_peer(1, port)
            assert (await one.ctl.relay({"node": 2, "cmd": "status"}))["result"]["node_id"] == 2
            await one.ctl.close()
        finally:
            await two.ctl.close()

    run(main())


def test_a_client_with_the_wrong_key_gets_no_answer_and_nothing_runs() -> None:
    async def main() -> None:
        port = _free_port()
        two = make_peer(2, port)
        bad = make_peer(1, port, ring=OTHER_SECRET)
        await two.ctl.start()
        try:
            with pytest.raises(PeerUnreachable):
                await bad.ctl.relay({"node": 2, "cmd": "status", "timeout": 3})
            assert two.ran == [] and two.ctl.statistics().rejected["bad_mac"] >= 1
        finally:
            await bad.ctl.close()
            await two.ctl.close()

    run(main())


def test_an_answer_from_an_impostor_is_refused() -> None:
    """Node 3 (with the key) answering in node 2's place: the client wants node 2's MAC'd
    answer to its own nonce."""
    async def main() -> None:
        port = _free_port()

        async def impostor(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            raw = await r.readexactly(HEADER_LEN)
            head = parse_header(raw, max_body=MAX_REQUEST)
            await r.readexactly(head.body_len + 16)
            w.write(encode_frame(RING, kind=KIND_ANSWER, sender=3, receiver=1,
                                 wall=time.time(), nonce=b"i" * 16,
                                 body={"re": head.nonce.hex(), "ok": True, "result": "forged",
                                       "t_recv": 0, "t_send": 0}))
            await w.drain()
            w.close()

        server = await asyncio.start_server(impostor, "127.0.0.2", port)
        one = make_peer(1, port)
        try:
            with pytest.raises(PeerUnreachable, match="bad answer"):
                await one.ctl.relay({"node": 2, "cmd": "status", "timeout": 3})
            assert one.ctl.statistics().rejected["unknown_sender"] == 1
        finally:
            await one.ctl.close()
            server.close()
            await server.wait_closed()

    run(main())


# ------------------------------------------------------------------------------ Farm


class FakeDaemons:
    """What the CLI's control calls reach: node 1's daemon (the only socket) relaying to
    nodes 2 and 3, whose monotonic clocks run 100 s and -50 s off node 1's."""

    OFFSET = {1: 0.0, 2: 100.0, 3: -50.0}

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.relayed: list[tuple[int, str]] = []

    def now(self, node: int) -> float:
        return time.monotonic() + self.OFFSET[node]

    def answer(self, node: int, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "status":
            return {"node_id": node, "map_epoch": 5}
        if cmd == "rebalance-plan":
            return {"map_epoch": 4, "new_epoch": 5, "view": [], "current": [], "target": [2],
                    "moves": 1, "batches": [[[0, 2, 3]]]}
        if cmd == "map-propose":
            return {"map_epoch": 5}
        if cmd == "handoff-seal":
            return {"buckets": args["buckets"], "skipped": [], "seq": 9,
                    "released_monotonic": self.now(node)}
        if cmd == "handoff-take":
            # the release instant arrives on the taker's clock
            assert abs(args["released_monotonic"] - self.now(node)) < 1.0
            return {"complete": True, "claimed_monotonic": self.now(node) + 0.004}
        raise AssertionError(cmd)

    def call(self, path: Path, cmd: str, args: dict[str, Any] | None = None,
             timeout: float = 30.0) -> Any:
        self.paths.append(path)
        args = dict(args or {})
        if cmd != "relay":
            return self.answer(1, cmd, args)
        node = args["node"]
        self.relayed.append((node, args["cmd"]))
        return {"result": self.answer(node, args["cmd"], args["args"]),
                "clock": {"offset_s": self.OFFSET[node], "error_s": 0.0001, "rtt_s": 0.0002}}


def test_relayed_farm_opens_only_the_local_socket_and_compares_clocks() -> None:
    fake = FakeDaemons()
    farm = Farm.relayed(1, Path("/run/lbsync/t-1.sock"), [1, 2, 3], call_fn=fake.call)
    rep = rebalance_once(farm, 1, max_concurrent=8)
    assert set(fake.paths) == {Path("/run/lbsync/t-1.sock")}
    assert (2, "handoff-seal") in fake.relayed and (3, "handoff-take") in fake.relayed
    # 100 s and -50 s offsets cancel out: the gap is the 4 ms the fake put between them
    assert rep["moved"] == 1 and 3.0 <= rep["per_bucket"]["0"]["gap_ms"] < 1000.0
    assert rep["clock_error_ms"] == pytest.approx(0.2)


def test_direct_farm_opens_every_socket() -> None:
    fake = FakeDaemons()
    socks = {n: Path(f"/run/lbsync/t-{n}.sock") for n in (1, 2, 3)}
    farm = Farm.direct(socks, call_fn=fake.call)
    assert [farm.status(n)["node_id"] for n in (1, 2, 3)] == [1, 1, 1]  # fake: all node 1
    assert fake.paths == list(socks.values()) and fake.relayed == []


def test_relayed_drill_refuses_to_fail_the_local_node() -> None:
    fake = FakeDaemons()
    farm = Farm.relayed(1, Path("/run/lbsync/t-1.sock"), [1, 2, 3], call_fn=fake.call)
    with pytest.raises(DrillError, match="this node"):
        run_fail_drill(farm, 1)
    assert fake.paths == []


def test_silent_and_surplus_connections_cannot_hold_the_listener(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import lbsync.peerctl as peerctl

    monkeypatch.setattr(peerctl, "FRAME_TIMEOUT", 0.2)
    monkeypatch.setattr(peerctl, "MAX_CONNECTIONS", 2)

    async def main() -> None:
        port = _free_port()
        two = make_peer(2, port)
        await two.ctl.start()
        try:
            # two silent connections take the slots; a third is turned away at once
            silent = [await asyncio.open_connection("127.0.0.2", port,
                                                    local_addr=("127.0.0.1", 0))
                      for _ in range(2)]
            await asyncio.sleep(0.05)
            assert await _raw(port, request(wall=time.time())) == b""
            # ... until the silent ones time out (nothing sent within FRAME_TIMEOUT)
            for r, _w in silent:
                assert await asyncio.wait_for(r.read(), 5.0) == b""
            for _r, w in silent:
                w.close()
            rej = two.ctl.statistics().rejected
            assert rej["too_many_connections"] == 1 and rej["frame_timeout"] == 2
            # a trickled header is cut off too
            r, w = await asyncio.open_connection("127.0.0.2", port,
                                                 local_addr=("127.0.0.1", 0))
            w.write(b"LBPC")
            assert await asyncio.wait_for(r.read(), 5.0) == b""
            w.close()
            assert two.ctl.statistics().rejected["frame_timeout"] == 3
            one = make_peer(1, port)
            assert (await one.ctl.relay({"node": 2, "cmd": "status"}))["result"]["node_id"] == 2
            await one.ctl.close()
            assert two.ran == [("status", {})]
        finally:
            await two.ctl.close()

    run(main())


def test_cli_relays_through_the_named_local_node(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from lbsync.cli import main
    from lbsync.lab.farm import cluster_dict, to_toml

    path = tmp_path / "cluster.toml"
    path.write_text(to_toml(cluster_dict("lbtu", 3, ipv6=False, buckets=64,
                                         directory=tmp_path)))
    node_file = Path("/etc/lbsync/node.toml")
    if not node_file.exists():  # no local node known: one line, exit 2
        assert main(["drill", "fail", "2", "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--node-id" in err[0]
    # failing the local node is refused before anything is sent (exit 1, one line)
    assert main(["drill", "fail", "1", "--node-id", "1", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this node" in err[0]
    # no local daemon: the relay's socket is named
    assert main(["rebalance", "--node-id", "2", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "lbtu-2.sock" in err


def test_the_listener_binds_before_its_address_exists_and_refuses_a_port_in_use() -> None:
    from lbsync.peerctl import listen_socket

    port = _free_port()
    s = listen_socket("198.18.255.254", port)  # not configured here: IP_FREEBIND
    s.close()
    a = listen_socket("127.0.0.1", port)
    try:
        with pytest.raises(OSError):
            listen_socket("127.0.0.1", port)
    finally:
        a.close()


def test_key_rotation_any_key_of_the_ring_is_accepted() -> None:
    both = KeyRing({1: b"k" * 32, 2: b"n" * 32}, 1)
    new_only = KeyRing({2: b"n" * 32}, 2)
    c = checker(ring=both)
    assert check(c, request(ring=new_only)).header.key_id == 2  # signed with the new key
    assert check(c, request(ring=RING)).header.key_id == 1  # and with the old one
    # the old key removed from a receiver: frames still signed with it are refused
    with pytest.raises(FrameRejected, match="unknown_key"):
        check(checker(ring=new_only), request(ring=RING))


def test_golden_request_frame() -> None:
    """Wire version 1, byte for byte: header fields, JSON body, BLAKE2b-128 tag
    (key 00..1f, person lbsync-pctl-v1)."""
    ring = KeyRing({1: bytes(range(32))}, 1)
    data = encode_frame(ring, kind=KIND_REQUEST, sender=1, receiver=2, wall=1800000000.5,
                        nonce=bytes(range(16)), body={"cmd": "status", "args": {}})
    assert data.hex() == (
        "4c425043" "01" "01" "01" "01" "02" "00" "000001a3185c51f4"
        "000102030405060708090a0b0c0d0e0f" "0000001a"
        + b'{"cmd":"status","args":{}}'.hex()
        + "084c5b5b46d6030396011948e1af7e8e")
    c = FrameChecker(node_id=2, keyring=lambda: ring, addresses=ADDRS)
    head = parse_header(data[:HEADER_LEN], max_body=MAX_REQUEST)
    frame = c.check(head, data[HEADER_LEN:], raw_header=data[:HEADER_LEN],
                    now_wall=1800000000.5, kind=KIND_REQUEST)
    assert frame.body == {"cmd": "status", "args": {}} and head.wall_ms == 1800000000500


def test_a_skewed_clock_is_named_in_the_relay_error() -> None:
    async def main() -> None:
        port = _free_port()
        two = make_peer(2, port)
        late = make_peer(1, port, wall=lambda: time.time() - 90)
        await two.ctl.start()
        try:
            with pytest.raises(ControlError, match="refused by node 2: stale: -9"):
                await late.ctl.relay({"node": 2, "cmd": "status", "timeout": 3})
            assert two.ran == [] and two.ctl.statistics().rejected["stale"] == 1
        finally:
            await late.ctl.close()
            await two.ctl.close()

    run(main())
