"""Operator commands without a daemon: the map snapshot and explanation over a fake node (real
``TargetMap``), and the CLI's argument errors (one line, exit 2)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from lbsync.cli import main
from lbsync.membership import TargetMap
from lbsync.ops import Ops, OpsError, explain_bucket, map_snapshot


@dataclass
class FakePeerState:
    value: str


@dataclass
class FakeHb:
    witness: bool = False


@dataclass
class FakePeer:
    node_id: int
    owned: frozenset[int]
    state: FakePeerState = field(default_factory=lambda: FakePeerState("alive"))
    last_hb: FakeHb | None = field(default_factory=FakeHb)


@dataclass
class PeerStatus:
    node_id: int
    state: str
    ready: bool = True
    fenced: bool = False
    incarnation: int = 1
    owned: int = 0


class FakeMs:
    def __init__(self, tm: TargetMap | None, owned: set[int], peers: list[FakePeer]) -> None:
        self.map = tm
        self.owned = frozenset(owned)
        self._peers = {p.node_id: p for p in peers}
        self.ready, self.fenced, self.incarnation = True, False, 1
        self.drained, self.weight = False, 1

    def reported_owned(self) -> dict[int, frozenset[int]]:
        return {p.node_id: p.owned for p in self._peers.values()
                if p.state.value != "lost" and p.last_hb is not None}

    def ready_view(self) -> tuple[Any, ...]:
        return ()

    def statistics(self) -> Any:
        class S:
            peers = tuple(PeerStatus(p.node_id, p.state.value, owned=len(p.owned))
                          for p in self._peers.values())
        return S()


class FakeStore:
    def count(self, b: int) -> int:
        return b


class FakeCfg:
    node_ids = (1, 2, 3)


class FakeNode:
    def __init__(self, ms: FakeMs) -> None:
        self.ms, self.B, self.node_id = ms, 6, 1
        self.cfg, self.store = FakeCfg(), FakeStore()
        self.in_kernel: list[set[bytes]] = [set() for _ in range(6)]


def tmap() -> TargetMap:
    owners = [1, 1, 2, 2, 3, 3]
    chains = [[n for n in (1, 2, 3) if n != o] for o in owners]
    return TargetMap.build(epoch=4, proposer=1, owners=owners, successors=chains)


def test_map_snapshot_agrees_and_counts() -> None:
    ms = FakeMs(tmap(), {0, 1}, [FakePeer(2, frozenset({2, 3})), FakePeer(3, frozenset({4, 5}))])
    snap = map_snapshot(FakeNode(ms))
    assert [r["actual"] for r in snap["rows"]] == [[1], [1], [2], [2], [3], [3]]
    assert snap["counts"] == {str(n): {"target": 2, "actual": 2} for n in (1, 2, 3)}
    assert snap["misplaced"] == snap["unowned"] == snap["multiple"] == 0
    assert snap["rows"][5]["store_entries"] == 5 and snap["map_epoch"] == 4


def test_map_snapshot_shows_a_takeover_in_flight_and_lost_peers() -> None:
    lost = FakePeer(3, frozenset({4, 5}), state=FakePeerState("lost"))
    ms = FakeMs(tmap(), {0, 1, 4}, [FakePeer(2, frozenset({2, 3})), lost])
    snap = map_snapshot(FakeNode(ms))
    assert snap["rows"][4]["actual"] == [1] and snap["rows"][5]["actual"] == []
    assert snap["misplaced"] == 2 and snap["unowned"] == 1
    why = explain_bucket(FakeNode(ms), 5)["why"]
    assert any("nobody reports owning" in w for w in why)
    assert any("node 1" in w for w in explain_bucket(FakeNode(ms), 4)["why"])


def test_explain_rejects_a_bucket_out_of_range() -> None:
    with pytest.raises(OpsError, match="out of range"):
        explain_bucket(FakeNode(FakeMs(tmap(), set(), [])), 6)


def test_map_without_an_agreed_map() -> None:
    node = FakeNode(FakeMs(None, set(), []))
    assert map_snapshot(node)["map_epoch"] == 0
    assert "no agreed map" in explain_bucket(node, 0)["why"][0]


def test_drill_fail_refuses_bad_durations() -> None:
    ops = Ops(FakeNode(FakeMs(tmap(), set(), [])))
    for bad in (0, -1, 1000):
        with pytest.raises(OpsError, match="duration"):
            asyncio.run(ops.drill_fail({"duration": bad}))
    with pytest.raises(OpsError, match="action"):
        asyncio.run(ops.drill_counters({"action": "explode"}))


@pytest.mark.parametrize("argv", [
    ["map", "--explain", "x"],
    ["resync", "--bucket", "one"],
    ["drill", "fail"],
    ["drill", "fail", "two"],
    ["drill", "melt", "2"],
    ["drill", "partition"],
    ["drill", "drain", "x"],
    ["rebalance", "--max-concurrent", "many"],
    ["weight", "1"],
    ["drain"],
])
def test_bad_arguments_are_one_line_exit_2(argv: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_drill_unknown_node_is_exit_2(tmp_path: Any, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    from lbsync.lab.farm import cluster_dict, to_toml

    path = tmp_path / "cluster.toml"
    path.write_text(to_toml(cluster_dict("lbtu", 3, ipv6=False, buckets=64,
                                         directory=tmp_path)))
    assert main(["drill", "fail", "9", "--config", str(path)]) == 2
    assert main(["drill", "fail", "2", "--duration", "0", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not in the cluster" in err[0] and "--duration" in err[1]


def test_rebalance_and_weight_bounds_are_exit_2(tmp_path: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from lbsync.lab.farm import cluster_dict, to_toml

    path = tmp_path / "cluster.toml"
    path.write_text(to_toml(cluster_dict("lbtu", 3, ipv6=False, buckets=64,
                                         directory=tmp_path)))
    cfg = ["--config", str(path), "--node-id", "1"]
    assert main(["rebalance", "--max-concurrent", "0", *cfg]) == 2
    assert main(["weight", "1", "0", *cfg]) == 2
    assert main(["drain", "7", *cfg]) == 2
    assert main(["drill", "partition", "2", "--duration", "100", "--config", str(path)]) == 2
    assert main(["undrain", "7", *cfg]) == 2
    assert main(["resync", "--bucket", "64", *cfg]) == 2
    assert main(["map", "--explain", "-1", *cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 7 and all("error" in line for line in err)
    assert "--explain -1: bucket out of range 0..63" in err[6], err
    assert "drain: node 7" in err[2] and "undrain: node 7" in err[4], err
    assert "--bucket 64: bucket out of range 0..63" in err[5], err


def test_a_bad_operator_request_is_the_requests_error_not_an_internal_one(
        tmp_path: Any) -> None:
    """An ``OpsError`` a handler raises (a bucket out of range asked of the daemon directly)
    comes back as the request's one-line error, not as "internal error" with a traceback."""
    from lbsync.control import ControlError, ControlServer, call

    async def bad(args: Any) -> Any:
        raise OpsError("bucket 99 out of range 0..63")

    async def go() -> str:
        server = ControlServer(tmp_path / "c.sock", {"resync": bad})
        await server.start()
        try:
            await asyncio.to_thread(call, tmp_path / "c.sock", "resync", {})
        except ControlError as exc:
            return str(exc)
        finally:
            await server.close()
        return "answered ok"

    assert asyncio.run(go()) == "bucket 99 out of range 0..63"
