"""keepalived as lbsync's second, independent failure signal: the keepalived.conf renderers and
the sans-IO interpreter of keepalived's notify lines.

The VRRP plan (docs/keepalived.md explains it in full):

- One VRRP instance per node of the cluster, named ``lbsync-<node id>``, with virtual router id
  = node id, on the management interface: a failure domain separate from the shared-MAC
  segments (outside/inside) and from the replication link.
- Node X is the highest-priority router (:data:`OWN_PRIORITY`) of its own instance; every other
  node backs it up with a distinct priority, in cyclic successor order (X+1, X+2, ... wrapping),
  spaced :data:`PRIORITY_STEP` apart so that the backups' VRRP skew times differ by tens of
  milliseconds at ``advert_int 0.1``: when X dies exactly one survivor (X's first live
  successor) becomes MASTER of ``lbsync-X``.
- Only a node's own instance tracks its outside and inside links (``track_interface``): a node
  whose own link fails goes FAULT in its own instance (and stops advertising it), which means
  "hand my buckets off"; the instances it backs up are unaffected.
- Adverts are unicast to the peers' management addresses (VRRPv3, which accepts sub-second
  ``advert_int``): the peers come from the cluster file, no multicast or IGMP snooping is needed
  on the management network, adverts reach only cluster members and VRIDs cannot collide with
  other VRRP speakers' multicast on the same segment.
- keepalived 2.2.7 insists on at least one virtual address per instance ("No VIP specified").
  Each instance carries a *token* address, ``169.254.77.<X>/32`` on ``lo`` with scope host
  (:data:`TOKEN_NETWORK`; with IPv6 management addresses ``fd6c:6273:796e:6b61::<X>/128`` from
  :data:`TOKEN_NETWORK6`, since keepalived wants the instance's family): it never appears on a
  wire, and ``ip addr show dev lo`` shows which instances a node is MASTER of.
- State changes reach lbsync through keepalived's ``vrrp_notify_fifo`` (one line per change,
  no process per event): ``INSTANCE "lbsync-2" MASTER 250``; ``lbsync notify`` carries the same
  information for notify scripts.

Interpreter rules (:class:`VrrpInterpreter`, for node ``self_id``; every transition below is
relative to the last state the interpreter saw for that instance):

- peer instance ``lbsync-X`` (X != self) enters MASTER: this node now stands in for X, i.e. X
  stopped advertising (dead, its keepalived dead, or its own instance FAULT) ->
  :class:`VrrpPeerDeclaredDead` (X). It repeats if this node loses the position to its own
  FAULT/STOP and takes it again: consumers treat it as idempotent.
- peer instance ``lbsync-X`` goes from MASTER to BACKUP: X preempted its instance back ->
  :class:`VrrpPeerReturned` (X). From MASTER to FAULT/STOP: this node lost the position for its
  own reasons; no event (X did not return).
- own instance enters FAULT -> :class:`VrrpOwnLinkFailed`; own instance leaves FAULT for MASTER
  or BACKUP -> :class:`VrrpOwnLinkRecovered` (the FAULT memory survives a keepalived restart).
- own instance STOP (keepalived stopping) or the FIFO closed by its last writer -> one
  :class:`VrrpSignalLost` (repeated only after a new line arrives): peers will take this node's
  instance within about three advert intervals.
- Every INSTANCE line for a known instance also yields :class:`VrrpInstanceChanged` first.
  ``MASTER_RX_LOWER_PRI`` (a master heard a lower priority) changes no state; ``DELETED`` (the
  instance vanished in a reload) counts as STOP.
- GROUP lines are counted and ignored (lbsync renders no sync groups); names that are not
  ``lbsync-<a node of the cluster>`` are counted and ignored; lines that do not parse are counted
  and ignored, never raised. :meth:`VrrpInterpreter.notify` (the control-socket path) raises
  :class:`NotifyError` on a bad state, since its caller can be told.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lbsync.config import ClusterConfig

INSTANCE_PREFIX = "lbsync-"
OWN_PRIORITY = 254          # 255 is reserved for an address owner
FIRST_BACKUP_PRIORITY = 250
PRIORITY_STEP = 50          # skew difference at advert_int 0.1: 50 * 0.1 / 256 = 19.5 ms
MIN_PRIORITY = 1
TOKEN_NETWORK = "169.254.77.0/24"
TOKEN_NETWORK6 = "fd6c:6273:796e:6b61::/64"  # a ULA: "lbsynka"
TOKEN_DEVICE = "lo"
DEFAULT_ADVERT_INT = 0.1

INCUMBENT_VRID_OUTSIDE = 101
INCUMBENT_VRID_INSIDE = 102
INCUMBENT_GROUP = "incumbent"

MAX_NOTIFY_LINE = 512

STATES: frozenset[str] = frozenset(
    {"MASTER", "BACKUP", "FAULT", "STOP", "DELETED", "MASTER_RX_LOWER_PRI"})

_INSTANCE_RE = re.compile(r"^lbsync-([0-9]{1,3})$")
_LINE_RE = re.compile(r'^(INSTANCE|GROUP) "([^"\x00-\x1f]{1,128})" ([A-Z_]{1,32}) (-?[0-9]{1,3})$')


# --------------------------------------------------------------------------------------------
# Naming and the priority plan


def instance_name(node_id: int) -> str:
    """``lbsync-<node id>``: the VRRP instance node ``node_id`` is MASTER of."""
    return f"{INSTANCE_PREFIX}{node_id}"


def instance_owner(name: str) -> int | None:
    """The node id an instance name stands for, or None if it is not ``lbsync-<1..255>``."""
    m = _INSTANCE_RE.match(name)
    if m is None:
        return None
    node_id = int(m.group(1))
    if not 1 <= node_id <= 255 or m.group(1) != str(node_id):
        return None
    return node_id


def successors(node_ids: Iterable[int], owner: int) -> tuple[int, ...]:
    """The other nodes in cyclic order after ``owner`` (ids ascending, wrapping)."""
    ids = sorted(set(node_ids))
    if owner not in ids:
        raise ValueError(f"node {owner} is not in the cluster")
    i = ids.index(owner)
    return tuple(ids[i + 1:] + ids[:i])


def priority_plan(node_ids: Iterable[int], owner: int) -> dict[int, int]:
    """Priority of every node in instance ``lbsync-<owner>``.

    The owner gets :data:`OWN_PRIORITY`; its k-th successor (k = 0, 1, ...) gets
    ``FIRST_BACKUP_PRIORITY - k * step``, the step as wide as the range allows (at most
    :data:`PRIORITY_STEP`, at least 1): distinct priorities, so distinct skew times, so one
    survivor. Raises ValueError if the cluster has too many nodes for distinct priorities.
    """
    backups = successors(node_ids, owner)
    span = FIRST_BACKUP_PRIORITY - MIN_PRIORITY
    if len(backups) > span + 1:
        raise ValueError(f"{len(backups) + 1} nodes: VRRP priorities cannot all be distinct")
    step = PRIORITY_STEP if len(backups) <= 1 else min(PRIORITY_STEP, span // (len(backups) - 1))
    plan = {owner: OWN_PRIORITY}
    for k, node_id in enumerate(backups):
        plan[node_id] = FIRST_BACKUP_PRIORITY - k * step
    return plan


def token_address(node_id: int, network: str = TOKEN_NETWORK) -> str:
    """The token virtual address of instance ``lbsync-<node_id>`` (``/32`` or ``/128``)."""
    net = ipaddress.ip_network(network)
    if not 0 < node_id < net.num_addresses:
        raise ValueError(f"token network {network} has no host {node_id}")
    return f"{net.network_address + node_id}/{net.max_prefixlen}"


def _advert(advert_int: float) -> str:
    # keepalived keeps centiseconds; VRRPv3 carries them (VRRPv2 only whole seconds).
    if not 0.01 <= advert_int <= 40.95:
        raise ValueError(f"advert_int must be 0.01..40.95 s, not {advert_int}")
    centis = round(advert_int * 100)
    if abs(centis - advert_int * 100) > 1e-6:
        raise ValueError(f"advert_int must be a multiple of 0.01 s, not {advert_int}")
    return f"{centis // 100}" if centis % 100 == 0 else f"{centis / 100:g}"


def _quoted(text: str) -> str:
    if '"' in text or "\n" in text:
        raise ValueError(f"cannot quote {text!r} for keepalived.conf")
    return f'"{text}"'


def keepalived_argv(conf_path: str, run_dir: str, *, binary: str = "keepalived") -> list[str]:
    """The command line that runs one keepalived instance in the foreground (VRRP only) with its
    own pid files under ``run_dir``, so that several run on one host (the lab, the tests)."""
    d = Path(run_dir)
    return [binary, "--dont-fork", "--vrrp", "--log-console", "--log-detail",
            "--use-file", conf_path,
            "--pid", str(d / "keepalived.pid"),
            "--vrrp_pid", str(d / "keepalived-vrrp.pid"),
            "--checkers_pid", str(d / "keepalived-checkers.pid")]


def default_fifo_path(cfg: ClusterConfig, node_id: int) -> str:
    """``keepalived.fifo`` from the config, else ``/run/lbsync/<cluster>-<node>.vrrp.fifo``."""
    return str(cfg.vrrp_fifo(node_id))


# --------------------------------------------------------------------------------------------
# lbsync's keepalived.conf


def render_keepalived_conf(cfg: ClusterConfig, node_id: int, *,
                           advert_int: float = DEFAULT_ADVERT_INT, fifo_path: str,
                           run_dir: str, token_network: str | None = None,
                           notify_command: str | None = None) -> str:
    """keepalived.conf for node ``node_id``: one instance per node of the cluster (see the
    module docstring for the plan). Pure: the same arguments give the same text.

    ``notify_command`` (e.g. ``/usr/bin/lbsync notify --node-id 1``) adds it as every
    instance's generic ``notify`` script, besides the FIFO; keepalived appends
    ``INSTANCE <name> <STATE> <priority>``, which ``lbsync notify`` accepts. It runs as root
    with ``enable_script_security``: the program and its directories must not be writable by
    other users."""
    me = cfg.node(node_id)
    if not me.management_address:
        raise ValueError(f"node {node_id} has no management_address")
    ifs = cfg.interfaces
    ids = cfg.node_ids
    src = ipaddress.ip_address(me.management_address)
    peers = [cfg.node(n).management_address for n in ids if n != node_id]
    for p in peers:
        if not p or ipaddress.ip_address(p).version != src.version:
            raise ValueError("every node needs a management_address of the same family")
    if token_network is None:
        token_network = TOKEN_NETWORK if src.version == 4 else TOKEN_NETWORK6
    if ipaddress.ip_network(token_network).version != src.version:
        raise ValueError(f"token network {token_network} is not of the management family")
    scope = " scope host" if src.version == 4 else ""  # keepalived takes no scope for IPv6
    adv = _advert(advert_int)
    argv = " ".join(shlex.quote(a) for a in keepalived_argv("<this file>", run_dir))
    out = [
        f"# keepalived.conf for lbsync cluster {cfg.cluster.name!r}, node {node_id} "
        f"({me.name or '-'}): rendered by `lbsync keepalived-config`; do not edit.",
        "# One VRRP instance per node on the management link; this node is MASTER of",
        f"# {instance_name(node_id)} and backs up the others. State changes go to the FIFO "
        "lbsync reads.",
        f"# Run: {argv}",
        "",
        "global_defs {",
        f"    router_id lbsync-{cfg.cluster.name}-{node_id}",
        f"    vrrp_notify_fifo {_quoted(fifo_path)}",
        "    vrrp_version 3",
        *(["    script_user root", "    enable_script_security"] if notify_command else []),
        "}",
    ]
    for owner in ids:
        plan = priority_plan(ids, owner)
        name = instance_name(owner)
        own = owner == node_id
        role = "this node's own instance" if own else (
            f"backup #{successors(ids, owner).index(node_id) + 1} of node {owner}")
        out += [
            "",
            f"# {name}: {role}",
            f"vrrp_instance {name} {{",
            "    state BACKUP",
            f"    interface {ifs.management}",
            f"    virtual_router_id {owner}",
            f"    priority {plan[node_id]}",
            f"    advert_int {adv}",
            f"    unicast_src_ip {me.management_address}",
            "    unicast_peer {",
            *(f"        {p}" for p in peers),
            "    }",
            "    virtual_ipaddress {",
            f"        {token_address(owner, token_network)} dev {TOKEN_DEVICE}{scope}",
            "    }",
        ]
        if notify_command:
            out.append(f"    notify {_quoted(notify_command)}")
        if own:
            out += [
                "    track_interface {",
                f"        {ifs.outside}",
                f"        {ifs.inside}",
                "    }",
            ]
        out.append("}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# The incumbent: keepalived + conntrackd primary-backup (lab mode `--mode vrrp`)


def render_incumbent_notify_script(*, conntrackd_conf: str, lock_file: str, log_file: str,
                                   conntrackd_bin: str = "conntrackd") -> str:
    """The primary-backup choreography as a shell script taking ``primary|backup|fault``.

    primary: commit the external cache into the kernel (``-c``), flush both caches (``-f``),
    resync the internal cache from the kernel (``-R``), bulk-send it to the backup (``-B``).
    backup: if conntrackd does not answer (``-s``), remove a stale lock and start it (``-d``);
    shorten the kernel timers of entries this node no longer sees (``-t``); ask the new primary
    for a resync (``-n``). fault: shorten the timers (``-t``). Failures are appended to
    ``log_file`` and never stop the sequence (as in conntrack-tools' primary-backup.sh).
    """
    q = shlex.quote
    return "\n".join([
        "#!/bin/sh",
        "# keepalived notify script for the incumbent (conntrackd FTFW primary-backup);",
        "# rendered by lbsync.keepalived.render_incumbent_notify_script; do not edit.",
        f"CTD={q(conntrackd_bin)}",
        f"CONF={q(conntrackd_conf)}",
        f"LOCK={q(lock_file)}",
        f"LOG={q(log_file)}",
        'say() { echo "$(date +%s.%N) $*" >>"$LOG"; }',
        'run() { "$CTD" -C "$CONF" "$@" >/dev/null 2>&1 || say "conntrackd $* failed"; }',
        'say "transition $1"',
        'case "$1" in',
        "  primary)",
        "    run -c",
        "    run -f",
        "    run -R",
        "    run -B",
        "    ;;",
        "  backup)",
        '    if ! "$CTD" -C "$CONF" -s >/dev/null 2>&1; then',
        '      say "conntrackd not answering: removing a stale lock and starting it"',
        '      rm -f "$LOCK"',
        "      run -d",
        "    fi",
        "    run -t",
        "    run -n",
        "    ;;",
        "  fault)",
        "    run -t",
        "    ;;",
        "  *)",
        '    say "unknown transition $1"',
        "    exit 1",
        "    ;;",
        "esac",
        'say "done $1"',
        "exit 0",
        "",
    ])


def render_incumbent_keepalived_conf(cfg: ClusterConfig, node_id: int, *, notify_script: str,
                                     advert_int: float = 1.0, preempt: bool = False,
                                     vrrp_version: Literal[2, 3] | None = None) -> str:
    """keepalived.conf for the incumbent's active-backup setup on node ``node_id``.

    Two instances in one sync group: the outside VIPs on the outside interface
    (VRID :data:`INCUMBENT_VRID_OUTSIDE`) and the inside VIPs on the inside interface
    (VRID :data:`INCUMBENT_VRID_INSIDE`), multicast adverts on those segments as operators run
    it; the group's transitions call ``notify_script primary|backup|fault`` (see
    :func:`render_incumbent_notify_script`). The lowest node id is the preferred primary
    (priority 150, others 100). ``vrrp_version`` defaults to 2 (keepalived's default, what
    operators run) for whole-second intervals and to 3 otherwise (VRRPv2 carries whole seconds
    only).
    IPv6 VIPs go in ``virtual_ipaddress_excluded`` (an instance carries one family in its
    adverts); they move with the instance all the same.
    """
    ids = cfg.node_ids
    if node_id not in ids:
        raise ValueError(f"node {node_id} is not in the cluster")
    prio = 150 if node_id == min(ids) else 100
    adv = _advert(advert_int)
    if vrrp_version is None:
        vrrp_version = 2 if "." not in adv else 3
    if vrrp_version == 2 and "." in adv:
        raise ValueError(f"VRRPv2 carries whole seconds only, not advert_int {adv}")
    ifs = cfg.interfaces
    script = notify_script
    if '"' in script or "'" in script:
        raise ValueError(f"notify script path must not contain quotes: {script!r}")
    out = [
        f"# keepalived.conf for the incumbent (keepalived + conntrackd FTFW primary-backup), "
        f"cluster {cfg.cluster.name!r}, node {node_id}:",
        "# rendered by lbsync.keepalived.render_incumbent_keepalived_conf; do not edit.",
        "",
        "global_defs {",
        f"    router_id incumbent-{cfg.cluster.name}-{node_id}",
        f"    vrrp_version {vrrp_version}",
        "    script_user root",
        "    enable_script_security",
        "}",
        "",
        f"vrrp_sync_group {INCUMBENT_GROUP} {{",
        "    group {",
        "        incumbent-outside",
        "        incumbent-inside",
        "    }",
        f"    notify_master \"{script} primary\"",
        f"    notify_backup \"{script} backup\"",
        f"    notify_fault \"{script} fault\"",
        "}",
    ]
    for side, ifname, vrid, vips in (
            ("outside", ifs.outside, INCUMBENT_VRID_OUTSIDE, cfg.vips.outside),
            ("inside", ifs.inside, INCUMBENT_VRID_INSIDE, cfg.vips.inside)):
        v4 = [v for v in vips if ipaddress.ip_interface(v).version == 4]
        v6 = [v for v in vips if ipaddress.ip_interface(v).version == 6]
        if not v4:
            raise ValueError(f"vips.{side}: the incumbent needs an IPv4 VIP")
        out += [
            "",
            f"vrrp_instance incumbent-{side} {{",
            "    state BACKUP",
            f"    interface {ifname}",
            f"    virtual_router_id {vrid}",
            f"    priority {prio}",
            f"    advert_int {adv}",
        ]
        if not preempt:
            out.append("    nopreempt")
        out += ["    virtual_ipaddress {", *(f"        {v} dev {ifname}" for v in v4), "    }"]
        if v6:
            out += ["    virtual_ipaddress_excluded {",
                    *(f"        {v} dev {ifname}" for v in v6), "    }"]
        out.append("}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Notify lines: parsing


class NotifyError(ValueError):
    """A notify line or a ``lbsync notify`` request is malformed; ``str()`` is one line."""


@dataclass(frozen=True, slots=True)
class NotifyLine:
    """One parsed keepalived notify line (``INSTANCE "lbsync-2" MASTER 250``)."""

    kind: Literal["INSTANCE", "GROUP"]
    name: str
    state: str
    priority: int


def parse_notify_line(line: bytes | str) -> NotifyLine:
    """Parse one FIFO line (trailing newline optional); raises :class:`NotifyError`.

    The state is checked against :data:`STATES`; the priority is 0..255.
    """
    if isinstance(line, bytes):
        if len(line) > MAX_NOTIFY_LINE:
            raise NotifyError(f"line longer than {MAX_NOTIFY_LINE} bytes")
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise NotifyError("line is not ASCII") from None
    else:
        text = line
        if len(text) > MAX_NOTIFY_LINE:
            raise NotifyError(f"line longer than {MAX_NOTIFY_LINE} characters")
    text = text.rstrip("\r\n")
    m = _LINE_RE.match(text)
    if m is None:
        raise NotifyError(f"not a keepalived notify line: {text[:80]!r}")
    kind, name, state, prio = m.groups()
    if state not in STATES:
        raise NotifyError(f"unknown VRRP state {state!r}")
    priority = int(prio)
    if not 0 <= priority <= 255:
        raise NotifyError(f"priority {priority} out of 0..255")
    return NotifyLine(kind="INSTANCE" if kind == "INSTANCE" else "GROUP", name=name,
                      state=state, priority=priority)


def normalise_state(state: str) -> str:
    """A notify-script state (``master``, ``Backup``...) as keepalived's FIFO spells it;
    raises :class:`NotifyError` if it is not a VRRP state."""
    s = state.strip().upper()
    if s not in STATES:
        raise NotifyError(f"unknown VRRP state {state!r} (known: {', '.join(sorted(STATES))})")
    return s


# --------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class VrrpInstanceChanged:
    """keepalived reported a state for an lbsync instance (every INSTANCE line, first)."""

    instance: str
    node_id: int
    state: str
    priority: int


@dataclass(frozen=True, slots=True)
class VrrpPeerDeclaredDead:
    """This node became MASTER of peer ``node_id``'s instance: the peer stopped advertising it
    (dead, its keepalived dead, or its own links failed)."""

    node_id: int


@dataclass(frozen=True, slots=True)
class VrrpPeerReturned:
    """This node went from MASTER back to BACKUP in peer ``node_id``'s instance: the peer
    advertises its instance again."""

    node_id: int


@dataclass(frozen=True, slots=True)
class VrrpOwnLinkFailed:
    """This node's own instance entered FAULT (a tracked outside/inside link, or the management
    link, is down): hand this node's buckets off."""


