"""Comparison helpers for the daemon acceptance tests: kernels and stores against the owners.

The kernel tables are read with lbsync's own ctnetlink codec from sockets opened inside each
node's namespace (the calling thread switches namespace only while it creates the socket, as
the traffic tool does). The stores are read through the daemons' control sockets (``status``,
``store``, ``store-records``). Only entries of flows between the lab's client and server
segments count: a node's own local traffic (mark 0, never replicated) is not a farm flow.

What "equal" means for a standby copy (docs/daemon.md explains each exception):
- tuples, NAT (status bits + reply tuple), mark, zone, labels, helper and TCP state equal;
- status equal except the kernel-local bits: ``IPS_SRC_NAT_DONE``/``IPS_DST_NAT_DONE`` (set by
  the NAT hook a packet passes on the owner; peers drop packets before that hook, and an
  established entry's translation does not depend on them) and ``IPS_DYING``;
- kernel timeouts within ``timeout_slack`` seconds. Store records carry the timeout of the
  owner's last event (the store does not track refreshes), so it is not compared there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lbsync.control import ControlError
from lbsync.kernel.conntrack import ConntrackRequests
from lbsync.kernel.ctnetlink import KIND_DESTROY, NFNLGRP_CONNTRACK_DESTROY, decode
from lbsync.kernel.flowrecord import (
    IPS_DST_NAT_DONE,
    IPS_DYING,
    IPS_SRC_NAT_DONE,
    TCP_ESTABLISHED,
    TCP_STATE_NAMES,
    TCP_SYN_SENT2,
    FlowRecord,
)
from lbsync.lab import daemons
from lbsync.lab.farm import Lab, LabError
from lbsync.lab.traffic import in_netns
from tests.event_listener import NamespaceEventListener

LOCAL_STATUS = IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE | IPS_DYING


def farm_flow(rec: FlowRecord, lab: Lab) -> bool:
    """A flow between the lab's outside and inside segments (not node-local traffic)."""
    nets = [ipaddress.ip_network(lab.addr(f).outside_net) for f in lab.families]
    nets += [ipaddress.ip_network(lab.addr(f).inside_net) for f in lab.families]
    src, dst = rec.orig.src_addr, rec.orig.dst_addr
    return any(src in n for n in nets) and any(dst in n for n in nets)


def replicable(rec: FlowRecord) -> bool:
    """Past the TCP handshake (what owners replicate; every non-TCP entry)."""
    return rec.tcp is None or TCP_ESTABLISHED <= rec.tcp.state < TCP_SYN_SENT2


def kernel_table(lab: Lab, node_id: int) -> dict[bytes, FlowRecord]:
    """Node ``node_id``'s conntrack table (farm flows), by key, read with lbsync's codec."""
    with in_netns(lab.node_ns(node_id)):
        req = ConntrackRequests()
    try:
        events = asyncio.run(req.dump_all())
    finally:
        req.close()
    out: dict[bytes, FlowRecord] = {}
    for ev in events:
        rec = FlowRecord.unpack(ev.record)
        if farm_flow(rec, lab):
            out[ev.key] = rec
    return out


def owners(lab: Lab) -> dict[int, int]:
    """bucket -> the node forwarding it, from the daemons' status (every bucket exactly once)."""
    out: dict[int, int] = {}
    for i in lab.node_ids:
        for b in daemons.status(lab, i, timeout=30)["forwarding"]:
            assert b not in out, f"bucket {b} forwarded by nodes {out[b]} and {i}"
            out[b] = i
    return out


def store_keys(lab: Lab, node_id: int) -> dict[bytes, int]:
    """key -> bucket of node ``node_id``'s whole store."""
    raw = daemons.request(lab, node_id, "store")
    return {bytes.fromhex(k): int(b) for b, keys in raw.items() for k in keys}


def store_records(lab: Lab, node_id: int, buckets: Iterable[int]) -> dict[bytes, dict[str, Any]]:
    """key -> record (plain dict, as the control socket renders it) for ``buckets``."""
    out: dict[bytes, dict[str, Any]] = {}
    for b in buckets:
        raw = daemons.request(lab, node_id, "store-records", {"bucket": b})
        out.update({bytes.fromhex(k): v for k, v in raw.items()})
    return out


