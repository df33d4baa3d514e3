"""Replication protocol: sans-IO sender/receiver cores, wire format, simulation, transport.

Start with :class:`lbsync.replication.endpoint.ReplicationEndpoint` and ``docs/protocol.md``.
"""

from __future__ import annotations

from lbsync.replication.auth import KeyRing, KeyRingError
from lbsync.replication.endpoint import EndpointStatistics, ReplicationEndpoint
from lbsync.replication.params import ProtocolParams
from lbsync.replication.store import EXPECTATION, FLOW, BucketStore, Outcome

__all__ = [
    "EXPECTATION",
    "FLOW",
    "BucketStore",
    "EndpointStatistics",
    "KeyRing",
    "KeyRingError",
    "Outcome",
    "ProtocolParams",
    "ReplicationEndpoint",
]
