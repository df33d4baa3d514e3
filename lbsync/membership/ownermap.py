"""The target map as membership carries and agrees on it, and the owned-bucket bitmap.

``TargetMap`` is membership's own, self-contained copy of the owner map that ``hashing/``
computes (``hashing.assign``): per bucket its target owner and its ordered successor chain, plus
the map epoch and the proposer that produced it. Membership needs nothing else from a map:

- *agreement*: maps are ranked by ``(epoch, -proposer)``: the highest epoch wins, ties go to the
  lowest proposer id. Two maps with the same content have the same ``digest`` whoever proposed
  them (the proposer is not hashed), so two survivors that compute the same takeover map agree.
- *takeover*: a dead node's bucket goes to the first node of its chain ``(owner, *successors)``
  that is not dead (:meth:`TargetMap.without`). Every survivor holding the same map and the same
  dead set computes the same result, so they never disagree on who inherits a bucket.

Node ids are 1..255 (one byte on the wire); 0 means "no owner".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

NO_OWNER = 0
MAX_NODE_ID = 255


class OwnerMapLike(Protocol):
    """What membership reads from a ``hashing`` owner map (see :meth:`TargetMap.from_owner_map`)."""

    @property
    def epoch(self) -> int: ...


def bitmap_from_buckets(buckets: Iterable[int], nbuckets: int) -> bytes:
    """Bucket set -> bitmap bytes (bucket k is bit ``k % 8`` of byte ``k // 8``)."""
    out = bytearray((nbuckets + 7) // 8)
    for b in buckets:
        if not 0 <= b < nbuckets:
            raise ValueError(f"bucket {b} out of range 0..{nbuckets - 1}")
        out[b >> 3] |= 1 << (b & 7)
    return bytes(out)


def buckets_from_bitmap(bitmap: bytes, nbuckets: int) -> frozenset[int]:
    """Bitmap bytes -> bucket set; bits at or beyond ``nbuckets`` must be clear."""
    if len(bitmap) != (nbuckets + 7) // 8:
        raise ValueError(f"bitmap of {len(bitmap)} bytes for {nbuckets} buckets")
    found = set()
    for i, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            bit = low.bit_length() - 1
            k = i * 8 + bit
            if k >= nbuckets:
                raise ValueError(f"bit {k} set beyond {nbuckets} buckets")
            found.add(k)
            byte ^= low
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class TargetMap:
    """One target bucket -> owner map with its fallback chains, as agreed between members."""

    epoch: int
    proposer: int
    owners: bytes
    """One byte per bucket: the target owner's node id (0: none)."""
    successors: tuple[bytes, ...]
    """Per bucket, the ordered fallback chain after the owner (node ids, no repeats)."""
    incarnations: tuple[tuple[int, int], ...] = ()
    """(node id, incarnation) of the members the map was computed for, sorted. A node's
    target buckets are its own only while it runs that incarnation: a restarted node never
    takes its old buckets back as orphans, and a dead incarnation leaves the map."""
    _digest: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.epoch < 1:
            raise ValueError("map epoch must be >= 1")
        if not 0 <= self.proposer <= MAX_NODE_ID:
            raise ValueError("proposer must be a node id")
        if len(self.successors) != len(self.owners):
            raise ValueError("one successor chain per bucket")
        for k, chain in enumerate(self.successors):
            if len(set(chain)) != len(chain) or NO_OWNER in chain:
                raise ValueError(f"bucket {k}: successor chain has repeats or 0")
        if list(self.incarnations) != sorted(set(self.incarnations)) or len(
                {n for n, _ in self.incarnations}) != len(self.incarnations):
            raise ValueError("incarnations must be sorted, one per node")
        object.__setattr__(self, "_digest", self._compute_digest())

    @property
    def nbuckets(self) -> int:
        return len(self.owners)

    @property
    def rank(self) -> tuple[int, int]:
        """Higher wins: highest epoch, then lowest proposer id."""
        return (self.epoch, -self.proposer)

    @property
    def digest(self) -> bytes:
        """16 bytes over the content (epoch, owners, chains, incarnations), not the proposer."""
        return self._digest

    def _compute_digest(self) -> bytes:
        h = hashlib.sha256(b"lbsync-map-v1")
        h.update(self.epoch.to_bytes(8, "big"))
        h.update(self.owners)
        for chain in self.successors:
            h.update(len(chain).to_bytes(1, "big"))
            h.update(chain)
        for n, inc in self.incarnations:
            h.update(n.to_bytes(1, "big") + inc.to_bytes(8, "big"))
        return h.digest()[:16]

    def incarnation_of(self, node_id: int) -> int:
        """The incarnation the map was computed for (0: unrecorded, any incarnation)."""
        for n, inc in self.incarnations:
            if n == node_id:
                return inc
        return 0

    def with_incarnations(self, incarnations: Iterable[tuple[int, int]]) -> TargetMap:
        return TargetMap(epoch=self.epoch, proposer=self.proposer, owners=self.owners,
                         successors=self.successors,
                         incarnations=tuple(sorted(set(incarnations))))

    def owner(self, bucket: int) -> int:
        return self.owners[bucket]

    def chain(self, bucket: int) -> tuple[int, ...]:
        """Owner first, then successors (0 owner left out)."""
        head = (self.owners[bucket],) if self.owners[bucket] != NO_OWNER else ()
        return head + tuple(self.successors[bucket])

    def buckets_of(self, node_id: int) -> frozenset[int]:
        return frozenset(k for k, o in enumerate(self.owners) if o == node_id)

    def without(self, dead: Iterable[int], *, proposer: int) -> TargetMap:
        """The takeover map: dead nodes' buckets to their first non-dead chain member.

        Dead nodes leave every chain (and the incarnation list). A bucket whose chain holds
        only dead nodes gets no owner. The epoch is this map's plus one.
        """
        gone = set(dead)
        owners = bytearray()
        chains: list[bytes] = []
        for k in range(self.nbuckets):
            alive = [n for n in self.chain(k) if n not in gone]
            owners.append(alive[0] if alive else NO_OWNER)
            chains.append(bytes(alive[1:]))
        return TargetMap(epoch=self.epoch + 1, proposer=proposer, owners=bytes(owners),
                         successors=tuple(chains),
                         incarnations=tuple(x for x in self.incarnations if x[0] not in gone))

    @classmethod
    def build(cls, *, epoch: int, proposer: int, owners: Iterable[int],
              successors: Iterable[Iterable[int]],
              incarnations: Iterable[tuple[int, int]] = ()) -> TargetMap:
        return cls(epoch=epoch, proposer=proposer, owners=bytes(owners),
                   successors=tuple(bytes(c) for c in successors),
                   incarnations=tuple(sorted(set(incarnations))))

    @classmethod
    def from_owner_map(cls, om: Any, *, proposer: int, depth: int = 3) -> TargetMap:
        """From a ``hashing.ownermap.OwnerMap``: owners, epoch, and each bucket's chain of
        successors up to ``depth`` deep, following ``successor_map`` (the map after the owner
        fails, then after that map's owner fails...), so the chain is the sequence of owners
        ``hashing`` itself would give the bucket as its owners fail one after the other."""
        owners = [int(o) for o in om.owners]
        cache: dict[tuple[int, ...], Any] = {(): om}

        def after(dead: tuple[int, ...]) -> Any:
            if dead not in cache:
                cache[dead] = after(dead[:-1]).successor_map(dead[-1])
            return cache[dead]

        chains: list[list[int]] = []
        for k, o in enumerate(owners):
            chain: list[int] = []
            dead: tuple[int, ...] = (o,) if o != NO_OWNER else ()
            while dead and len(chain) < depth:
                nxt = int(after(dead).owners[k])
                if nxt == NO_OWNER or nxt in dead:
                    break
                chain.append(nxt)
                dead = (*dead, nxt)
            chains.append(chain)
        return cls.build(epoch=int(om.epoch), proposer=proposer, owners=owners,
                         successors=chains)
