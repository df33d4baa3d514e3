"""Events the replication endpoint reports to its caller (the daemon, the simulation)."""

from __future__ import annotations

from dataclasses import dataclass

from lbsync.replication.wire import RecordMessage


@dataclass(frozen=True, slots=True)
class RecordsApplied:
    """A delivered data datagram's records passed the owner_epoch rule and are in the store;
    ``changes`` are the applied updates and deletes, in stream order."""

    sender: int
    changes: tuple[RecordMessage, ...]


@dataclass(frozen=True, slots=True)
class RecordRefused:
    """The store was full: a new entry was refused (counted in the store's statistics too)."""

    sender: int
    bucket: int
    key: bytes


@dataclass(frozen=True, slots=True)
class SenderJoined:
    """A sender was heard for the first time."""

    sender: int
    incarnation: int


@dataclass(frozen=True, slots=True)
class SenderRestarted:
    """A sender came back with a higher incarnation; a full resync from it was requested."""

    sender: int
    old_incarnation: int
    incarnation: int


@dataclass(frozen=True, slots=True)
class SenderSilent:
    """Nothing was heard from a sender for ``silent_after``; its records stay in the store."""

    sender: int
    last_heard: float


@dataclass(frozen=True, slots=True)
class SenderResumed:
    """A sender reported silent was heard again."""

    sender: int


@dataclass(frozen=True, slots=True)
class DatagramsGone:
    """A sender no longer had datagrams we missed; it resyncs ``buckets`` (None: all its own)."""

    sender: int
    count: int
    buckets: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class ResyncRequested:
    """A peer asked this node to stream buckets it owns (answered by the endpoint, paced)."""

    requester: int
    token: int
    buckets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BucketResynced:
    """A bucket's resync answer from ``sender`` ended here: ``purged`` stale entries were dropped
    and the bucket's digest ``agreed`` (or not) with the owner's."""

    sender: int
    bucket: int
    purged: int
    agreed: bool


@dataclass(frozen=True, slots=True)
class DigestCompared:
    """An owner's in-stream bucket digest was compared with ours."""

    sender: int
    bucket: int
    agreed: bool


@dataclass(frozen=True, slots=True)
class MembershipReceived:
    """An opaque membership message arrived (authenticated, replay-checked)."""

    sender: int
    incarnation: int
    subkind: int
    payload: bytes


Event = (RecordsApplied | RecordRefused | SenderJoined | SenderRestarted | SenderSilent
         | SenderResumed | DatagramsGone | ResyncRequested | BucketResynced | DigestCompared
         | MembershipReceived)
