"""Operator commands, daemon side: the control handlers behind ``lbsync map``, ``resync`` and
``drill``, and the per-bucket snapshot the metrics exporter also reads.

Nothing here decides ownership: the map snapshot reads what membership agreed (the target map)
and what every node reported owning in its last heartbeat (actual ownership); ``resync`` asks
the replication endpoint for resync streams; the drill hooks make *this* node fail the way a
dead node does (or count resets) so the farm's own takeover path can be rehearsed.

Handlers (``{name: async handler(args)}``, merged into the daemon's control socket):

- ``map``: :func:`map_snapshot` (``explain``: one bucket's chain and why it is where it is).
- ``resync``: ask the owners for a fresh stream of ``buckets`` (all: every peer's owned
  buckets); answers at once with what was asked; completion shows in ``resync-status``.
- ``resync-status``: pending requests and resyncs completed so far.
- ``drill-fail``: stop forwarding at once (empty ``@owned``) and then hang the daemon's loop for
  ``duration`` seconds: no heartbeats, no lease refresh, exactly like a hung or dead node (its
  peers detect it, declare it lost and take its buckets over). After the hang the node finds it
  was declared lost, releases and rejoins as a new incarnation through the readiness gate.
- ``drill-partition``: cut this node's replication link (its UDP port, both directions) for
  ``duration`` seconds: it fences by lease expiry, peers take over, it rejoins after.
- ``drill-counters``: ``install``/``read``/``remove`` the reset counters
  (``table inet lbsync_drill``: ``tcp flags rst`` counted on the forward and output hooks).
- ``rebalance-plan``: the target map ``hashing.assign`` computes from the ready view and the
  *actual* owners, and ``hashing.plan``'s batches of moves; ``map-propose`` installs that map
  (epoch + 1) so the farm agrees on the new target before anything moves.
- ``handoff-seal`` / ``handoff-take``: the two halves of a planned handoff, run on the old and
  the new owner by the orchestrator (:mod:`lbsync.drill`). Seal: the bucket leaves ``@owned``
  (the old owner stops forwarding it), the events already read for it are still replicated,
  the bucket is released and the stream flushed; the answer carries the last sequence number
  sent (the seal). Take: wait until this node has delivered the old owner's stream up to the
  seal, inject what the store has and the kernel lacks, claim in one nft transaction,
  announce. The forwarding gap is take's commit minus seal's commit.
- ``set-local``: drained flag and weight of this node, persisted in the state directory
  (``<state>/<cluster>-<id>.operator``, read again at start) and announced in heartbeats.
- ``notify`` (with ``[keepalived] enabled``): ``lbsync notify INSTANCE STATE`` from keepalived
  notify scripts, into the same interpreter as the FIFO.

Link failure (outside or inside down, replication up): the node hands every bucket off
(:meth:`Ops._hand_off_everything`). Two sources: keepalived's own instance going FAULT
(``VrrpOwnLinkFailed``, through :class:`lbsync.vrrp_adapter.VrrpSignal`) and a poll of the
links every LINK_CHECK_INTERVAL. With keepalived enabled and reporting, the poll acts only on a
link down for LINK_POLL_FALLBACK without a FAULT (keepalived dead or not tracking it); the
links count as recovered when neither source says failed. keepalived's verdicts on peers go to
membership (``vrrp_verdict``, rule 3b of :mod:`lbsync.membership.core`).

The handoff halves change membership's actual ownership through ``handoff_release`` /
``handoff_claimed``; the orchestration (what moves when) is the caller's: docs/operations.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from lbsync.control import ControlError
from lbsync.nft import NftError, run_nft

log = logging.getLogger(__name__)

DRILL_TABLE = "lbsync_drill"
PARTITION_TABLE = "lbsync_drill_partition"
SEAL_DRAIN = 0.005  # lets conntrack events already read for sealed buckets be replicated
TAKE_WAIT = 2.0  # at most this long for the old owner's stream to reach the seal
HANDOFF_HISTORY = 64
LINK_CHECK_INTERVAL = 0.1
# With keepalived reading the links (track_interface, a netlink event: FAULT within ~10 ms),
# the poll is the fallback: it hands off only for a link down this long without a FAULT.
LINK_POLL_FALLBACK = 0.5
LINK_EVENT_HISTORY = 16
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_RUNNING = 0x40


def link_up(ifname: str, sock: socket.socket) -> bool:
    """Administratively up and with carrier (IFF_UP and IFF_RUNNING); a missing interface is
    down. ``sock``: a datagram socket of the namespace to ask, kept by the polling caller
    (one socket per poll was ~6-9 % of an idle daemon's samples)."""
    import fcntl
    import struct

    try:
        res = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS,
                          struct.pack("16sH14x", ifname.encode()[:15], 0))
    except OSError:
        return False
    flags = struct.unpack_from("16sH", res)[1]
    return bool(flags & _IFF_UP) and bool(flags & _IFF_RUNNING)
