"""Membership messages and their wire form (carried by the replication protocol as one kind).

``to_wire()`` gives msgpack-able primitives only (int, bytes, list); ``decode(obj)`` turns such
an object back into a message or raises :class:`MembershipWireError` (one error for every kind of
malformed input: the daemon counts and drops it). Every message starts ``[kind, version, ...]``.

Durations travel in milliseconds, never clocks: a heartbeat says how long ago its sender last
heard each other node (``age_ms``), and which of that node's heartbeats it heard last
(``echo_seq``), from which that node computes its forwarding lease with its *own* send times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lbsync.membership.ownermap import MAX_NODE_ID, TargetMap

VERSION = 1
KIND_HEARTBEAT = 1
KIND_MAP_REQUEST = 2
KIND_MAP_OFFER = 3

MAX_PEERS = 256
MAX_BITMAP = 512  # 4096 buckets
MAX_DIGEST = 32
MAX_U32 = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF

FLAG_READY = 1
FLAG_FENCED = 2
FLAG_DRAINED = 4
FLAG_WITNESS = 8
_ALL_FLAGS = FLAG_READY | FLAG_FENCED | FLAG_DRAINED | FLAG_WITNESS


class MembershipWireError(ValueError):
    """A membership message from a peer is malformed (remote error: count and drop)."""


@dataclass(frozen=True, slots=True)
class PeerReport:
    """What a heartbeat's sender knows of one other node."""

    node_id: int
    incarnation: int
    """The incarnation of ``node_id`` the sender heard last."""
    age_ms: int
    """How long before sending the sender last heard ``node_id``."""
    echo_seq: int
    """Sequence number of the last heartbeat of ``node_id`` heard (0: none it will vouch for)."""
    lost_incarnation: int
    """Highest incarnation of ``node_id`` the sender has declared lost (0: none)."""

    def to_wire(self) -> list[int]:
        return [self.node_id, self.incarnation, self.age_ms, self.echo_seq,
                self.lost_incarnation]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Periodic liveness, map and ownership announcement of one node (multicast)."""

    node_id: int
    incarnation: int
    seq: int
    view_id: int
    map_epoch: int
    map_proposer: int
    map_digest: bytes
    owned: bytes
    """Bitmap of the buckets the sender actually owns (claimed), fenced or not."""
    ready: bool
    fenced: bool
    drained: bool
    witness: bool
    weight: int
    grace_ms: int
    """Remaining planned-shutdown grace (0: not leaving)."""
    peers: tuple[PeerReport, ...]

    @classmethod
    def from_wire(cls, obj: Any) -> Heartbeat:
        """Decode a wire object that must be a Heartbeat, else :class:`MembershipWireError`."""
        msg = decode(obj)
        if not isinstance(msg, cls):
            raise MembershipWireError(f"expected a Heartbeat, got {type(msg).__name__}")
        return msg

    def to_wire(self) -> list[Any]:
        flags = ((FLAG_READY if self.ready else 0) | (FLAG_FENCED if self.fenced else 0)
                 | (FLAG_DRAINED if self.drained else 0) | (FLAG_WITNESS if self.witness else 0))
        return [KIND_HEARTBEAT, VERSION, self.node_id, self.incarnation, self.seq, self.view_id,
                self.map_epoch, self.map_proposer, self.map_digest, self.owned, flags,
                self.weight, self.grace_ms, [p.to_wire() for p in self.peers]]


@dataclass(frozen=True, slots=True)
class MapRequest:
    """Ask a peer for its map (sent to the peer whose heartbeat announced a better one)."""

    node_id: int
    epoch: int
    proposer: int

    @classmethod
    def from_wire(cls, obj: Any) -> MapRequest:
        """Decode a wire object that must be a MapRequest, else :class:`MembershipWireError`."""
        msg = decode(obj)
        if not isinstance(msg, cls):
            raise MembershipWireError(f"expected a MapRequest, got {type(msg).__name__}")
        return msg

    def to_wire(self) -> list[Any]:
        return [KIND_MAP_REQUEST, VERSION, self.node_id, self.epoch, self.proposer]


@dataclass(frozen=True, slots=True)
class MapOffer:
    """A full target map, in answer to a MapRequest."""

    node_id: int
    map: TargetMap

    @classmethod
    def from_wire(cls, obj: Any) -> MapOffer:
        """Decode a wire object that must be a MapOffer, else :class:`MembershipWireError`."""
        msg = decode(obj)
        if not isinstance(msg, cls):
            raise MembershipWireError(f"expected a MapOffer, got {type(msg).__name__}")
        return msg

    def to_wire(self) -> list[Any]:
        m = self.map
        return [KIND_MAP_OFFER, VERSION, self.node_id, m.epoch, m.proposer, m.owners,
                list(m.successors), [[n, i] for n, i in m.incarnations]]


MembershipMessage = Heartbeat | MapRequest | MapOffer


def _int(v: Any, what: str, lo: int = 0, hi: int = MAX_U64) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise MembershipWireError(f"{what}: expected an integer in {lo}..{hi}")
    return v


def _bytes(v: Any, what: str, maxlen: int) -> bytes:
    if not isinstance(v, bytes) or len(v) > maxlen:
        raise MembershipWireError(f"{what}: expected at most {maxlen} bytes")
    return v


def _list(v: Any, what: str, n: int | None = None, maxlen: int = MAX_PEERS) -> list[Any]:
    if not isinstance(v, (list, tuple)) or len(v) > maxlen or (n is not None and len(v) != n):
        raise MembershipWireError(f"{what}: expected a list" + (f" of {n}" if n else ""))
    return list(v)


def _node(v: Any, what: str) -> int:
    return _int(v, what, 0, MAX_NODE_ID)


def decode(obj: Any) -> MembershipMessage:
    """Wire object -> message, or :class:`MembershipWireError`."""
    if not isinstance(obj, (list, tuple)) or len(obj) < 2:
        raise MembershipWireError("not a membership message")
    kind = _int(obj[0], "kind", 0, 255)
    if _int(obj[1], "version", 0, 255) != VERSION:
        raise MembershipWireError(f"unsupported membership version {obj[1]}")
    if kind == KIND_HEARTBEAT:
        f = _list(obj, "heartbeat", 14)
        flags = _int(f[10], "flags", 0, 255)
        if flags & ~_ALL_FLAGS:
            raise MembershipWireError("unknown heartbeat flags")
        peers = []
        for i, p in enumerate(_list(f[13], "peers")):
            # Every heartbeat carries a report per peer: the well-formed case is checked
            # inline (exact types, the same bounds), anything else by the generic checks,
            # which raise the same errors as before.
            if type(p) is list and len(p) == 5:
                n, inc, age, echo, lost = p
                if (type(n) is int and 0 <= n <= MAX_NODE_ID and type(inc) is int
                        and 0 <= inc <= MAX_U64 and type(age) is int and 0 <= age <= MAX_U32
                        and type(echo) is int and 0 <= echo <= MAX_U64 and type(lost) is int
                        and 0 <= lost <= MAX_U64):
                    peers.append(PeerReport(n, inc, age, echo, lost))
                    continue
            e = _list(p, f"peers[{i}]", 5)
            peers.append(PeerReport(
                node_id=_node(e[0], "peer id"), incarnation=_int(e[1], "peer incarnation"),
                age_ms=_int(e[2], "age_ms", 0, MAX_U32), echo_seq=_int(e[3], "echo_seq"),
                lost_incarnation=_int(e[4], "lost_incarnation")))
        return Heartbeat(
            node_id=_node(f[2], "node_id"), incarnation=_int(f[3], "incarnation", 1),
            seq=_int(f[4], "seq", 1), view_id=_int(f[5], "view_id"),
            map_epoch=_int(f[6], "map_epoch"), map_proposer=_node(f[7], "map_proposer"),
            map_digest=_bytes(f[8], "map_digest", MAX_DIGEST), owned=_bytes(f[9], "owned",
                                                                            MAX_BITMAP),
            ready=bool(flags & FLAG_READY), fenced=bool(flags & FLAG_FENCED),
            drained=bool(flags & FLAG_DRAINED), witness=bool(flags & FLAG_WITNESS),
            weight=_int(f[11], "weight", 0, 1000), grace_ms=_int(f[12], "grace_ms", 0, MAX_U32),
            peers=tuple(peers))
    if kind == KIND_MAP_REQUEST:
        f = _list(obj, "map request", 5)
        return MapRequest(node_id=_node(f[2], "node_id"), epoch=_int(f[3], "epoch"),
                          proposer=_node(f[4], "proposer"))
    if kind == KIND_MAP_OFFER:
        f = _list(obj, "map offer", 8)
        owners = _bytes(f[5], "owners", 8 * MAX_BITMAP)
        chains = [_bytes(c, "chain", MAX_PEERS) for c in _list(f[6], "chains", None,
                                                                8 * MAX_BITMAP)]
        incs = []
        for e in _list(f[7], "incarnations"):
            pair = _list(e, "incarnation", 2)
            incs.append((_node(pair[0], "member"), _int(pair[1], "member incarnation")))
        try:
            m = TargetMap(epoch=_int(f[3], "epoch", 1), proposer=_node(f[4], "proposer"),
                          owners=owners, successors=tuple(chains), incarnations=tuple(incs))
        except ValueError as exc:
            if isinstance(exc, MembershipWireError):
                raise
            raise MembershipWireError(f"bad map: {exc}") from None
        return MapOffer(node_id=_node(f[2], "node_id"), map=m)
    raise MembershipWireError(f"unknown membership message kind {kind}")
