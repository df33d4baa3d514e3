"""Protocol parameters: the configured bounds plus the protocol's internal timings.

:func:`ProtocolParams.from_config` derives them from the cluster file's ``[replication]``
table; the timings that are not configuration (NACK delays, resync pacing) have defaults
chosen for a LAN replication link (one-way delay well under 1 ms).
"""

from __future__ import annotations

from dataclasses import dataclass

from lbsync.config import ReplicationConfig


@dataclass(frozen=True, slots=True)
class ProtocolParams:
    """Everything the sender and receiver cores need to know; times in seconds."""

    buckets: int
    max_datagram: int = 1400
    flush_delay: float = 0.002
    history_datagrams: int = 8192
    history_bytes: int = 16 * 1024 * 1024
    reorder_datagrams: int = 4096
    idle: float = 0.05
    idle_max: float = 1.0
    # A receiver waits uniform(0, nack_delay) before its first NACK for a gap, so that one
    # receiver's NACK, heard by the others, suppresses theirs: it must exceed the one-way delay.
    nack_delay: float = 0.015
    # At most one NACK datagram per interval per node: under heavy loss one NACK carries many
    # gaps (repair overhead), at the price of up to this much repair latency.
    nack_interval: float = 0.040
    nack_retry: float = 0.030
    nack_retry_max: float = 0.120
    # The sender answers a given sequence number at most once per hold-off: the duplicate NACKs
    # of receivers that did not hear each other cost no extra retransmission.
    retransmit_holdoff: float = 0.020
    # A NACK naming n datagrams of a repair block is answered with n parities (at least as
    # many as receivers lately missed of a block) plus max(parity_min_extra,
    # ceil(n * parity_extra)) more, since each parity is lost like any datagram, and
    # ``parity_insurance`` more, unasked, ``parity_insurance_delay`` after each burst. Since
    # the later rounds ride on heartbeats (no NACK datagram), a receiver left short asks again
    # cheaply: less redundancy (0.375 before) and no insurance parity (1 before) lower the
    # repair overhead at 20 % loss by ~0.1 (docs/benchmarks.md).
    parity_extra: float = 0.25
    parity_min_extra: int = 1
    parity_insurance: int = 0
    parity_insurance_delay: float = 0.010
    # A gap in a repair block not yet sent in full is asked for this late at the latest (the
    # rest of the block usually arrives first, and one NACK then covers the whole block).
    nack_block_wait: float = 0.040
    # Hearing another receiver's NACK (or a parity) for a block, wait this long, plus the
    # need-ordered delay, for its burst before asking ourselves.
    repair_wait: float = 0.003
    # Explicit NACK datagrams a receiver sends per repair block, at most, and only while it has
    # heard no other request (NACK, repair state, parity) for the block; later rounds ride on
    # the CONTROL datagrams the node sends anyway (heartbeats, tail probes) as a
    # ``RepairState``, at most once per ``repair_quiet`` per gap. Only when no such datagram
    # left for ``nack_fallback`` (a node without heartbeats) does a NACK datagram ask again.
    nack_explicit: int = 1
    # Only this many receivers of a stream, chosen per repair block by a rank every node
    # computes alike, send that block's explicit NACKs (0: all): a bound on the NACK
    # datagrams naming one gap that does not hang on hearing each other in time.
    nack_designated: int = 2
    nack_fallback: float = 0.150
    # A gap just asked for (by us or by a receiver we heard) is not named again in a repair
    # state for this long: the sender's hold-off, so that the request can bring a new burst.
    repair_quiet: float = 0.020
    resync_rate: float = 200_000.0  # records per second, at most, in resync answers
    resync_burst: int = 512
    resync_timeout: float = 1.0
    resync_timeout_max: float = 4.0
    silent_after: float = 3.0
    control_window: int = 1024
    gone_memory: int = 32768  # evicted datagrams whose buckets are remembered (for Gone)
    max_key: int = 255
    auto_repair: bool = True  # a digest mismatch requests a resync of that bucket

    def parity_burst(self, n: int) -> int:
        """Parities answering a NACK that names ``n`` datagrams of a repair block."""
        return n + max(self.parity_min_extra, int(n * self.parity_extra + 0.999))

    @classmethod
    def from_config(cls, cfg: ReplicationConfig, buckets: int) -> ProtocolParams:
        return cls(
            buckets=buckets,
            max_datagram=cfg.max_datagram,
            flush_delay=cfg.flush_delay_ms / 1000.0,
            history_datagrams=cfg.history_datagrams,
            history_bytes=cfg.history_bytes,
            reorder_datagrams=cfg.reorder_datagrams,
            idle=cfg.idle_ms / 1000.0,
            idle_max=cfg.idle_max_ms / 1000.0,
            silent_after=3 * cfg.idle_max_ms / 1000.0,
        )