MAX_DRILL_HANG = 60.0
# The drill's reset counters: RSTs this node forwards (flows it owns) and RSTs its own stack
# sends on the cluster interfaces (a non-owner resetting a flow). Only the cluster interfaces:
# the node's own TCP on the replication or management link (peer control, whose relay
# connection to a failed node is reset) is no flow of the farm. Separate table, so the lbsync
# ruleset is never touched; priority after filter.
def drill_rules(outside: str, inside: str) -> str:
    ifs = f'{{ "{inside}", "{outside}" }}'
    return f"""table inet {DRILL_TABLE} {{
    counter forwarded_rst {{ }}
    counter local_rst {{ }}
    chain forward {{
        type filter hook forward priority 10; policy accept;
        tcp flags & rst == rst counter name forwarded_rst
    }}
    chain output {{
        type filter hook output priority 10; policy accept;
        oifname {ifs} tcp flags & rst == rst counter name local_rst
    }}
}}
"""


Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


class OpsError(ControlError):
    """A bad operator request, answered as a one-line control error (a ``ControlError``: the
    control server and the peer relay answer it as the request's error, not as an internal
    one with a traceback in the log)."""


def reported_owners(node: Any) -> dict[int, list[int]]:
    """Actual owners as this node knows them: its own claimed buckets, and per peer the
    bitmap of its last heartbeat (fenced or not). A bucket may show 0 or several owners
    while a takeover or a fence is in flight."""
    ms = node.ms
    out: dict[int, list[int]] = {b: [] for b in range(node.B)}
    for b in ms.owned:
        out[b].append(node.node_id)
    for peer, owned in ms.reported_owned().items():
        for b in owned:
            out[b].append(peer)
    return out


def map_snapshot(node: Any) -> dict[str, Any]:
    """Target and actual owner of every bucket, per-node counts, store entries per bucket."""
    tm = node.ms.map
    actual = reported_owners(node)
    nodes = sorted(node.cfg.node_ids)
    rows = []
    counts = {n: {"target": 0, "actual": 0} for n in nodes}
    for b in range(node.B):
        target = tm.owner(b) if tm is not None else 0
        owners = sorted(actual[b])
        if target in counts:
            counts[target]["target"] += 1
        for o in owners:
            if o in counts:
                counts[o]["actual"] += 1
        rows.append({"bucket": b, "target": target, "actual": owners,
                     "chain": list(tm.chain(b)) if tm is not None else [],
                     "store_entries": node.store.count(b),
                     "kernel_copies": len(node.in_kernel[b])})
    view = {m.node_id: m for m in node.ms.ready_view()}  # weights, drain flags (heartbeats)
    peers = {p.node_id: {"state": p.state, "ready": p.ready, "fenced": p.fenced,
                         "incarnation": p.incarnation,
                         "drained": bool(getattr(view.get(p.node_id), "drained", False)),
                         "weight": getattr(view.get(p.node_id), "weight", None)}
             for p in node.ms.statistics().peers}
    peers[node.node_id] = {"state": "self", "ready": node.ms.ready, "fenced": node.ms.fenced,
                           "incarnation": node.ms.incarnation, "drained": node.ms.drained,
                           "weight": node.ms.weight}
    return {
        "node_id": node.node_id,
        "buckets": node.B,
        "map_epoch": tm.epoch if tm is not None else 0,
        "map_proposer": tm.proposer if tm is not None else 0,
        "rows": rows,
        "counts": {str(n): c for n, c in counts.items()},
        "members": {str(n): v for n, v in sorted(peers.items())},
        "misplaced": sum(1 for r in rows if r["actual"] != [r["target"]]),
        "unowned": sum(1 for r in rows if not r["actual"]),
        "multiple": sum(1 for r in rows if len(r["actual"]) > 1),
    }