def _plain_tuple(t: Any) -> tuple[str, str, int, int]:
    if isinstance(t, dict):
        return (t["src"], t["dst"], int(t["sport"]), int(t["dport"]))
    return (t.src.hex(), t.dst.hex(), t.sport, t.dport)


def _tcp_state(tcp: Any) -> int | None:
    if tcp is None:
        return None
    return int(tcp["state"]) if isinstance(tcp, dict) else int(tcp.state)


def _fields(r: Any) -> dict[str, Any]:
    """The compared fields of a FlowRecord or of its control-socket rendering."""
    def g(k: str) -> Any:
        return r[k] if isinstance(r, dict) else getattr(r, k)

    labels = g("labels")
    return {"orig": _plain_tuple(g("orig")), "reply": _plain_tuple(g("reply")),
            "status": int(g("status")) & ~LOCAL_STATUS, "mark": int(g("mark")),
            "zone": int(g("zone")), "tcp_state": _tcp_state(g("tcp")), "helper": g("helper"),
            "labels": labels.hex() if isinstance(labels, bytes) else labels}


def describe(rec: Any) -> str:
    f = _fields(rec)
    st = f["tcp_state"]
    return (f"{f['orig']} -> {f['reply']} status={f['status']:#x} mark={f['mark']} "
            f"state={TCP_STATE_NAMES[st] if st is not None else '-'}")


@dataclass
class Comparison:
    """One snapshot of every kernel and store against the owners' kernels."""

    owners: dict[int, int]
    kernels: dict[int, dict[bytes, FlowRecord]]
    problems: list[str] = field(default_factory=list)
    compared: int = 0          # (node, entry) pairs compared, kernels and stores together
    owner_entries: int = 0
    timeouts: dict[tuple[int, bytes], str] = field(default_factory=dict)
    """(node, key) -> description of kernel timeouts more than the slack apart. Kept apart
    from ``problems``: a TCP entry's timeout jumps between the ESTABLISHED timeout and the
    300 s "unacknowledged" one with every request in flight, and the kernels are read one
    after the other, so one snapshot can catch a packet in flight; see :func:`persistent`."""

    def ok(self) -> bool:
        return not self.problems


def compare(lab: Lab, *, timeout_slack: float = 2.0, records: bool = True,
            ignore_status: int = 0, max_problems: int = 20) -> Comparison:
    """Every node's kernel and store, for every bucket it does not own, against the owner's
    kernel; and every owner's store of its own buckets against its kernel."""
    own = owners(lab)
    kernels = {i: kernel_table(lab, i) for i in lab.node_ids}
    stores = {i: store_keys(lab, i) for i in lab.node_ids}
    cmp = Comparison(own, kernels)
    probs = cmp.problems
    truth: dict[bytes, tuple[int, FlowRecord]] = {}
    for i, table in kernels.items():
        for key, rec in table.items():
            if own.get(rec.mark) == i and replicable(rec):
                truth[key] = (i, rec)
    cmp.owner_entries = len(truth)
    unowned = sorted(set(range(lab.buckets)) - own.keys())
    if unowned:
        probs.append(f"buckets forwarded by nobody right now: {unowned}")
    mask = ~ignore_status

    def same(a: Any, b: Any) -> bool:
        fa, fb = _fields(a), _fields(b)
        fa["status"] &= mask
        fb["status"] &= mask
        return fa == fb

    for i in lab.node_ids:
        want = {k: r for k, (o, r) in truth.items() if o != i}
        kern = {k: r for k, r in kernels[i].items() if own.get(r.mark) not in (i, None)}
        for key in want.keys() - kern.keys():
            probs.append(f"node {i} kernel lacks {describe(want[key])}")
        for key in kern.keys() - want.keys():
            probs.append(f"node {i} kernel has extra {describe(kern[key])}")
        for key in want.keys() & kern.keys():
            cmp.compared += 1
            a, b = want[key], kern[key]
            if not same(a, b):
                probs.append(f"node {i} kernel differs: owner {describe(a)} / copy {describe(b)}")
            elif a.timeout is not None and b.timeout is not None \
                    and abs(a.timeout - b.timeout) > timeout_slack:
                cmp.timeouts[(i, key)] = (f"node {i} kernel timeout {b.timeout} vs owner "
                                          f"{a.timeout}: {describe(a)}")
        # the store: peers' standby copies, and the owner's own buckets
        st = stores[i]
        want_all = {k for k, (_o, _r) in truth.items()}
        have = {k for k, b in st.items() if b in own}
        for key in want_all - have:
            probs.append(f"node {i} store lacks {describe(truth[key][1])}")
        for key in have - want_all:
            probs.append(f"node {i} store has extra key {key.hex()} (bucket {st[key]})")
        if records:
            buckets = sorted({b for k, b in st.items() if k in want_all})
            recs = store_records(lab, i, buckets)
            for key, plain in recs.items():
                if key not in truth:
                    continue
                cmp.compared += 1
                if not same(truth[key][1], plain):
                    probs.append(f"node {i} store record differs: owner "
                                 f"{describe(truth[key][1])} / store {describe(plain)}")
    del probs[max_problems:]
    return cmp


