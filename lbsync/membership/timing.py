"""Failure-detection timing: heartbeat interval, fence and dead thresholds per profile.

    T_hb    heartbeat interval; each interval is drawn uniformly from [(1 - jitter) T_hb, T_hb]
            with the injected ``random.Random``, so nodes never phase-lock and never send late.
    T_dead  = T_hb * miss_count: silence after which a peer may be declared lost.
    T_fence = T_dead - 2 T_hb: a node's forwarding lease. A node forwards only while a strict
            majority of voters has echoed one of its heartbeats sent less than T_fence ago.
            T_fence < T_dead is what makes "fence before the others may claim" hold, measured on
            the fencing node's own send times, so it holds whatever the network delay.
    stall   a gap between two ``handle_timer`` calls longer than T_fence / 2 fences the node
            until fresh heartbeats sent after the stall are echoed by a majority.

Profiles (ms):    T_hb  miss  T_dead  T_fence  echo round trip the lease tolerates
    default        40     7     280      200    200 - 2*40 = 120 ms of extra delay
    fast           20     7     140      100    100 - 2*20 =  60 ms of extra delay
    custom (default values of the config) 50 x 6: 300 / 200.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lbsync.config import MembershipConfig

Profile = Literal["default", "fast", "custom"]

PROFILES: dict[str, tuple[float, int]] = {
    "default": (40.0, 7),
    "fast": (20.0, 7),
}

JITTER = 0.1
MIN_MISS_COUNT = 5


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds, derived from a profile (see the module docstring)."""

    heartbeat: float
    miss_count: int
    jitter: float = JITTER

    def __post_init__(self) -> None:
        if self.heartbeat <= 0:
            raise ValueError("heartbeat interval must be > 0")
        if self.miss_count < MIN_MISS_COUNT:
            raise ValueError(
                f"miss_count must be >= {MIN_MISS_COUNT}: the lease T_fence = T_dead - 2 T_hb must "
                f"cover a heartbeat round trip")
        if not 0 <= self.jitter < 0.5:
            raise ValueError("jitter must be in [0, 0.5)")

    @property
    def dead(self) -> float:
        return self.heartbeat * self.miss_count

    @property
    def fence(self) -> float:
        return self.dead - 2 * self.heartbeat

    @property
    def stall(self) -> float:
        return self.fence / 2

    @property
    def rewrite(self) -> float:
        """T_hb / 2: how far the lease must have advanced past the ``@owned`` timeouts last
        written before the daemon rewrites them (one nf_tables batch of every owned bucket).

        Safety does not depend on it: a written timeout is a lease a majority gave, and
        writing less often only lets the elements expire earlier. Availability does: on a
        loaded node (every timer and delivery late by up to 50 ms in the default profile,
        25 ms in the fast one, which membership tolerates without a fence) the lease runs
        close to its end between echoes, and elements written too long ago expire while the
        node is still backed: its buckets stop forwarding until the next echo. In the sim
        (3 nodes, 2 % loss, 3 x 10 s at those loads; tests/sim/test_membership_failures.py)
        T_fence / 4 left such gaps at 45 (default) and 159 (fast) instants, T_hb (before) at 3
        and 26, T_hb / 2 at none. Each echo advances the lease by about one heartbeat interval,
        so this rewrites at about every echo that advances it (~26 batches a second at idle
        in the default profile, T_hb: ~13); the batch is cheap (one NEWSETELEM of cached
        attributes where the kernel updates timeouts: ~25 us)."""
        return self.heartbeat / 2

    @classmethod
    def from_profile(cls, profile: str, heartbeat_ms: float = 50.0, miss_count: int = 6
                     ) -> Timing:
        if profile == "custom":
            return cls(heartbeat=heartbeat_ms / 1000.0, miss_count=miss_count)
        try:
            hb, miss = PROFILES[profile]
        except KeyError:
            raise ValueError(f"unknown membership profile {profile!r}") from None
        return cls(heartbeat=hb / 1000.0, miss_count=miss)

    @classmethod
    def from_config(cls, cfg: MembershipConfig) -> Timing:
        """From the ``[membership]`` section (profile, heartbeat_ms, miss_count)."""
        return cls.from_profile(cfg.profile, cfg.heartbeat_ms, cfg.miss_count)