def explain_bucket(node: Any, bucket: int) -> dict[str, Any]:
    """One bucket: target, actual owners, fallback chain, and why (in words)."""
    if not 0 <= bucket < node.B:
        raise OpsError(f"bucket {bucket} out of range 0..{node.B - 1}")
    snap = map_snapshot(node)
    row = snap["rows"][bucket]
    members = snap["members"]
    why: list[str] = []
    tm = node.ms.map
    if tm is None:
        why.append("no agreed map yet: nobody may claim this bucket")
    else:
        why.append(f"map epoch {tm.epoch} (proposed by node {tm.proposer}) puts it on node "
                   f"{row['target']}; if that node dies it goes to the first live node of "
                   f"{row['chain'][1:] or 'nothing'}")
        inc = tm.incarnation_of(row["target"]) if row["target"] else 0
        if inc:
            why.append(f"the map was computed for node {row['target']} incarnation {inc}")
    if row["actual"] == [row["target"]]:
        why.append("actual owner = target owner")
    elif not row["actual"]:
        why.append("nobody reports owning it right now (takeover in flight, or fenced owner)")
    elif len(row["actual"]) > 1:
        why.append(f"several nodes report owning it: {row['actual']} (one is fenced or a "
                   f"report is stale)")
    else:
        why.append(f"actually owned by node {row['actual'][0]}: ownership moves only by "
                   f"takeover or handoff, never by a new map")
    return {"bucket": bucket, **row, "map_epoch": snap["map_epoch"],
            "members": members, "why": why}


