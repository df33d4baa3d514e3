"""The bucket -> owner map: balanced, minimal-moving, failure-ready, explainable (version 1).

Every node computes the map itself; two nodes compute the same map from the same inputs. This
module is the specification (docs/hashing.md restates it for other implementations). Rules:

* **Inputs.** A :class:`View` (members: node id, weight, drained flag), the bucket count ``B``
  and the previous map (``None`` for a new cluster). Only the previous map's owners, epoch and
  digest are used. Nothing depends on ``hash()``, dict or set iteration order, the clock or
  randomness: every order below is an explicit sort on integers.
* **Eligible members** are the view's members that are not drained. Only they own buckets.
* **Apportionment** (largest remainder, Hamilton): with ``W`` the eligible weights' sum, member
  ``i`` gets ``floor(B * w_i / W)``; the ``R = B - sum(floors)`` remaining buckets go one each
  to the members ranked first by (remainder ``B * w_i mod W`` descending, "holds more than
  its floor in the previous map" first, node id ascending). Remainders are compared as
  integers (exact). The second key breaks exact ties in favour of members that already hold
  the extra bucket, so a tie never forces a move, and recomputing a map for the same view
  reproduces it (a plain "holds more" key would not: a big member at its floor would win the
  tie from a small member holding its floor + 1, and a bucket would move for nothing).
* **Map.** A member keeps its lowest-numbered previous buckets up to its apportionment and
  releases the rest (its highest-numbered ones). Free buckets (released ones, and those whose
  previous owner is not eligible: gone, drained, or none) are sorted ascending and handed out
  in that order to the members below their apportionment, by ascending node id, each taking
  as many consecutive free buckets as it lacks. Nothing else moves. So the number of moved
  buckets is (buckets whose owner is not eligible) + sum of (held - apportioned) over members
  above their apportionment: the least any balanced map can move (see docs/hashing.md).
* **Successor** of a bucket: its owner in ``assign(view without its owner, B, map)``.
  :meth:`OwnerMap.successors` computes all of them in O(B log B), without N full assignments.
* **Agreement.** Each map carries ``epoch`` (previous + 1, or 1) and ``prev_hash`` (the previous
  map's digest, or 32 zero bytes); :meth:`OwnerMap.digest` is SHA-256 over :meth:`OwnerMap.encode`,
  a canonical big-endian encoding of version, B, epoch, prev_hash, view and owners. Two nodes
  holding maps with equal digests hold the same map and the same history link.

Pure and dependency-free (standard library only).
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "ALGORITHM_VERSION",
    "NO_OWNER",
    "ZERO_HASH",
    "Member",
    "Move",
    "OwnerMap",
    "OwnerMapError",
    "View",
    "apportion",
    "assign",
    "explain",
    "plan",
]

ALGORITHM_VERSION: Final = 1
NO_OWNER: Final = 0
"""Owner of a bucket when no member is eligible (every member drained, or an empty view)."""
ZERO_HASH: Final = bytes(32)
"""``prev_hash`` of the first map of a cluster."""
MAX_NODE_ID: Final = 0xFFFF
MAX_WEIGHT: Final = 1_000_000
MAX_BUCKETS: Final = 65536

_MAGIC: Final = b"LBOM"
_HEADER: Final = struct.Struct(">4sHHIQ32sI")   # magic, version, flags 0, B, epoch, prev, n
_MEMBER: Final = struct.Struct(">HIB")          # node id, weight, flags (bit 0: drained)


class OwnerMapError(ValueError):
    """An invalid view, map, encoding or argument (the caller's mistake or a peer's garbage)."""


@dataclass(frozen=True, slots=True)
class Member:
    """One node as the map sees it: id (1..65535), weight (1..10**6), drained flag."""

    node_id: int
    weight: int = 1
    drained: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.node_id, bool) or not isinstance(self.node_id, int) or \
                not 1 <= self.node_id <= MAX_NODE_ID:
            raise OwnerMapError(f"node_id must be 1..{MAX_NODE_ID}, not {self.node_id!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or \
                not 1 <= self.weight <= MAX_WEIGHT:
            raise OwnerMapError(f"weight must be 1..{MAX_WEIGHT}, not {self.weight!r}")
        if not isinstance(self.drained, bool):
            raise OwnerMapError(f"drained must be a bool, not {self.drained!r}")


@dataclass(frozen=True, slots=True)
class View:
    """A membership view: members sorted by node id (the constructor sorts), ids unique."""

    members: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        members = tuple(sorted(self.members, key=lambda m: m.node_id))
        for a, b in itertools.pairwise(members):
            if a.node_id == b.node_id:
                raise OwnerMapError(f"node {a.node_id} appears twice in the view")
        object.__setattr__(self, "members", members)

    @classmethod
    def of(cls, members: Iterable[Member]) -> View:
        return cls(tuple(members))

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(m.node_id for m in self.members)

    @property
    def eligible(self) -> tuple[Member, ...]:
        """Members that may own buckets (not drained), by node id."""
        return tuple(m for m in self.members if not m.drained)

    def member(self, node_id: int) -> Member:
        for m in self.members:
            if m.node_id == node_id:
                return m
        raise KeyError(node_id)

    def without(self, node_id: int) -> View:
        """The view after ``node_id`` leaves (or dies); unchanged if it is not a member."""
        return View(tuple(m for m in self.members if m.node_id != node_id))

    def with_member(self, member: Member) -> View:
        """The view with ``member`` added, or replacing the member with the same id."""
        return View((*(m for m in self.members if m.node_id != member.node_id), member))


def _check_buckets(buckets: int) -> None:
    if isinstance(buckets, bool) or not isinstance(buckets, int) or \
            not 1 <= buckets <= MAX_BUCKETS:
        raise OwnerMapError(f"buckets must be 1..{MAX_BUCKETS}, not {buckets!r}")


def apportion(view: View, buckets: int, held: Mapping[int, int] | None = None) -> dict[int, int]:
    """Largest-remainder apportionment of ``buckets`` over the view's eligible members.

    ``held`` maps node id -> buckets it holds in the previous map; ties between equal
    remainders go first to members holding more than their floor (they would otherwise have to
    give a bucket away), then to the lower id. Returns node id -> target for every member of
    the view (0 for drained ones), keyed in ascending id order.
    """
    _check_buckets(buckets)
    held = held or {}
    eligible = view.eligible
    targets = {m.node_id: 0 for m in view.members}
    if not eligible:
        return targets
    total = sum(m.weight for m in eligible)
    remainders: list[tuple[int, int, int]] = []
    for m in eligible:
        q, r = divmod(buckets * m.weight, total)
        targets[m.node_id] = q
        above_floor = held.get(m.node_id, 0) > q
        remainders.append((-r, 0 if above_floor else 1, m.node_id))
    rest = buckets - sum(targets.values())
    remainders.sort()
    for _, _, node_id in remainders[:rest]:
        targets[node_id] += 1
    return targets


def _redistribute(owned: Mapping[int, Sequence[int]], orphans: Iterable[int],
                  targets: Mapping[int, int]) -> list[tuple[int, int]]:
    """The moves ``(bucket, new owner)`` that turn ``owned`` into a map meeting ``targets``.

    ``owned``: eligible node id -> its buckets, ascending; ``orphans``: buckets with no
    eligible owner. Members above target release their highest-numbered buckets; all free
    buckets, ascending, fill the members below target in ascending node-id order.
    """
    free = list(orphans)
    for node_id in sorted(owned):
        excess = len(owned[node_id]) - targets[node_id]
        if excess > 0:
            free.extend(owned[node_id][-excess:])
    free.sort()
    moves: list[tuple[int, int]] = []
    i = 0
    for node_id in sorted(owned):
        lack = targets[node_id] - len(owned[node_id])
        if lack > 0:
            moves.extend((b, node_id) for b in free[i:i + lack])
            i += lack
    if i != len(free):  # pragma: no cover - targets always sum to B
        raise AssertionError(f"{len(free) - i} free buckets left after redistribution")
    return moves


def _by_node(owners: Sequence[int], eligible_ids: Iterable[int]) -> tuple[
        dict[int, list[int]], list[int]]:
    owned: dict[int, list[int]] = {n: [] for n in eligible_ids}
    orphans: list[int] = []
    for b, o in enumerate(owners):
        lst = owned.get(o)
        if lst is None:
            orphans.append(b)
        else:
            lst.append(b)
    return owned, orphans


@dataclass(frozen=True, slots=True)
class OwnerMap:
    """Bucket -> owner node id (``NO_OWNER`` = 0 when nobody is eligible). Build with assign.

    ``previous_owners`` (the predecessor's owners, for :meth:`explain`) is not part of the
    map's identity: it is neither compared nor encoded (its digest is ``prev_hash``).
    """

    version: int
    buckets: int
    epoch: int
    prev_hash: bytes
    view: View
    owners: tuple[int, ...]
    previous_owners: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.version != ALGORITHM_VERSION:
            raise OwnerMapError(f"unknown owner map algorithm version {self.version}")
        _check_buckets(self.buckets)
        if not 0 <= self.epoch < 2**64:
            raise OwnerMapError(f"epoch must be a u64, not {self.epoch}")
        if len(self.prev_hash) != 32:
            raise OwnerMapError("prev_hash must be 32 bytes")
        if len(self.owners) != self.buckets:
            raise OwnerMapError(f"{len(self.owners)} owners for {self.buckets} buckets")
        allowed = {m.node_id for m in self.view.eligible}
        if not allowed:
            allowed = {NO_OWNER}
        bad = set(self.owners) - allowed
        if bad:
            raise OwnerMapError(f"owners {sorted(bad)} are not eligible members of the view")
        if self.previous_owners is not None and len(self.previous_owners) != self.buckets:
            raise OwnerMapError("previous_owners has the wrong length")

    # -- queries ---------------------------------------------------------------------------

    def owner(self, bucket: int) -> int:
        return self.owners[bucket]

    def buckets_of(self, node_id: int) -> tuple[int, ...]:
        return tuple(b for b, o in enumerate(self.owners) if o == node_id)

    def counts(self) -> dict[int, int]:
        """Node id -> buckets owned, for every member of the view (ascending id)."""
        counts = {m.node_id: 0 for m in self.view.members}
        for o in self.owners:
            if o != NO_OWNER:
                counts[o] += 1
        return counts

    # -- failure readiness -----------------------------------------------------------------

    def successors(self) -> tuple[int, ...]:
        """For each bucket, the owner it gets if its current owner dies.

        Equals ``assign(self.view.without(owner), self.buckets, self).owners[bucket]``
        (``NO_OWNER`` when no other member is eligible, or the bucket has no owner).
        """
        owned, _ = _by_node(self.owners, (m.node_id for m in self.view.eligible))
        held = {n: len(bs) for n, bs in owned.items()}
        succ = [NO_OWNER] * self.buckets
        for dead, dead_buckets in owned.items():
            if not dead_buckets:
                continue
            rest_view = self.view.without(dead)
            if not rest_view.eligible:
                continue
            targets = apportion(rest_view, self.buckets, held)
            rest = {n: bs for n, bs in owned.items() if n != dead}
            for b, n in _redistribute(rest, dead_buckets, targets):
                if self.owners[b] == dead:
                    succ[b] = n
        return tuple(succ)

    def successor_map(self, dead: int) -> OwnerMap:
        """The map after ``dead`` fails: ``assign(view without dead, B, self)``."""
        return assign(self.view.without(dead), self.buckets, self)

    # -- identity --------------------------------------------------------------------------

    def encode(self) -> bytes:
        """Canonical bytes (big-endian): header, members by id, one u16 owner per bucket."""
        parts = [_HEADER.pack(_MAGIC, self.version, 0, self.buckets, self.epoch,
                              self.prev_hash, len(self.view.members))]
        parts += [_MEMBER.pack(m.node_id, m.weight, int(m.drained)) for m in self.view.members]
        parts.append(struct.pack(f">{self.buckets}H", *self.owners))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> OwnerMap:
        """Parse :meth:`encode`'s bytes; any malformation raises :class:`OwnerMapError`."""
        if len(data) < _HEADER.size:
            raise OwnerMapError("owner map encoding too short")
        magic, version, flags, buckets, epoch, prev, n = _HEADER.unpack_from(data)
        if magic != _MAGIC or flags != 0:
            raise OwnerMapError("not an owner map encoding")
        if version != ALGORITHM_VERSION:
            raise OwnerMapError(f"unknown owner map algorithm version {version}")
        _check_buckets(buckets)
        if n > MAX_NODE_ID:
            raise OwnerMapError(f"too many members ({n})")
        size = _HEADER.size + n * _MEMBER.size + 2 * buckets
        if len(data) != size:
            raise OwnerMapError(f"owner map encoding has {len(data)} bytes, expected {size}")
        off = _HEADER.size
        members = []
        for _ in range(n):
            node_id, weight, mflags = _MEMBER.unpack_from(data, off)
            if mflags & ~1:
                raise OwnerMapError(f"unknown member flags {mflags:#x}")
            members.append(Member(node_id, weight, bool(mflags & 1)))
            off += _MEMBER.size
        view = View(tuple(members))
        if view.members != tuple(members):
            raise OwnerMapError("members not in ascending id order")
        owners = struct.unpack_from(f">{buckets}H", data, off)
        return cls(version, buckets, epoch, prev, view, owners)

    @property
    def digest(self) -> bytes:
        """SHA-256 of :meth:`encode`: equal digests mean the same map and predecessor."""
        return hashlib.sha256(self.encode()).digest()

    def explain(self, bucket: int) -> str:
        return explain(self, bucket)


def assign(view: View, buckets: int, previous: OwnerMap | None) -> OwnerMap:
    """The owner map for ``view`` and ``buckets``, moving as few buckets from ``previous``.

    Pure and deterministic (see the module rules). ``previous`` must have the same bucket
    count (B never changes at run time); it may come from an older view or be ``None``.
    """
    _check_buckets(buckets)
    if previous is not None and previous.buckets != buckets:
        raise OwnerMapError(f"previous map has {previous.buckets} buckets, not {buckets}")
    prev_owners = previous.owners if previous is not None else (NO_OWNER,) * buckets
    eligible = view.eligible
    if eligible:
        owned, orphans = _by_node(prev_owners, (m.node_id for m in eligible))
        targets = apportion(view, buckets, {n: len(bs) for n, bs in owned.items()})
        owners = list(prev_owners)
        for b, n in _redistribute(owned, orphans, targets):
            owners[b] = n
        new_owners = tuple(owners)
    else:
        new_owners = (NO_OWNER,) * buckets
    return OwnerMap(
        version=ALGORITHM_VERSION,
        buckets=buckets,
        epoch=previous.epoch + 1 if previous is not None else 1,
        prev_hash=previous.digest if previous is not None else ZERO_HASH,
        view=view,
        owners=new_owners,
        previous_owners=prev_owners,
    )


# ------------------------------------------------------------------------------------------
# Explanation


def _held(owners: Sequence[int]) -> dict[int, int]:
    held: dict[int, int] = {}
    for o in owners:
        held[o] = held.get(o, 0) + 1
    return held


def explain(owner_map: OwnerMap, bucket: int) -> str:
    """Why ``bucket``'s owner owns it, in a few lines a human can check by hand."""
    if not 0 <= bucket < owner_map.buckets:
        raise OwnerMapError(f"bucket must be 0..{owner_map.buckets - 1}, not {bucket}")
    m = owner_map
    owner = m.owners[bucket]
    head = f"bucket {bucket} of {m.buckets}: owner {owner} in map epoch {m.epoch}"
    eligible = m.view.eligible
    if owner == NO_OWNER:
        return f"{head} (no owner: no member of the view is eligible, all drained or none)"
    total = sum(e.weight for e in eligible)
    me = m.view.member(owner)
    prev = m.previous_owners
    held = _held(prev) if prev is not None else {}
    targets = apportion(m.view, m.buckets, held)
    q, r = divmod(m.buckets * me.weight, total)
    share = (f"node {owner} has weight {me.weight} of {total} (eligible: "
             f"{', '.join(str(e.node_id) for e in eligible)}), quota {m.buckets}*{me.weight}/"
             f"{total} = {q} + {r}/{total}; largest remainder gives it {targets[owner]}")
    lines = [head, share]
    if prev is None:
        lines.append("origin: unknown (this map was decoded without its predecessor)")
    else:
        before = prev[bucket]
        if before == owner:
            lines.append(f"origin: kept; node {owner} held it in epoch {m.epoch - 1} and keeps "
                         f"its lowest-numbered {min(held.get(owner, 0), targets[owner])} of "
                         f"{held.get(owner, 0)} buckets")
        else:
            if before == NO_OWNER:
                why = "it had no owner (new cluster)"
            elif before not in m.view.node_ids:
                why = f"node {before} left the view"
            elif m.view.member(before).drained:
                why = f"node {before} is drained"
            else:
                why = (f"node {before} held {held.get(before, 0)}, above its "
                       f"{targets[before]}, and released its highest-numbered buckets")
            lines.append(f"origin: moved from {before} in this epoch because {why}; free "
                         f"buckets go in ascending order to members below their share, by "
                         f"ascending node id, and node {owner} lacked "
                         f"{targets[owner] - min(held.get(owner, 0), targets[owner])}")
    succ = m.successors()[bucket]
    lines.append(f"successor: node {succ} if node {owner} fails" if succ != NO_OWNER
                 else "successor: none (no other eligible member)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Rebalance plan


@dataclass(frozen=True, slots=True)
class Move:
    """One planned handoff of ``bucket`` from ``from_node`` to ``to_node`` (0 = nobody)."""

    bucket: int
    from_node: int
    to_node: int


def plan(old: OwnerMap, new: OwnerMap, max_batch: int) -> tuple[tuple[Move, ...], ...]:
    """The moves from ``old`` to ``new`` in batches of at most ``max_batch``.

    After every batch no node holds more than ``max(old count, new count) + 1`` buckets.
    Greedy and deterministic: each batch takes pending moves in ascending bucket order whose
    receiver stays within its bound. It always makes progress: if every pending move were
    blocked, every receiver would hold more than its final count, yet counts sum to B, so some
    node below its final count must still be waiting for a bucket, and it is not blocked.
    """
    if old.buckets != new.buckets:
        raise OwnerMapError("maps with different bucket counts")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise OwnerMapError(f"max_batch must be >= 1, not {max_batch!r}")
    pending = [Move(b, o, n) for b, (o, n) in enumerate(zip(old.owners, new.owners, strict=True))
               if o != n]
    held = _held(old.owners)
    final = _held(new.owners)
    bound = {n: max(held.get(n, 0), final.get(n, 0)) + 1 for n in held.keys() | final.keys()}
    batches: list[tuple[Move, ...]] = []
    while pending:
        batch: list[Move] = []
        waiting: list[Move] = []
        for mv in pending:
            if len(batch) < max_batch and (
                    mv.to_node == NO_OWNER or held.get(mv.to_node, 0) < bound[mv.to_node]):
                batch.append(mv)
                held[mv.to_node] = held.get(mv.to_node, 0) + 1
                held[mv.from_node] -= 1
            else:
                waiting.append(mv)
        if not batch:  # pragma: no cover - impossible, see the docstring
            raise AssertionError("rebalance plan made no progress")
        batches.append(tuple(batch))
        pending = waiting
    return tuple(batches)
