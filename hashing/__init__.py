"""hashing: the bucket function (nft jhash twin) and the bucket -> owner map specification.

Pure, dependency-free, versioned; see docs/hashing.md.
"""

from __future__ import annotations

from hashing.jhash import bucket_of, flow_key, jhash, jhash2, nft_jhash_expr, reciprocal_scale
from hashing.ownermap import (
    ALGORITHM_VERSION,
    NO_OWNER,
    Member,
    Move,
    OwnerMap,
    OwnerMapError,
    View,
    apportion,
    assign,
    explain,
    plan,
)

__all__ = [
    "ALGORITHM_VERSION",
    "NO_OWNER",
    "Member",
    "Move",
    "OwnerMap",
    "OwnerMapError",
    "View",
    "apportion",
    "assign",
    "bucket_of",
    "explain",
    "flow_key",
    "jhash",
    "jhash2",
    "nft_jhash_expr",
    "plan",
    "reciprocal_scale",
]
