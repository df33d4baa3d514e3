"""Prometheus exporter: the node's statistics snapshots as metrics, on the daemon's loop.

Off by default; ``[metrics] listen = "HOST:PORT"`` turns it on (``"[::]:9464"`` for IPv6). The
exporter owns no state of the daemon: at every scrape it takes the same snapshots that
``lbsync status --json`` and ``lbsync map --json`` render (``Node.statistics()`` and
:func:`lbsync.ops.map_snapshot`) and converts them (:class:`SnapshotCollector`). The HTTP side
is a minimal asyncio server on the daemon's loop (GET ``/metrics`` only), so a scrape reads
the snapshots between two loop callbacks and never races the daemon's own data structures.

Durations (takeovers) are histograms: the daemon keeps its last takeovers in a bounded log;
the collector folds each record it has not seen yet into cumulative histogram buckets, so no
observation is lost as long as scrapes are more frequent than 32 takeovers.

The series are listed in docs/operations.md (``SERIES`` below is the same list, tested).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8192
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SERIES: dict[str, str] = {
    "lbsync_up": "gauge: 1 while the daemon answers scrapes",
    "lbsync_ready": "gauge: 1 once the readiness gate passed (standby state complete)",
    "lbsync_fenced": "gauge: 1 while this node may not forward (no majority lease)",
    "lbsync_incarnation": "gauge: this daemon's incarnation",
    "lbsync_map_epoch": "gauge: epoch of the agreed target map",
    "lbsync_lease_remaining_seconds": "gauge: time left on the forwarding lease",
    "lbsync_owned_buckets": "gauge: buckets this node owns (claimed)",
    "lbsync_forwarding_buckets": "gauge: buckets in the kernel's @owned set",
    "lbsync_target_buckets": "gauge: buckets the target map gives this node",
    "lbsync_bucket_target_owner": "gauge{bucket}: target owner node id (0: none)",
    "lbsync_bucket_owner": "gauge{bucket,node}: 1 per node reporting it owns the bucket",
    "lbsync_bucket_store_entries": "gauge{bucket}: standby/owned entries in the store",
    "lbsync_bucket_kernel_copies": "gauge{bucket}: entries known to be in the kernel",
    "lbsync_node_buckets": "gauge{node,kind}: per node, target and actual bucket counts",
    "lbsync_store_entries": "gauge: entries in the userspace store",
    "lbsync_store_max_entries": "gauge: the store's bound",
    "lbsync_kernel_copies": "gauge: standby copies in this node's kernel",
    "lbsync_pending_inject": "gauge: standby copies waiting to be injected",
    "lbsync_pending_delete": "gauge: standby copies waiting to be deleted",
    "lbsync_replication_lag_seqs": "gauge{peer}: sequence numbers known sent by a peer and "
                                   "not yet delivered here",
    "lbsync_replication_open_gaps": "gauge{peer}: gaps open in a peer's stream",
    "lbsync_replication_pending_resyncs": "gauge: resync requests not yet answered",
    "lbsync_replication_records_sent_total": "counter: records this node replicated",
    "lbsync_replication_datagrams_sent_total": "counter: replication datagrams sent",
    "lbsync_replication_bytes_sent_total": "counter: replication bytes sent",
    "lbsync_replication_retransmitted_total": "counter: repair datagrams sent (parities and "
                                              "plain retransmissions)",
    "lbsync_replication_nacks_received_total": "counter: NACKs from peers",
    "lbsync_replication_nacks_sent_total": "counter: NACK messages this node sent",
    "lbsync_replication_nacked_seqs_total": "counter: sequence numbers this node NACKed",
    "lbsync_replication_nacks_suppressed_total": "counter: NACKs not sent (another "
                                                 "receiver asked first)",
    "lbsync_replication_repair_states_sent_total": "counter: repair states this node "
                                                   "piggybacked on datagrams it sent anyway",
    "lbsync_replication_repair_states_received_total": "counter: peers' repair states "
                                                       "addressed to this node (answered "
                                                       "like NACKs)",
    "lbsync_replication_repair_states_heard_total": "counter: other receivers' repair "
                                                    "states heard (suppression)",
    "lbsync_replication_piggyback_bytes_total": "counter: bytes of repair states this node "
                                                "piggybacked on its control datagrams",
    "lbsync_replication_nack_fallbacks_total": "counter: NACK datagrams sent because no "
                                               "datagram carried a repair state in time",
    "lbsync_replication_records_applied_total": "counter: peers' records applied to the "
                                                "store",
    "lbsync_replication_gone_seqs_total": "counter: sequence numbers the sender no longer had",
    "lbsync_replication_resyncs_completed_total": "counter: bucket resyncs received "
                                                  "completely",
    "lbsync_replication_digests_total": "counter{result}: agreed / disagreed",
    "lbsync_replication_rejected_total": "counter{reason}: datagrams dropped before parsing",
    "lbsync_drops_total": "counter{reason}: records or datagrams dropped (reorder overflow, "
                          "stale, refused, store full, duplicates, ...)",
    "lbsync_node_events_total": "counter{event}: the daemon's own counters",
    "lbsync_membership_events_total": "counter{event}: membership counters",
    "lbsync_peer_up": "gauge{peer}: 1 while a peer is alive or leaving",
    "lbsync_takeovers_total": "counter: takeovers this node carried out",
    "lbsync_takeover_buckets_total": "counter: buckets claimed by takeover",
    "lbsync_takeover_commit_seconds": "histogram: safety pass (commit) of a takeover",
    "lbsync_takeover_claim_seconds": "histogram: nft claim transaction of a takeover",
    "lbsync_takeover_detection_seconds": "histogram: last heard -> declared lost",
    "lbsync_takeover_total_seconds": "histogram: last heard -> claimed",
    "lbsync_vrrp_reporting": "gauge: 1 while keepalived reports through the notify FIFO "
                             "(absent when [keepalived] is not enabled)",
    "lbsync_vrrp_instance_state": "gauge{instance,state}: 1 for the state keepalived last "
                                  "reported for each lbsync instance on this node",
    "lbsync_vrrp_events_total": "counter{event}: keepalived lines and the events read from "
                                "them (peers declared dead / returned, own link failures...)",
    "lbsync_peer_control_served_total": "counter{sender}: farm requests relayed to this "
                                        "node by its peers and run",
    "lbsync_peer_control_rejected_total": "counter{reason}: peer-control frames refused "
                                          "before anything ran (bad MAC, replay, stale...)",
    "lbsync_peer_control_relayed_total": "counter{peer}: requests this node relayed to a peer",
    "lbsync_peer_control_relay_failures_total": "counter: relayed requests that got no answer",
    "lbsync_handoff_gap_seconds": "histogram: planned handoff forwarding gap per bucket "
                                  "taken by this node (release on the old owner -> claim "
                                  "here; same-host clocks)",
}


class _Histogram:
    """Cumulative histogram state the collector keeps across scrapes."""

    def __init__(self, bounds: Iterable[float] = DURATION_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cum = 0
        buckets = []
        for b, c in zip((*self.bounds, math.inf), self.counts, strict=True):
            cum += c
            buckets.append(("+Inf" if math.isinf(b) else repr(b), cum))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.total)


class SnapshotCollector:
    """A prometheus_client collector over two snapshot functions (called at scrape time)."""

    def __init__(self, statistics: Callable[[], Mapping[str, Any]],
                 bucket_map: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self._statistics = statistics
        self._map = bucket_map
        self._seen: set[tuple[Any, ...]] = set()  # takeover records already observed
        self._hist = {k: _Histogram() for k in ("commit", "claim", "detection", "total",
                                               "handoff")}
        self._takeovers = 0
        self._takeover_buckets = 0

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: series depend on the snapshot

    def _fold(self, st: Mapping[str, Any]) -> None:
        records = {(r.get("dead_node"), r.get("dead_incarnation")): r
                   for r in st.get("membership", {}).get("takeover_records", [])}
        for t in st.get("takeovers", []):
            key: tuple[Any, ...] = ("t", t.get("dead_node"), t.get("claimed_monotonic"))
            if key in self._seen:
                continue
            self._seen.add(key)
            self._takeovers += 1
            self._takeover_buckets += int(t.get("claimed", 0))
            self._hist["commit"].observe(float(t.get("safety_pass_s", 0.0)))
            self._hist["claim"].observe(float(t.get("claim_s", 0.0)))
        for (dead, inc), r in records.items():
            mkey: tuple[Any, ...] = ("m", dead, inc, r.get("decided_at"))
            if mkey in self._seen or r.get("claimed_at") is None:
                continue
            self._seen.add(mkey)
            heard, declared = r.get("last_heard_at"), r.get("declared_at")
            if heard is not None and declared is not None:
                self._hist["detection"].observe(max(0.0, declared - heard))
                self._hist["total"].observe(max(0.0, r["claimed_at"] - heard))
        for h in st.get("ops", {}).get("handoffs", []):
            hkey: tuple[Any, ...] = ("h", h.get("from_node"), h.get("claimed_monotonic"))
            if hkey in self._seen or h.get("gap_s") is None:
                continue
            self._seen.add(hkey)
            for _ in h.get("buckets", []):
                self._hist["handoff"].observe(max(0.0, float(h["gap_s"])))
        if len(self._seen) > 4096:  # bounded: old keys cannot reappear in a 32-entry log
            self._seen = set(list(self._seen)[-1024:])

    def collect(self) -> Iterable[Metric]:
        st = self._statistics()
        self._fold(st)
        yield _g("lbsync_up", 1)
        yield _g("lbsync_ready", int(bool(st.get("ready"))))
        yield _g("lbsync_fenced", int(bool(st.get("fenced"))))
        yield _g("lbsync_incarnation", st.get("incarnation", 0))
        yield _g("lbsync_map_epoch", st.get("map_epoch", 0))
        lease = st.get("lease_left_s")
        yield _g("lbsync_lease_remaining_seconds", lease if lease is not None else math.inf)
        yield _g("lbsync_owned_buckets", len(st.get("owned", [])))
        yield _g("lbsync_forwarding_buckets", len(st.get("forwarding", [])))
        yield _g("lbsync_target_buckets", len(st.get("target", [])))
        yield _g("lbsync_store_entries", st.get("store_entries", 0))
        yield _g("lbsync_kernel_copies", st.get("kernel_copies", 0))
        yield _g("lbsync_pending_inject", st.get("pending_inject", 0))
        yield _g("lbsync_pending_delete", st.get("pending_delete", 0))
        rep = st.get("replication", {})
        snd, rcv, store = rep.get("sender", {}), rep.get("receiver", {}), rep.get("store", {})
        yield _g("lbsync_store_max_entries", store.get("max_entries", 0))
        for name, src, key in (
                ("records_sent", snd, "records_sent"),
                ("datagrams_sent", snd, "datagrams_sent"),
                ("bytes_sent", snd, "bytes_sent"),
                ("retransmitted", snd, "retransmitted"),
                ("nacks_received", snd, "nacks_received"),
                ("nacks_sent", rcv, "nack_messages"),
                ("nacked_seqs", rcv, "nacked_seqs"),
                ("nacks_suppressed", rcv, "nacks_suppressed"),
                ("repair_states_sent", rcv, "repair_states_sent"),
                ("repair_states_received", snd, "repair_states_received"),
                ("repair_states_heard", rcv, "repair_states_heard"),
                ("piggyback_bytes", snd, "piggyback_bytes"),
                ("nack_fallbacks", rcv, "nack_fallbacks"),
                ("records_applied", rcv, "records_applied"),
                ("gone_seqs", rcv, "gone_seqs"),
                ("resyncs_completed", rcv, "resyncs_completed")):
            yield _c(f"lbsync_replication_{name}", src.get(key, 0))
        dig = CounterMetricFamily("lbsync_replication_digests", SERIES[
            "lbsync_replication_digests_total"], labels=["result"])
        dig.add_metric(["agreed"], rcv.get("digests_agreed", 0))
        dig.add_metric(["disagreed"], rcv.get("digests_disagreed", 0))
        yield dig
        yield _labelled_counter("lbsync_replication_rejected", "reason",
                                rep.get("rejected", {}))
        drops = {"reorder_overflow": rcv.get("reorder_overflow", 0),
                 "duplicate": rcv.get("duplicates", 0),
                 "stale_record": rcv.get("records_stale", 0),
                 "refused_record": rcv.get("records_refused", 0),
                 "store_full": store.get("refused_full", 0),
                 "history_evicted": snd.get("history_evicted", 0),
                 "stale_local": snd.get("stale_local", 0)}
        for k, v in rep.get("rejected", {}).items():
            drops[f"rejected_{k}"] = v
        yield _labelled_counter("lbsync_drops", "reason", drops)
        yield _labelled_counter("lbsync_node_events", "event", st.get("counters", {}))
        ms = st.get("membership", {})
        yield _labelled_counter("lbsync_membership_events", "event", {
            k: v for k, v in ms.items() if isinstance(v, int) and not isinstance(v, bool)
            and k not in ("node_id", "incarnation", "backers", "voters", "map_epoch",
                          "map_proposer", "owned", "pending_claims")})
        up = GaugeMetricFamily("lbsync_peer_up", SERIES["lbsync_peer_up"], labels=["peer"])
        for p in ms.get("peers", []):
            up.add_metric([str(p["node_id"])], int(p.get("state") in ("alive", "leaving")))
        yield up
        lag = GaugeMetricFamily("lbsync_replication_lag_seqs",
                                SERIES["lbsync_replication_lag_seqs"], labels=["peer"])
        gaps = GaugeMetricFamily("lbsync_replication_open_gaps",
                                 SERIES["lbsync_replication_open_gaps"], labels=["peer"])
        for peer, pos in sorted(st.get("replication_peers", {}).items()):
            lag.add_metric([str(peer)], pos.get("lag", 0))
            gaps.add_metric([str(peer)], pos.get("open_gaps", 0))
        yield lag
        yield gaps
        yield _g("lbsync_replication_pending_resyncs", st.get("pending_resyncs", 0))
        yield _c("lbsync_takeovers", self._takeovers)
        yield _c("lbsync_takeover_buckets", self._takeover_buckets)
        for key, name in (("commit", "lbsync_takeover_commit_seconds"),
                          ("claim", "lbsync_takeover_claim_seconds"),
                          ("detection", "lbsync_takeover_detection_seconds"),
                          ("total", "lbsync_takeover_total_seconds"),
                          ("handoff", "lbsync_handoff_gap_seconds")):
            yield self._hist[key].family(name, SERIES[name])
        if (pc := st.get("peer_control")) is not None:
            yield _labelled_counter("lbsync_peer_control_served", "sender",
                                    pc.get("served_by_sender") or {})
            yield _labelled_counter("lbsync_peer_control_rejected", "reason",
                                    pc.get("rejected") or {})
            yield _labelled_counter("lbsync_peer_control_relayed", "peer",
                                    pc.get("relayed_by_peer") or {})
            yield _c("lbsync_peer_control_relay_failures", pc.get("relay_failures", 0))
        if (vrrp := st.get("vrrp")) is not None:
            yield from _vrrp_metrics(vrrp)
        if self._map is not None:
            yield from _map_metrics(self._map())


VRRP_STATES = ("INIT", "BACKUP", "MASTER", "FAULT", "STOP", "DELETED")


def _vrrp_metrics(v: Mapping[str, Any]) -> Iterable[Metric]:
    yield _g("lbsync_vrrp_reporting", int(bool(v.get("reporting"))))
    interp = v.get("interpreter") or {}
    state = GaugeMetricFamily("lbsync_vrrp_instance_state",
                              SERIES["lbsync_vrrp_instance_state"], labels=["instance", "state"])
    for inst, cur in sorted((interp.get("states") or {}).items()):
        for name in VRRP_STATES:
            state.add_metric([inst, name], int(cur == name))
    yield state
    yield _labelled_counter("lbsync_vrrp_events", "event", {
        k: n for k, n in interp.items() if isinstance(n, int) and not isinstance(n, bool)})


def _map_metrics(m: Mapping[str, Any]) -> Iterable[Metric]:
    target = GaugeMetricFamily("lbsync_bucket_target_owner",
                               SERIES["lbsync_bucket_target_owner"], labels=["bucket"])
    owner = GaugeMetricFamily("lbsync_bucket_owner", SERIES["lbsync_bucket_owner"],
                              labels=["bucket", "node"])
    entries = GaugeMetricFamily("lbsync_bucket_store_entries",
                                SERIES["lbsync_bucket_store_entries"], labels=["bucket"])
    copies = GaugeMetricFamily("lbsync_bucket_kernel_copies",
                               SERIES["lbsync_bucket_kernel_copies"], labels=["bucket"])
    for row in m.get("rows", []):
        b = str(row["bucket"])
        target.add_metric([b], row["target"])
        for o in row["actual"]:
            owner.add_metric([b, str(o)], 1)
        entries.add_metric([b], row["store_entries"])
        copies.add_metric([b], row["kernel_copies"])
    counts = GaugeMetricFamily("lbsync_node_buckets", SERIES["lbsync_node_buckets"],
                               labels=["node", "kind"])
    for n, c in sorted(m.get("counts", {}).items()):
        counts.add_metric([n, "target"], c["target"])
        counts.add_metric([n, "actual"], c["actual"])
    yield from (target, owner, entries, copies, counts)


def _g(name: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, SERIES[name], value=value)


def _c(name: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, SERIES[f"{name}_total"], value=value)


def _labelled_counter(name: str, label: str, values: Mapping[str, Any]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, SERIES[f"{name}_total"], labels=[label])
    for k, v in sorted(values.items()):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            fam.add_metric([str(k)], v)
    return fam


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` / ``:PORT`` (all addresses) -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep:
        raise ValueError(f"metrics listen {listen!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"metrics listen {listen!r}: port is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics listen {listen!r}: port out of range")
    return host, port


class MetricsServer:
    """``GET /metrics`` on the loop; everything else 404; one request per connection."""

    def __init__(self, collector: SnapshotCollector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: asyncio.Server | None = None
        self.scrapes = 0
        self.errors = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, listen: str) -> None:
        host, port = parse_listen(listen)
        self._server = await asyncio.start_server(self._serve, host=host, port=port,
                                                  limit=MAX_REQUEST_LINE, reuse_address=True)
        log.info("metrics.listening address=%s", listen)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while await asyncio.wait_for(reader.readline(), 5.0) not in (b"\r\n", b"\n", b""):
                pass  # headers are ignored
            parts = line.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] in ("GET", "HEAD") and \
                    parts[1].split("?")[0] in ("/metrics", "/"):
                body = self.render()
                self.scrapes += 1
                status = "200 OK"
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
            head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head + (body if parts and parts[0] != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            self.errors += 1
        except Exception as exc:  # a scrape must never take the daemon down
            self.errors += 1
            log.error("metrics.scrape_failed error=%r", exc)
        finally:
            writer.close()


def node_snapshot(node: Any) -> dict[str, Any]:
    """``Node.statistics()`` plus the per-peer replication positions (lag) the exporter adds."""
    st = dict(node.statistics())
    rcv = node.ep.receiver
    peers: dict[str, dict[str, int]] = {}
    for p in node.cfg.node_ids:
        if p == node.node_id:
            continue
        pos = rcv.peer_position(p)
        if pos is None:
            continue
        _inc, nxt, open_gaps = pos
        hw = _peer_end(rcv, p)
        peers[str(p)] = {"lag": max(0, hw - nxt) if hw is not None else 0,
                         "open_gaps": open_gaps}
    st["replication_peers"] = peers
    st["pending_resyncs"] = rcv.pending_resyncs()
    ops = getattr(node, "ops", None)
    if ops is not None:
        st["ops"] = ops.statistics()
    pctl = getattr(node, "peer_control", None)
    if pctl is not None:
        st["peer_control"] = dataclasses.asdict(pctl.statistics())
    return st


def _peer_end(rcv: Any, node: int) -> int | None:
    # one past the highest sequence number the peer is known to have sent
    peer = getattr(rcv, "_peers", {}).get(node)
    return getattr(peer, "end", None)


async def start_for_node(node: Any) -> MetricsServer | None:
    """Start the exporter when ``[metrics] listen`` is set (else None)."""
    listen = node.cfg.metrics.listen
    if not listen:
        return None
    from lbsync.ops import map_snapshot

    server = MetricsServer(SnapshotCollector(lambda: node_snapshot(node),
                                             lambda: map_snapshot(node)))
    await server.start(listen)
    return server
