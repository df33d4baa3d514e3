"""The Prometheus exporter: snapshot -> series (parsed back with prometheus_client's own text
parser), histogram folding of takeover records, listen parsing, and the HTTP server on a loop
(real sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbsync.metrics import SERIES, MetricsServer, SnapshotCollector, parse_listen


def snapshot(takeovers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "incarnation": 3, "ready": True, "fenced": False, "map_epoch": 5,
        "owned": [0, 1], "forwarding": [0, 1], "target": [0, 1, 2], "lease_left_s": 0.18,
        "store_entries": 40, "kernel_copies": 38, "pending_inject": 2, "pending_delete": 0,
        "counters": {"owner_events": 12, "buckets_resynced": 4},
        "membership": {"node_id": 1, "incarnation": 3, "heartbeats_sent": 100, "fences": 1,
                       "peers": [{"node_id": 2, "state": "alive"},
                                 {"node_id": 3, "state": "lost"}],
                       "takeover_records": [
                           {"dead_node": 3, "dead_incarnation": 1, "last_heard_at": 10.0,
                            "declared_at": 10.28, "decided_at": 10.29, "claimed_at": 10.30}]},
        "replication": {
            "rejected": {"bad_mac": 2},
            "sender": {"records_sent": 50, "datagrams_sent": 9, "bytes_sent": 9000,
                       "retransmitted": 1, "nacks_received": 1, "history_evicted": 0,
                       "stale_local": 0},
            "receiver": {"nack_messages": 2, "nacked_seqs": 3, "nacks_suppressed": 0,
                         "records_applied": 44, "gone_seqs": 0, "resyncs_completed": 4,
                         "digests_agreed": 7, "digests_disagreed": 1, "reorder_overflow": 0,
                         "duplicates": 5, "records_stale": 0, "records_refused": 0},
            "store": {"max_entries": 1000, "refused_full": 0}},
        "takeovers": takeovers if takeovers is not None else [
            {"dead_node": 3, "claimed_monotonic": 123.4, "claimed": 2, "safety_pass_s": 0.003,
             "claim_s": 0.002}],
        "replication_peers": {"2": {"lag": 4, "open_gaps": 1}},
        "pending_resyncs": 0,
        "peer_control": {"served_by_sender": {"1": 4}, "rejected": {"bad_mac": 3},
                         "relayed_by_peer": {"2": 5}, "relay_failures": 1},
        "vrrp": {"reporting": True,
                 "interpreter": {"lines": 7, "peers_declared_dead": 1, "own_link_failures": 0,
                                 "states": {"lbsync-1": "MASTER", "lbsync-2": "MASTER",
                                            "lbsync-3": "BACKUP"}}},
    }


def bucket_map() -> dict[str, Any]:
    return {"rows": [{"bucket": b, "target": 1 + b % 2, "actual": [1 + b % 2],
                      "store_entries": b, "kernel_copies": b} for b in range(4)],
            "counts": {"1": {"target": 2, "actual": 2}, "2": {"target": 2, "actual": 2}}}


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def render(collector: SnapshotCollector) -> str:
    server = MetricsServer(collector)
    return server.render().decode()


def test_every_documented_series_is_served() -> None:
    fam = families(render(SnapshotCollector(snapshot, bucket_map)))
    names = {n.removesuffix("_total") for n in SERIES}
    assert names <= set(fam), sorted(names - set(fam))
    assert fam["lbsync_owned_buckets"].samples[0].value == 2
    lag = {s.labels["peer"]: s.value for s in fam["lbsync_replication_lag_seqs"].samples}
    assert lag == {"2": 4}
    drops = {s.labels["reason"]: s.value for s in fam["lbsync_drops"].samples
             if s.name == "lbsync_drops_total"}
    assert drops["duplicate"] == 5 and drops["rejected_bad_mac"] == 2
    owners = {(s.labels["bucket"], s.labels["node"]) for s in fam["lbsync_bucket_owner"].samples}
    assert owners == {("0", "1"), ("1", "2"), ("2", "1"), ("3", "2")}
    up = {s.labels["peer"]: s.value for s in fam["lbsync_peer_up"].samples}
    assert up == {"2": 1, "3": 0}
    vrrp = {(s.labels["instance"], s.labels["state"]) for s in
            fam["lbsync_vrrp_instance_state"].samples if s.value == 1}
    assert vrrp == {("lbsync-1", "MASTER"), ("lbsync-2", "MASTER"), ("lbsync-3", "BACKUP")}
    ev = {s.labels["event"]: s.value for s in fam["lbsync_vrrp_events"].samples
          if s.name == "lbsync_vrrp_events_total"}
    assert ev["peers_declared_dead"] == 1 and ev["lines"] == 7
    rej = {s.labels["reason"]: s.value for s in fam["lbsync_peer_control_rejected"].samples
           if s.name.endswith("_total")}
    assert rej == {"bad_mac": 3}


def test_no_vrrp_series_without_keepalived() -> None:
    snap = snapshot()
    del snap["vrrp"]
    fam = families(render(SnapshotCollector(lambda: snap)))
    assert not any(n.startswith("lbsync_vrrp") for n in fam)


def test_takeover_histograms_count_each_record_once() -> None:
    snap = snapshot()
    c = SnapshotCollector(lambda: snap)
    render(c)
    fam = families(render(c))  # a second scrape must not count the same takeover again
    claim = {s.name: s.value for s in fam["lbsync_takeover_claim_seconds"].samples
             if not s.labels.get("le")}
    assert claim["lbsync_takeover_claim_seconds_count"] == 1
    assert claim["lbsync_takeover_claim_seconds_sum"] == pytest.approx(0.002)
    le = {s.labels["le"]: s.value for s in fam["lbsync_takeover_total_seconds"].samples
          if s.labels.get("le")}
    assert le["0.25"] == 0 and le["0.5"] == 1 and le["+Inf"] == 1  # 300 ms outage
    snap["takeovers"] = [*snap["takeovers"], {"dead_node": 2, "claimed_monotonic": 200.0,
                                              "claimed": 5, "safety_pass_s": 0.02,
                                              "claim_s": 0.004}]
    fam = families(render(c))
    total = [s.value for s in fam["lbsync_takeover_buckets"].samples
             if s.name == "lbsync_takeover_buckets_total"]
    assert total == [7]


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), (":9100", ("0.0.0.0", 9100)),
    ("[::1]:9464", ("::1", 9464))])
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["9464", "host:port", "h:70000"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def test_server_answers_metrics_and_404() -> None:
    async def main() -> tuple[bytes, bytes]:
        server = MetricsServer(SnapshotCollector(snapshot, bucket_map))
        await server.start("127.0.0.1:0")
        try:
            async def get(path: str) -> bytes:
                r, w = await asyncio.open_connection("127.0.0.1", server.port)
                w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                data = await r.read()
                w.close()
                return data

            return await get("/metrics"), await get("/nope")
        finally:
            await server.close()

    ok, missing = asyncio.run(main())
    head, _, body = ok.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert "lbsync_up" in families(body.decode())
    assert missing.startswith(b"HTTP/1.0 404")


def test_docs_list_every_series() -> None:
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    missing = [n for n in SERIES if f"`{n}`" not in doc]
    assert not missing, missing


def test_handoff_gaps_are_observed_per_bucket_once() -> None:
    snap = snapshot()
    snap["ops"] = {"handoffs": [{"from_node": 2, "buckets": [4, 5], "gap_s": 0.008,
                                 "claimed_monotonic": 50.0},
                                {"from_node": 3, "buckets": [6], "gap_s": None,
                                 "claimed_monotonic": 51.0}]}
    c = SnapshotCollector(lambda: snap)
    render(c)
    fam = families(render(c))
    got = {s.name: s.value for s in fam["lbsync_handoff_gap_seconds"].samples
           if not s.labels.get("le")}
    assert got["lbsync_handoff_gap_seconds_count"] == 2
    assert got["lbsync_handoff_gap_seconds_sum"] == pytest.approx(0.016)