class Ops:
    """The operator handlers of one node."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.resyncs_requested = 0
        self.drills = 0
        self.last_fail_monotonic: float | None = None
        self.handoffs: deque[dict[str, Any]] = deque(maxlen=HANDOFF_HISTORY)
        self.takes = 0
        self._restore_operator_state()
        node.ops = self  # the metrics exporter reads statistics() through the node
        self.link_down: frozenset[str] = frozenset()
        self.link_handoffs = 0
        self.link_failed = False    # the buckets were handed off for a link failure
        self.link_events: deque[dict[str, Any]] = deque(maxlen=LINK_EVENT_HISTORY)
        self._link_counts = {"link_handoffs_vrrp": 0, "link_handoffs_poll": 0,
                             "link_recoveries": 0}
        self._poll_down_since: float | None = None
        self._operator_drained = bool(node.ms.drained)
        self._seen_up: set[str] = set()
        self._link_sock: socket.socket | None = None  # for the link poll's ioctl
        self._refreshing = False
        self.vrrp: Any = None
        self.vrrp_fault = False
        self.vrrp_signal_losses = 0
        if getattr(node, "loop", None) is not None:
            self._start_vrrp()
            self._schedule_link_check()

    # ---------------------------------------------------------------- keepalived

    def _start_vrrp(self) -> None:
        """With ``[keepalived] enabled``: read the node's notify FIFO (docs/keepalived.md)."""
        cfg = self.node.cfg
        if not cfg.keepalived.enabled:
            return
        from lbsync.vrrp_adapter import VrrpSignal

        self.vrrp = VrrpSignal(self_id=self.node.node_id, node_ids=cfg.node_ids,
                               fifo=cfg.vrrp_fifo(self.node.node_id), sink=self,
                               loop=self.node.loop)
        self.vrrp.start()

    def _vrrp_reporting(self) -> bool:
        return self.vrrp is not None and bool(self.vrrp.reporting)

    def vrrp_peer_verdict(self, peer: int, dead: bool) -> None:
        """keepalived took ``peer``'s instance over (or gave it back): rule 3b."""
        node = self.node
        node.ms.vrrp_verdict(peer, dead, node.loop.time())
        node._membership_changed()

    def vrrp_own_link(self, failed: bool) -> None:
        """This node's own VRRP instance entered (left) FAULT."""
        self.vrrp_fault = failed
        self._apply_link_state("vrrp")

    def vrrp_signal_lost(self, reason: str) -> None:
        """keepalived stopped or closed the FIFO: its verdicts are stale (back to T_dead) and
        the link poll is the only link signal until keepalived reports again."""
        self.vrrp_signal_losses += 1
        node = self.node
        now = node.loop.time()
        for peer in sorted(node.ms.vrrp_dead):
            node.ms.vrrp_verdict(peer, False, now)
        node._membership_changed()
        if self.vrrp_fault:
            self.vrrp_fault = False
            self._apply_link_state("vrrp")

    # ---------------------------------------------------------------- link failure

    def _schedule_link_check(self) -> None:
        self.node.loop.call_later(LINK_CHECK_INTERVAL, self._check_links)

    def _check_links(self) -> None:
        """Outside or inside link down (replication still up): this node cannot forward its
        buckets, so it leaves them to the others instead of black-holing them (see
        :meth:`_hand_off_everything`). Polled every LINK_CHECK_INTERVAL; with keepalived
        reporting, the poll is the fallback (LINK_POLL_FALLBACK)."""
        node = self.node
        try:
            if node.stopping:
                if self.vrrp is not None:
                    self.vrrp.close()
                if self._link_sock is not None:
                    self._link_sock.close()
                    self._link_sock = None
                return
            ifs = node.cfg.interfaces
            # only a link seen up before counts as failed (a host without it is not a failure)
            if self._link_sock is None:
                self._link_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            state = {n: link_up(n, self._link_sock) for n in (ifs.outside, ifs.inside)}
            self._seen_up.update(n for n, up in state.items() if up)
            down = frozenset(n for n, up in state.items() if not up and n in self._seen_up)
            if down != self.link_down:
                log.warning("ops.link_%s ifaces=%s owned=%d", "down" if down else "up",
                            ",".join(sorted(down or self.link_down)), len(node.owned))
                self._poll_down_since = node.loop.time() if down else None
            self.link_down = down
            self._apply_link_state("poll")
            if self._refreshing and not self.link_failed and not node._to_inject \
                    and not node._to_delete:
                # copies rebuilt from the store: this node may own buckets again
                self._refreshing = False
                node.ms.set_local(node.loop.time(), drained=self._operator_drained)
                node._membership_changed()
                log.warning("ops.link_recovered drained=%s", self._operator_drained)
        except Exception as exc:  # the watch must keep running
            log.error("ops.link_check_failed error=%r", exc)
        finally:
            if not node.stopping:
                self._schedule_link_check()

    def _apply_link_state(self, source: str) -> None:
        """Hand everything off when keepalived's FAULT or the poll (see _check_links) says a
        link failed; rebuild the kernel copies when neither does any more."""
        now = self.node.loop.time()
        poll_failed = bool(self.link_down) and (
            not self._vrrp_reporting() or self._poll_down_since is None
            or now - self._poll_down_since >= LINK_POLL_FALLBACK)
        if (self.vrrp_fault or poll_failed) and not self.link_failed:
            self.link_failed = True
            by = "vrrp" if self.vrrp_fault else "poll"
            self._link_counts[f"link_handoffs_{by}"] += 1
            t0 = time.monotonic()
            released = len(self.node.owned)
            self._hand_off_everything()
            self.link_events.append({"event": "handoff", "by": by, "trigger": source,
                                     "released": released, "monotonic": t0,
                                     "handoff_s": time.monotonic() - t0,
                                     "ifaces": sorted(self.link_down)})
        elif self.link_failed and not self.vrrp_fault and not self.link_down:
            self.link_failed = False
            self._link_counts["link_recoveries"] += 1
            self.link_events.append({"event": "recovered", "trigger": source,
                                     "monotonic": time.monotonic()})
            log.warning("ops.link_failure_over trigger=%s", source)
            self._refreshing = self._refresh_kernel_copies()

    def _target_without_me(self) -> Any:
        """``hashing.assign`` from the agreed target map (not from heartbeat reports, which may
        lag) with this node drained."""
        from hashing.ownermap import ALGORITHM_VERSION, ZERO_HASH, Member, OwnerMap, View, assign

        node = self.node
        tm = node.ms.map
        if tm is None or 0 in tm.owners:
            raise OpsError("no complete agreed map")
        owners = tuple(tm.owners)
        current = OwnerMap(version=ALGORITHM_VERSION, buckets=node.B, epoch=tm.epoch,
                           prev_hash=ZERO_HASH, view=View.of(Member(n) for n in set(owners)),
                           owners=owners)
        members = {m.node_id: Member(m.node_id, m.weight, m.drained)
                   for m in node.ms.ready_view()}
        members[node.node_id] = Member(node.node_id, node.ms.weight, True)
        return assign(View.of(members.values()), node.B, current)

    def _refresh_kernel_copies(self) -> bool:
        """After a cluster link was down this node missed packets of every flow, so its
        kernel copies' TCP tracking is stale (a claim would drop their packets as invalid):
        delete them all and create them again from the store (the owners' latest state)."""
        node = self.node
        n = 0
        for b in range(node.B):
            if b in node.owned:
                continue
            for key in list(node.in_kernel[b]):
                node.in_kernel[b].discard(key)
                node._to_delete[key] = b
            for key in node.store.flows(b):
                node._to_inject[key] = b
                n += 1
        node._kernel_work.set()
        log.warning("ops.link_refresh copies=%d", n)
        return True

    def _hand_off_everything(self) -> None:
        """Drain this node (not persisted: link state), propose the map without it, and
        release every owned bucket. The map's new targets find the buckets unowned and claim
        them (commit, then claim) once every member reports the new map: no control socket of
        another node is needed, at the price of a heartbeat or two of gap."""
        node = self.node
        now = node.loop.time()
        self._operator_drained = bool(node.ms.drained)
        node.ms.set_local(now, drained=True)
        try:
            from lbsync.node import target_map

            new = self._target_without_me()
            node.ms.propose_map(target_map(new, proposer=node.node_id), now)
        except Exception as exc:  # no agreed map to start from: release anyway
            log.warning("ops.link_handoff_no_map error=%s", exc)
        owned = sorted(node.owned)
        if owned:
            node.ms.handoff_release(owned, now)
            try:
                node.nft.update_marks("owned", (), owned)
            except Exception as exc:
                log.error("ops.link_handoff_nft error=%s", exc)
            node._kernel_owned.difference_update(owned)
            for b in owned:
                node.owned.discard(b)
                node.ep.release(b)
            node.ep.flush(now)
            if node.transport is not None:
                node.transport.pump()
        self.link_handoffs += 1
        node._membership_changed()
        log.warning("ops.link_handoff released=%d", len(owned))

    def statistics(self) -> dict[str, Any]:
        """Snapshot: counters and the last planned handoffs taken by this node."""
        return {"resyncs_requested": self.resyncs_requested, "drills": self.drills,
                "takes": self.takes, "handoffs": [dict(h) for h in self.handoffs],
                "links_down": sorted(self.link_down), "link_handoffs": self.link_handoffs,
                "link_failed": self.link_failed, "vrrp_fault": self.vrrp_fault,
                "vrrp_signal_losses": self.vrrp_signal_losses, **self._link_counts,
                "link_events": [dict(e) for e in self.link_events]}

    def vrrp_statistics(self) -> dict[str, Any] | None:
        """keepalived's signal (``status --json`` key ``vrrp``), None when not enabled."""
        return self.vrrp.statistics() if self.vrrp is not None else None

    # ---------------------------------------------------------------- operator state

    def _operator_file(self) -> Path:
        state = self.node.state
        return Path(state.base).with_suffix(".operator")

    def _restore_operator_state(self) -> None:
        try:
            data = json.loads(self._operator_file().read_text())
        except (OSError, ValueError, AttributeError):
            return
        node = self.node
        drained = bool(data.get("drained", False))
        weight = data.get("weight")
        node.ms.set_local(node.loop.time(), drained=drained,
                          weight=int(weight) if isinstance(weight, int) else None)
        log.info("ops.operator_state_restored drained=%s weight=%s", drained, weight)

    async def set_local(self, args: Mapping[str, Any]) -> Any:
        node = self.node
        drained = args.get("drained")
        weight = args.get("weight")
        if weight is not None:
            weight = _int(weight, "weight")
            if not 1 <= weight <= 1_000_000:
                raise OpsError("weight must be 1..1000000")
        if drained is not None and not isinstance(drained, bool):
            raise OpsError("drained must be true or false")
        if drained is not None:
            self._operator_drained = drained
        if self.link_down and drained is False:
            drained = None  # stays drained while its link is down; undrained when it is back
        node.ms.set_local(node.loop.time(), drained=drained, weight=weight)
        node._membership_changed()
        path = self._operator_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"drained": self._operator_drained,
                                   "weight": node.ms.weight}))
        os.replace(tmp, path)
        return {"node_id": node.node_id, "drained": node.ms.drained,
                "weight": node.ms.weight, "persisted": str(path)}

    # ---------------------------------------------------------------- rebalance

    def _plan(self, max_batch: int) -> tuple[Any, Any, tuple[tuple[Any, ...], ...]]:
        from hashing.ownermap import (
            ALGORITHM_VERSION,
            ZERO_HASH,
            Member,
            OwnerMap,
            View,
            assign,
            plan,
        )

        node = self.node
        tm = node.ms.map
        if tm is None:
            raise OpsError("no agreed map yet")
        actual = reported_owners(node)
        bad = [b for b, o in actual.items() if len(o) != 1]
        if bad:
            raise OpsError(f"{len(bad)} buckets have no single actual owner (a takeover or "
                           f"fence in flight): try again")
        owners = tuple(actual[b][0] for b in range(node.B))
        held = View.of(Member(n) for n in sorted(set(owners)))
        current = OwnerMap(version=ALGORITHM_VERSION, buckets=node.B, epoch=tm.epoch,
                           prev_hash=ZERO_HASH, view=held, owners=owners)
        ready = View.of(Member(m.node_id, m.weight, m.drained)
                        for m in node.ms.ready_view())
        if not ready.eligible:
            raise OpsError("no ready, undrained member to own buckets")
        new = assign(ready, node.B, current)
        return current, new, plan(current, new, max_batch)

    async def rebalance_plan(self, args: Mapping[str, Any]) -> Any:
        k = _int(args.get("max_concurrent", 8), "max_concurrent")
        if k < 1:
            raise OpsError("max_concurrent must be >= 1")
        current, new, batches = self._plan(k)
        return {"map_epoch": current.epoch, "new_epoch": new.epoch,
                "view": [[m.node_id, m.weight, m.drained] for m in new.view.members],
                "current": list(current.owners), "target": list(new.owners),
                "moves": sum(len(b) for b in batches),
                "batches": [[[m.bucket, m.from_node, m.to_node] for m in b] for b in batches]}

    async def map_propose(self, args: Mapping[str, Any]) -> Any:
        """Install the target map of the current plan (epoch + 1) as the agreed map."""
        from lbsync.node import target_map

        node = self.node
        _current, new, _batches = self._plan(1)
        want = [int(x) for x in args.get("target", [])]
        if want and want != list(new.owners):
            raise OpsError("the farm changed since the plan: plan again")
        tm = target_map(new, proposer=node.node_id)
        node.ms.propose_map(tm, node.loop.time())
        node._membership_changed()
        return {"map_epoch": node.ms.map.epoch, "digest": node.ms.map.digest.hex()}

    async def handoff_seal(self, args: Mapping[str, Any]) -> Any:
        """Old owner: stop forwarding ``buckets``, replicate what was read, release, flush."""
        node = self.node
        buckets = sorted({_int(b, "bucket") for b in args.get("buckets", [])})
        if not buckets:
            raise OpsError("no buckets to seal")
        skipped = [b for b in buckets if b not in node.owned]  # the plan was stale for them
        buckets = [b for b in buckets if b in node.owned]
        ms = node.ms
        if not buckets:
            return {"node_id": node.node_id, "buckets": [], "skipped": skipped,
                    "seq": node.ep.sender.statistics().next_seq - 1,
                    "incarnation": node.incarnation, "released_monotonic": time.monotonic()}
        # membership first, so no lease refresh re-adds them to @owned meanwhile
        ms.handoff_release(buckets, node.loop.time())
        node.nft.update_marks("owned", (), buckets)
        released = time.monotonic()
        node._kernel_owned.difference_update(buckets)
        # conntrack events already queued for these buckets are still ours to replicate
        await asyncio.sleep(SEAL_DRAIN)
        now = node.loop.time()
        for b in buckets:
            node.owned.discard(b)
            node.ep.release(b)
        node.ep.flush(now)
        if node.transport is not None:
            node.transport.pump()
        seq = node.ep.sender.statistics().next_seq - 1
        # No early heartbeat: the new owner's take (forced heartbeat) normally comes first;
        # announced sooner, the bucket would look orphaned and be claimed without the seal.
        node._membership_changed()
        return {"node_id": node.node_id, "buckets": buckets, "skipped": skipped, "seq": seq,
                "incarnation": node.incarnation, "released_monotonic": released}

    async def handoff_take(self, args: Mapping[str, Any]) -> Any:
        """New owner: once the old owner's stream is delivered up to the seal, commit the
        buckets' entries the kernel lacks, then claim them in one transaction."""
        node = self.node
        t_start = time.monotonic()
        buckets = sorted({_int(b, "bucket") for b in args.get("buckets", [])})
        src = _int(args.get("from_node"), "from_node")
        seal = _int(args.get("seq"), "seq")
        if node.ms.fenced or node.ms.lease_expiry() <= node.loop.time():
            # sealed buckets stay unowned; as the map's target this node claims them by the
            # orphan rule once it is backed again
            raise OpsError(f"node {node.node_id} is fenced: cannot take buckets now")
        rcv = node.ep.receiver
        deadline = node.loop.time() + TAKE_WAIT
        complete = True
        while True:
            pos = rcv.peer_position(src)
            if pos is not None and pos[1] > seal:
                break
            if node.loop.time() >= deadline:
                complete = False
                log.warning("ops.handoff_incomplete from=%d seal=%d at=%s", src, seal, pos)
                break
            await asyncio.sleep(0.001)
        t_delivered = time.monotonic()
        todo = [b for b in buckets if b not in node.owned]
        missing: list[bytes] = []
        for b in todo:
            ink = node.in_kernel[b]
            for key in node.store.flows(b):
                if key not in ink:
                    node._to_inject[key] = b
                    missing.append(key)
        injected = 0
        for i in range(0, len(missing), 2048):
            injected += await node._inject_some(2048, missing[i:i + 2048])
        t_committed = time.monotonic()
        claimed = time.monotonic()
        if todo:
            now = node.loop.time()
            node._write_owned(todo, node.ms.lease_expiry(), now)
            claimed = time.monotonic()
            epoch = node.ms.map.epoch if node.ms.map is not None else 1
            accepted = node.ms.handoff_claimed(todo, now)
            refused = [b for b in todo if b not in accepted]
            if refused:  # fenced meanwhile: never forward what membership does not back
                node.nft.update_marks("owned", (), refused)
                todo = [b for b in todo if b in accepted]
            node._kernel_owned.update(todo)
            for b in todo:
                node.owned.add(b)
                node.ep.claim(b, epoch, now)
            node._membership_changed()
        released = args.get("released_monotonic")
        gap = claimed - float(released) if isinstance(released, (int, float)) else None
        self.takes += 1
        if todo:
            self.handoffs.append({"from_node": src, "buckets": todo, "gap_s": gap,
                                  "wait_s": t_delivered - t_start,
                                  "commit_s": t_committed - t_delivered,
                                  "claimed_monotonic": claimed, "complete": complete})
        return {"node_id": node.node_id, "buckets": buckets, "taken": todo,
                "already_owned": [b for b in buckets if b not in todo],
                "complete": complete, "injected": injected,
                "wait_s": t_delivered - t_start, "commit_s": t_committed - t_delivered,
                "claimed_monotonic": claimed}

    def handlers(self) -> dict[str, Handler]:
        return {"map": self.map, "resync": self.resync, "resync-status": self.resync_status,
                "drill-fail": self.drill_fail, "drill-counters": self.drill_counters,
                "rebalance-plan": self.rebalance_plan, "map-propose": self.map_propose,
                "handoff-seal": self.handoff_seal, "handoff-take": self.handoff_take,
                "set-local": self.set_local, "drill-partition": self.drill_partition,
                "ops-status": self.ops_status,
                **({"notify": self.vrrp.handler()} if self.vrrp is not None else {})}

    async def ops_status(self, _args: Mapping[str, Any]) -> Any:
        return self.statistics()

    async def map(self, args: Mapping[str, Any]) -> Any:
        explain = args.get("explain")
        if explain is not None:
            return explain_bucket(self.node, _int(explain, "bucket"))
        return map_snapshot(self.node)

    def _resync_status(self) -> dict[str, Any]:
        node = self.node
        rs = node.ep.receiver.statistics()
        return {"pending": node.ep.receiver.pending_resyncs(),
                "completed": rs.resyncs_completed, "requests_sent": rs.resync_requests,
                "buckets_resynced": node.c["buckets_resynced"],
                "store_entries": len(node.store)}

    async def resync(self, args: Mapping[str, Any]) -> Any:
        """Ask owners to stream buckets again (one bucket: its actual owner; none: every peer
        for everything it owns). The store is replaced bucket by bucket as answers end."""
        node = self.node
        now = node.loop.time()
        bucket = args.get("bucket")
        asked: dict[int, list[int]] = {}
        if bucket is not None:
            b = _int(bucket, "bucket")
            if not 0 <= b < node.B:
                raise OpsError(f"bucket {b} out of range 0..{node.B - 1}")
            owners = [o for o in reported_owners(node)[b] if o != node.node_id]
            if b in node.owned:
                raise OpsError(f"bucket {b} is owned by this node: its kernel is the source")
            if not owners:
                raise OpsError(f"bucket {b} has no live owner to resync from")
            node.ep.request_resync(owners[0], (b,), now)
            asked[owners[0]] = [b]
        else:
            peers = [p.node_id for p in node.ms.statistics().peers
                     if p.state in ("alive", "leaving") and p.owned]
            for peer in peers:
                node.ep.request_resync(peer, (), now)
                asked[peer] = []
        if node.transport is not None:
            node.transport.pump()
        self.resyncs_requested += 1
        log.info("ops.resync asked=%s", asked)
        return {"asked": {str(k): v for k, v in asked.items()}, **self._resync_status()}

    async def resync_status(self, _args: Mapping[str, Any]) -> Any:
        return self._resync_status()

    async def drill_fail(self, args: Mapping[str, Any]) -> Any:
        """Fail like a dead node: empty ``@owned`` now, then hang the loop for ``duration``."""
        node = self.node
        duration = float(args.get("duration", 0))
        if not 0 < duration <= MAX_DRILL_HANG:
            raise OpsError(f"duration must be in (0, {MAX_DRILL_HANG:.0f}] seconds")
        owned = sorted(node.owned)
        self.drills += 1

        def hang() -> None:
            t0 = time.monotonic()
            self.last_fail_monotonic = t0
            try:
                node.nft.update_marks("owned", (), range(node.B))
            except Exception as exc:  # the drill must hang even if the set is gone
                log.error("ops.drill_fence_failed error=%s", exc)
            log.warning("ops.drill_fail hanging=%.1f s owned=%d", duration, len(owned))
            # A hung daemon, on purpose: no heartbeat, no lease refresh, no replication.
            time.sleep(duration)
            log.warning("ops.drill_fail resumed after=%.3f s", time.monotonic() - t0)

        # after this answer has been written
        node.loop.call_later(0.05, hang)
        return {"node_id": node.node_id, "owned": owned, "incarnation": node.ms.incarnation,
                "duration": duration, "hang_after_s": 0.05}

    async def drill_partition(self, args: Mapping[str, Any]) -> Any:
        """Cut this node's replication link (both directions, its UDP port, in a table of its
        own) for ``duration`` seconds; the daemon keeps running and reacts as it would to a
        real partition (no echoes: its lease runs out and it fences; peers take over)."""
        node = self.node
        duration = float(args.get("duration", 0))
        if not 0 < duration <= MAX_DRILL_HANG:
            raise OpsError(f"duration must be in (0, {MAX_DRILL_HANG:.0f}] seconds")
        iface = node.cfg.interfaces.replication
        port = node.cfg.replication.port
        rules = (f"table inet {PARTITION_TABLE} {{\n"
                 f"  chain pre {{ type filter hook prerouting priority -400; policy accept;\n"
                 f"    iifname \"{iface}\" udp dport {port} drop\n  }}\n"
                 f"  chain out {{ type filter hook output priority -400; policy accept;\n"
                 f"    oifname \"{iface}\" udp dport {port} drop\n  }}\n}}\n")
        await asyncio.to_thread(_nft_quiet, ["delete", "table", "inet", PARTITION_TABLE])
        await asyncio.to_thread(run_nft, ["-f", "-"], input=rules)
        owned = sorted(node.owned)
        self.drills += 1
        log.warning("ops.drill_partition seconds=%.1f iface=%s", duration, iface)

        def heal() -> None:
            _nft_quiet(["delete", "table", "inet", PARTITION_TABLE])
            log.warning("ops.drill_partition healed")

        node.loop.call_later(duration, heal)
        return {"node_id": node.node_id, "owned": owned, "incarnation": node.ms.incarnation,
                "duration": duration}

    async def drill_counters(self, args: Mapping[str, Any]) -> Any:
        action = args.get("action")
        if action == "install":
            await asyncio.to_thread(_nft_quiet, ["delete", "table", "inet", DRILL_TABLE])
            ifs = self.node.cfg.interfaces
            await asyncio.to_thread(run_nft, ["-f", "-"],
                                    input=drill_rules(ifs.outside, ifs.inside))
            return {"installed": True}
        if action == "read":
            return await asyncio.to_thread(read_drill_counters)
        if action == "remove":
            return {"removed": await asyncio.to_thread(
                _nft_quiet, ["delete", "table", "inet", DRILL_TABLE])}
        raise OpsError("drill-counters action must be install, read or remove")


def read_drill_counters(netns: str | None = None) -> dict[str, int]:
    """Packets counted by the drill's reset counters (0 when the table is missing)."""
    out = {"forwarded_rst": 0, "local_rst": 0}
    try:
        text = run_nft(["-j", "list", "table", "inet", DRILL_TABLE], netns=netns)
    except NftError:
        return out
    for obj in json.loads(text).get("nftables", []):
        c = obj.get("counter")
        if c and c.get("name") in out:
            out[c["name"]] = int(c.get("packets", 0))
    return out


def _nft_quiet(args: list[str]) -> bool:
    try:
        run_nft(args)
    except NftError:
        return False
    return True


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise OpsError(f"{what} must be an integer, not {value!r}") from None