def persistent_timeouts(lab: Lab, first: Comparison, rounds: int = 3,
                        **kw: Any) -> list[str]:
    """The timeout differences of ``first`` that every one of ``rounds`` later snapshots shows
    again (a difference caught with a packet in flight is gone in the next snapshot)."""
    left = dict(first.timeouts)
    for _ in range(rounds):
        if not left:
            break
        again = compare(lab, **kw).timeouts
        left = {k: v for k, v in left.items() if k in again}
    return list(left.values())


def wait_empty(lab: Lab, timeout: float = 40.0) -> None:
    """Until no farm flow is left in any kernel or store (a clean start for the next test;
    the dumps also reap expired entries)."""
    def empty() -> bool:
        return all(not kernel_table(lab, i) and not store_keys(lab, i) for i in lab.node_ids)
    daemons.wait_for(empty, timeout, interval=0.5, what="farm flows gone everywhere")


def wait_equal(lab: Lab, timeout: float, *, entries: int = 0, **kw: Any) -> Comparison:
    """Poll :func:`compare` until it finds nothing and the owners' kernels hold at least
    ``entries`` replicable farm flows (a loaded traffic generator may send some flows' first
    datagram late, and an entry born late is compared once it exists); the last comparison
    either way."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cmp = compare(lab, **kw)
        except (AssertionError, ControlError, LabError):
            # a bucket owned twice or a daemon too busy to answer: look again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        if (cmp.ok() and cmp.owner_entries >= entries) or time.monotonic() > deadline:
            return cmp
        time.sleep(0.5)


class DestroyWatcher(NamespaceEventListener):
    """Timestamps of every DESTROY event in the given nodes' kernels (one listening socket
    per namespace, read by a thread), so lags are measured from the owner's DESTROY itself.

    An expired entry is destroyed when the kernel reaps it (the conntrack GC worker, shared by
    every namespace of the host and running up to a minute apart, or a ctnetlink dump that
    meets it), not when its timeout runs out: DESTROY is the event that counts.
    """

    def __init__(self, lab: Lab, nodes: Iterable[int]) -> None:
        ids = tuple(nodes)
        self.destroyed: dict[int, dict[bytes, float]] = {i: {} for i in ids}
        super().__init__(lab, ids, (NFNLGRP_CONNTRACK_DESTROY,))

    def handle(self, node: int, data: bytes, t: float) -> None:
        seen = self.destroyed[node]
        for ev in decode(data).events:
            if ev.kind == KIND_DESTROY:
                seen.setdefault(ev.key, t)


@dataclass
class Disappearance:
    """When keys left the owner's kernel and each peer's kernel and store (monotonic s).

    ``owner_destroyed``: when the owner's kernel sent the key's DESTROY (from a
    :class:`DestroyWatcher`); ``owner_last_seen``: start of the last owner dump that still
    held the key (a fallback should the DESTROY event be missed); ``gone``:
    (node, "kernel"|"store") -> end of the first read that no longer held it. A lag is thus
    an upper bound of the true delay (the poll period counts against the daemon).
    """

    owner_last_seen: dict[bytes, float] = field(default_factory=dict)
    owner_gone: dict[bytes, float] = field(default_factory=dict)
    owner_destroyed: dict[bytes, float] = field(default_factory=dict)
    gone: dict[tuple[int, str], dict[bytes, float]] = field(default_factory=dict)
    rounds: int = 0
    round_s: list[float] = field(default_factory=list)

    def lags(self) -> dict[tuple[int, str], list[tuple[bytes, float]]]:
        out: dict[tuple[int, str], list[tuple[bytes, float]]] = {}
        for where, keys in self.gone.items():
            out[where] = []
            for k, t in keys.items():
                t0 = self.owner_destroyed.get(k, self.owner_last_seen.get(k))
                if t0 is not None:
                    out[where].append((k, t - t0))
        return out


def watch_disappearance(lab: Lab, keys: Mapping[bytes, int], owner_of: Mapping[int, int],
                        timeout: float, watcher: DestroyWatcher, interval: float = 0.1,
                        kernel_every: float = 1.0) -> Disappearance:
    """Poll every peer's store (each round) and every kernel (every ``kernel_every`` s)
    until ``keys`` (key -> bucket) are gone everywhere or ``timeout`` passes; owners'
    DESTROY times come from ``watcher`` (started before the flows could end). The kernel
    dumps also reap expired entries (ctnetlink evicts those it meets), as the kernel's GC
    would later."""
    d = Disappearance()
    pending_owner = dict(keys)
    pending: dict[tuple[int, str], set[bytes]] = {}
    for i in lab.node_ids:
        mine = {k for k, b in keys.items() if owner_of[b] != i}
        for what in ("kernel", "store"):
            pending[(i, what)] = set(mine)
            d.gone[(i, what)] = {}
    deadline = time.monotonic() + timeout
    next_dump = 0.0
    while (pending_owner or any(pending.values())) and time.monotonic() < deadline:
        t_round = time.monotonic()
        for i in lab.node_ids:
            if pending[(i, "store")]:
                st = store_keys(lab, i)
                t2 = time.monotonic()
                for k in [k for k in pending[(i, "store")] if k not in st]:
                    pending[(i, "store")].discard(k)
                    d.gone[(i, "store")][k] = t2
        if t_round >= next_dump:
            next_dump = t_round + kernel_every
            for i in lab.node_ids:
                t0 = time.monotonic()
                table = kernel_table(lab, i)
                t1 = time.monotonic()
                for k in list(pending_owner):
                    if owner_of[pending_owner[k]] != i:
                        continue
                    if k in table:
                        d.owner_last_seen[k] = t0
                    else:
                        d.owner_gone[k] = t1
                        del pending_owner[k]
                for k in [k for k in pending[(i, "kernel")] if k not in table]:
                    pending[(i, "kernel")].discard(k)
                    d.gone[(i, "kernel")][k] = t1
        d.rounds += 1
        d.round_s.append(time.monotonic() - t_round)
        time.sleep(max(0.0, interval - (time.monotonic() - t_round)))
    time.sleep(0.3)  # the watcher's last receives
    for k, b in keys.items():
        t = watcher.destroyed.get(owner_of[b], {}).get(k)
        if t is not None:
            d.owner_destroyed[k] = t
    return d


__all__ = ["LOCAL_STATUS", "Comparison", "DestroyWatcher", "Disappearance", "compare",
           "farm_flow", "kernel_table", "owners", "persistent_timeouts", "replicable",
           "store_keys", "store_records", "wait_empty", "wait_equal", "watch_disappearance"]


# -- the daemon lab both acceptance modules share --------------------------------------------


def daemon_lab(lab_factory: Callable[..., Lab], sysctls: Iterable[str], *,
               keepalived: bool = False) -> Iterator[Lab]:
    """A 3-node lab (B = 64) with ``sysctls`` in every node namespace and a ready daemon per
    node (with ``keepalived``: and keepalived per node, each MASTER of its own instance); the
    daemons (and keepalived) are killed and their runtime files removed afterwards (the lab
    itself is torn down by ``lab_factory``)."""
    lab = lab_factory(3, buckets=64)
    try:
        for i in lab.node_ids:
            lab.exec(lab.node_ns(i), ["sysctl", "-q", "-w", *sysctls], check=True)
        daemons.up(lab, keepalived=keepalived, timeout=30)
        yield lab
    finally:
        for i in lab.node_ids:
            with contextlib.suppress(Exception):
                daemons.kill_keepalived(lab, i)
            with contextlib.suppress(Exception):
                daemons.kill_daemon(lab, i)
        daemons.remove_runtime_files(lab.prefix)


def statuses(lab: Lab) -> dict[int, dict[str, Any]]:
    return {i: daemons.status(lab, i) for i in lab.node_ids}


def counter(st: dict[str, Any], name: str) -> int:
    return int(st["counters"].get(name, 0))