@dataclass(frozen=True, slots=True)
class VrrpOwnLinkRecovered:
    """This node's own instance left FAULT for MASTER or BACKUP: its links are back."""


@dataclass(frozen=True, slots=True)
class VrrpSignalLost:
    """The local keepalived stopped (own instance STOP) or closed the notify FIFO: peers will
    take this node's instance within about three advert intervals."""

    reason: Literal["stopped", "fifo_closed"]


VrrpEvent = (VrrpInstanceChanged | VrrpPeerDeclaredDead | VrrpPeerReturned | VrrpOwnLinkFailed
             | VrrpOwnLinkRecovered | VrrpSignalLost)


@dataclass(frozen=True, slots=True)
class VrrpStatistics:
    """Counters of a :class:`VrrpInterpreter` (an immutable snapshot)."""

    lines: int
    instance_lines: int
    group_lines: int
    malformed_lines: int
    unknown_instances: int
    peers_declared_dead: int
    peers_returned: int
    own_link_failures: int
    own_link_recoveries: int
    signal_losses: int
    states: Mapping[str, str]


# --------------------------------------------------------------------------------------------
# The interpreter


class VrrpInterpreter:
    """Maps keepalived notify lines to lbsync events for node ``self_id`` (rules at the top of
    this module). Pure: no I/O, no clock."""

    def __init__(self, self_id: int, node_ids: Sequence[int]) -> None:
        if self_id not in node_ids:
            raise ValueError(f"node {self_id} is not in {sorted(node_ids)}")
        self.self_id = self_id
        self._nodes = frozenset(node_ids)
        self._states: dict[int, str] = {}
        self._own_faulted = False
        self._signal_lost = False
        self._lines = 0
        self._instance_lines = 0
        self._group_lines = 0
        self._malformed = 0
        self._unknown = 0
        self._dead = 0
        self._returned = 0
        self._failures = 0
        self._recoveries = 0
        self._losses = 0

    def feed_line(self, line: bytes | str) -> list[VrrpEvent]:
        """One line from the FIFO. Never raises on remote garbage: it is counted."""
        self._lines += 1
        try:
            parsed = parse_notify_line(line)
        except NotifyError:
            self._malformed += 1
            return []
        if parsed.kind == "GROUP":
            self._group_lines += 1
            return []
        return self._instance(parsed.name, parsed.state, parsed.priority)

    def notify(self, instance: str, state: str, priority: int = 0) -> list[VrrpEvent]:
        """The same information from ``lbsync notify`` (a notify script through the control
        socket); raises :class:`NotifyError` on a bad state or instance text."""
        if not instance or len(instance) > 128 or any(c in instance for c in '"\n\r\x00'):
            raise NotifyError(f"bad instance name {instance[:80]!r}")
        canonical = normalise_state(state)
        self._lines += 1
        return self._instance(instance, canonical, priority)

    def notifier_closed(self) -> list[VrrpEvent]:
        """The FIFO's last writer closed it (keepalived stopped or died)."""
        return self._lose("fifo_closed")

    def state_of(self, node_id: int) -> str | None:
        """The last state keepalived reported for ``lbsync-<node_id>`` on this node."""
        return self._states.get(node_id)

    def statistics(self) -> VrrpStatistics:
        return VrrpStatistics(
            lines=self._lines, instance_lines=self._instance_lines,
            group_lines=self._group_lines, malformed_lines=self._malformed,
            unknown_instances=self._unknown, peers_declared_dead=self._dead,
            peers_returned=self._returned, own_link_failures=self._failures,
            own_link_recoveries=self._recoveries, signal_losses=self._losses,
            states={instance_name(n): s for n, s in sorted(self._states.items())})

    # ----------------------------------------------------------------------------------------

    def _lose(self, reason: Literal["stopped", "fifo_closed"]) -> list[VrrpEvent]:
        if self._signal_lost:
            return []
        self._signal_lost = True
        self._losses += 1
        return [VrrpSignalLost(reason=reason)]

    def _instance(self, name: str, state: str, priority: int) -> list[VrrpEvent]:
        owner = instance_owner(name)
        if owner is None or owner not in self._nodes:
            self._unknown += 1
            return []
        self._instance_lines += 1
        if state not in ("STOP", "DELETED"):
            self._signal_lost = False
        events: list[VrrpEvent] = [VrrpInstanceChanged(instance=name, node_id=owner,
                                                       state=state, priority=priority)]
        if state == "MASTER_RX_LOWER_PRI":
            # A master heard a lower-priority advert: it stays MASTER, nothing changed.
            return events
        before = self._states.get(owner)
        self._states[owner] = state
        if owner == self.self_id:
            if state == "FAULT" and not self._own_faulted:
                self._own_faulted = True
                self._failures += 1
                events.append(VrrpOwnLinkFailed())
            elif state in ("MASTER", "BACKUP") and self._own_faulted:
                self._own_faulted = False
                self._recoveries += 1
                events.append(VrrpOwnLinkRecovered())
            elif state in ("STOP", "DELETED"):
                events.extend(self._lose("stopped"))
            return events
        if state == "MASTER" and before != "MASTER":
            self._dead += 1
            events.append(VrrpPeerDeclaredDead(node_id=owner))
        elif state == "BACKUP" and before == "MASTER":
            self._returned += 1
            events.append(VrrpPeerReturned(node_id=owner))
        return events
