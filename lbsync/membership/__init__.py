"""Membership: heartbeats, failure detection, self-fencing, map agreement and claim decisions.

A sans-IO core (:class:`Membership`) plus its wire messages; see docs/membership.md.
"""

from __future__ import annotations

from lbsync.membership.core import (
    Event,
    FenceRequired,
    MapAdopted,
    MapBootstrapNeeded,
    MemberInfo,
    Membership,
    MembershipError,
    MembershipStatistics,
    OwnershipReleased,
    PeerJoined,
    PeerLeaving,
    PeerLost,
    PeerRestarted,
    TakeoverDecided,
    TakeoverRecord,
    Unfenced,
)
from lbsync.membership.messages import (
    Heartbeat,
    MapOffer,
    MapRequest,
    MembershipMessage,
    MembershipWireError,
    PeerReport,
    decode,
)
from lbsync.membership.ownermap import (
    TargetMap,
    bitmap_from_buckets,
    buckets_from_bitmap,
)
from lbsync.membership.timing import Timing

__all__ = [
    "Event", "FenceRequired", "Heartbeat", "MapAdopted", "MapBootstrapNeeded", "MapOffer",
    "MapRequest", "MemberInfo", "Membership", "MembershipError", "MembershipMessage",
    "MembershipStatistics", "MembershipWireError", "OwnershipReleased", "PeerJoined",
    "PeerLeaving", "PeerLost", "PeerReport", "PeerRestarted", "TakeoverDecided",
    "TakeoverRecord", "TargetMap", "Timing", "Unfenced", "bitmap_from_buckets",
    "buckets_from_bitmap", "decode",
]
