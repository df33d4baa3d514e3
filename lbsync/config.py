"""Cluster configuration: one TOML file shared by every node, validated into frozen dataclasses.

Rules:
- The file is parsed once (``tomllib``) and converted section by section by a small generic
  converter that reads the dataclass fields: every field has a default and a help text
  (``metadata["help"]``), unknown keys are errors, and every error names the file and the dotted
  key (``cluster.toml: nodes[1].weight: must be > 0``).
- Cross-field rules (unique node ids, NAT port plans, addresses in the right family) are checked
  after conversion in :func:`_check_cluster`.
- A node adds only its id: ``--node-id`` or ``/etc/lbsync/node.toml`` (``node_id = N``).
- Runtime files are named after the cluster and the node so that several nodes on one host (the
  lab) never collide: ``/run/lbsync/<cluster>-<node>.{sock,lock}``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

DEFAULT_CLUSTER_FILE = Path("/etc/lbsync/cluster.toml")
DEFAULT_NODE_FILE = Path("/etc/lbsync/node.toml")
RUN_DIR = Path("/run/lbsync")

MAX_BUCKETS = 4096
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,23}$")


class ConfigError(ValueError):
    """A configuration file or value is invalid; ``str()`` is one line naming file and key."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(f"{where}{message}")


def _help(text: str, **kw: Any) -> Any:
    """``dataclasses.field`` with a help text (ruff's RUF009 is off for this reason)."""
    return field(metadata={"help": text}, **kw)


# --------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """One firewall node of the farm."""

    id: int = _help("node id, 1..255, unique in the cluster (goes on the wire)", default=0)
    name: str = _help("human name, used for namespaces and logs", default="")
    replication_address: str = _help("address on the replication link", default="")
    management_address: str = _help("address on the management link", default="")
    weight: int = _help("share of buckets relative to other nodes (1..1000)", default=1)


@dataclass(frozen=True, slots=True)
class InterfacesConfig:
    """Interface names, identical on every node."""

    outside: str = _help("outside (client-facing) cluster interface", default="outside0")
    inside: str = _help("inside (server-facing) cluster interface", default="inside0")
    replication: str = _help("replication link (never a shared-MAC segment)", default="repl0")
    management: str = _help("management link (VRRP, control)", default="mgmt0")


@dataclass(frozen=True, slots=True)
class VipsConfig:
    """Shared virtual addresses (with prefix length) carried by every node."""

    outside: tuple[str, ...] = _help("VIPs on the outside interface", default=())
    inside: tuple[str, ...] = _help("VIPs on the inside interface", default=())
    outside_mac: str = _help("shared MAC of the outside interface", default="02:00:5e:18:00:01")
    inside_mac: str = _help("shared MAC of the inside interface", default="02:00:5e:18:01:01")


NatKind = Literal["ingress_snat", "egress_snat", "dnat"]


@dataclass(frozen=True, slots=True)
class NatRule:
    """One NAT rule.

    - ``ingress_snat``: flows from outside clients are source-translated to ``to`` (an inside
      address); each bucket gets its own slice of ``ports``.
    - ``egress_snat``: flows from inside clients are source-translated to ``to`` (an outside
      address), full port range (all flows to one remote endpoint share a bucket).
    - ``dnat``: flows to ``match_daddr``/``match_dport`` are destination-translated to ``to``
      (``addr`` or ``addr:port``; IPv6 as ``[addr]:port``).
    """

    kind: NatKind = _help("ingress_snat | egress_snat | dnat", default="ingress_snat")
    to: str = _help("translated address (dnat: address[:port])", default="")
    match_saddr: str = _help("only flows from this prefix (optional)", default="")
    match_daddr: str = _help("only flows to this prefix (optional)", default="")
    match_proto: str = _help("tcp | udp | '' (any)", default="")
    match_dport: int = _help("only flows to this port (0: any)", default=0)
    ports: str = _help("SNAT port range lo-hi (ingress: split across buckets)",
                       default="1024-65535")


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    """Replication channel and protocol bounds."""

    mode: Literal["multicast", "unicast"] = _help("multicast group or unicast peer list",
                                                  default="multicast")
    group4: str = _help("IPv4 multicast group (239.0.0.0/8)", default="239.18.0.1")
    port: int = _help("UDP port of the replication channel", default=7946)
    max_datagram: int = _help("largest datagram sent, bytes", default=1400)
    flush_delay_ms: float = _help("longest a message waits to be grouped", default=2.0)
    history_datagrams: int = _help("retransmit history bound, datagrams", default=8192)
    history_bytes: int = _help("retransmit history bound, bytes", default=16 * 1024 * 1024)
    reorder_datagrams: int = _help("receiver reorder buffer per sender", default=4096)
    idle_ms: float = _help("tail-loss high-water mark after this idle time", default=50.0)
    idle_max_ms: float = _help("high-water mark back-off ceiling", default=1000.0)
    socket_buffer: int = _help("SO_RCVBUF/SO_SNDBUF bytes", default=8 * 1024 * 1024)
    control_port: int = _help(
        "TCP port of the authenticated peer-control listener on replication_address (farm "
        "commands relayed between daemons); 0: port + 1", default=0)

    @property
    def peer_control_port(self) -> int:
        """The peer-control TCP port in effect (``control_port``, or ``port + 1``)."""
        return self.control_port or self.port + 1


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Failure detection."""

    profile: Literal["default", "fast", "custom"] = _help(
        "default: dead within ~0.3 s; fast: ~0.15 s; custom: the two keys below", default="default")
    heartbeat_ms: float = _help("heartbeat interval (custom profile)", default=50.0)
    miss_count: int = _help("missed heartbeats before a peer is dead (custom)", default=6)
    witness: str = _help("2-node farms: address of a witness (quorum tie-breaker)", default="")
    preinject: bool = _help(
        "create standby copies in the kernel as they arrive (false: keep them in the store "
        "only; a takeover then commits the inherited buckets' entries before claiming, "
        "slower: docs/failover.md)", default=True)


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """ctnetlink adapter bounds."""

    event_buffer: int = _help("event socket SO_RCVBUFFORCE bytes", default=64 * 1024 * 1024)
    batch_entries: int = _help("entries per batched netlink write", default=256)
    slice_entries: int = _help("entries per slice before yielding to the loop", default=2048)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Standby store bounds."""

    max_entries: int = _help("standby entries kept in userspace", default=2_000_000)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """How the daemon runs on the node."""

    sched_policy: Literal["rr", "fifo", "other"] = _help(
        "scheduling policy: rr/fifo (real time, as conntrackd does by default) keep heartbeats "
        "and leases on time when the node is loaded; other: the normal time-sharing policy",
        default="rr")
    sched_priority: int = _help("real-time priority 1..99 for rr/fifo", default=50)


@dataclass(frozen=True, slots=True)
class KeepalivedConfig:
    """keepalived as a second failure signal (docs/keepalived.md)."""

    enabled: bool = _help(
        "read keepalived's notify FIFO: a peer's instance taken over lowers that peer's "
        "silence threshold to T_fence; this node's own instance FAULT hands its buckets off",
        default=False)
    fifo: str = _help("notify FIFO path; '' means /run/lbsync/<cluster>-<node>.vrrp.fifo",
                      default="")
    advert_int: float = _help("VRRP advert interval in seconds (lbsync keepalived-config)",
                              default=0.1)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus exporter (off by default)."""

    listen: str = _help("host:port to serve /metrics on; '' disables", default="")


@dataclass(frozen=True, slots=True)
class ClusterSection:
    """The [cluster] table."""

    name: str = _help("cluster name, [a-z][a-z0-9_-]{0,23}", default="")
    buckets: int = _help("bucket count B, 1..4096, never changes at run time", default=256)
    hash_seed: int = _help("nft jhash seed shared by every node (32-bit)", default=0x6C627379)
    key_file: str = _help("file holding the replication key ring",
                          default="/etc/lbsync/cluster.key")
    min_ports_per_bucket: int = _help("ingress SNAT: least ports a bucket may get", default=64)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The whole cluster file."""

    cluster: ClusterSection = _help("cluster identity", default_factory=ClusterSection)
    nodes: tuple[NodeConfig, ...] = _help("the farm's nodes", default=())
    interfaces: InterfacesConfig = _help("interface names", default_factory=InterfacesConfig)
    vips: VipsConfig = _help("shared addresses", default_factory=VipsConfig)
    nat: tuple[NatRule, ...] = _help("NAT rules", default=())
    replication: ReplicationConfig = _help("replication", default_factory=ReplicationConfig)
    membership: MembershipConfig = _help("failure detection", default_factory=MembershipConfig)
    kernel: KernelConfig = _help("kernel adapter", default_factory=KernelConfig)
    store: StoreConfig = _help("standby store", default_factory=StoreConfig)
    metrics: MetricsConfig = _help("metrics", default_factory=MetricsConfig)
    daemon: DaemonConfig = _help("daemon process", default_factory=DaemonConfig)
    keepalived: KeepalivedConfig = _help("keepalived signal", default_factory=KeepalivedConfig)

    def node(self, node_id: int) -> NodeConfig:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes)

    def vrrp_fifo(self, node_id: int) -> Path:
        """keepalived's notify FIFO for ``node_id`` (``keepalived.fifo`` or the default)."""
        if self.keepalived.fifo:
            return Path(self.keepalived.fifo)
        return self.runtime_path(node_id, "vrrp.fifo")

    def runtime_path(self, node_id: int, suffix: str) -> Path:
        """``/run/lbsync/<cluster>-<node>.<suffix>`` (sock, lock, state...)."""
        return RUN_DIR / f"{self.cluster.name}-{node_id}.{suffix}"


# --------------------------------------------------------------------------------------------
# Generic conversion

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(source, key, f"must be one of {', '.join(map(repr, choices))}, "
                                           f"not {value!r}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(source, key, f"must be a list, not {type(value).__name__}")
        return tuple(_convert(v, item_tp, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError("unions are not supported in config dataclasses")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(source, key, f"must be a table, not {type(value).__name__}")
        return _build(tp, value, source, key)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"must be a number, not {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"must be a string, not {value!r}")
        return value
    raise TypeError(f"unsupported config type {_type_name(tp)}")


def _build(cls: type[T], data: Mapping[str, Any], source: str, prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(source, where, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        if name in data:
            where = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _convert(data[name], hints[name], source, where)
    return cls(**kwargs)


def describe(cls: type[Any], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every option, for docs and ``config check --describe``."""
    out: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(describe(tp, key))  # type: ignore[arg-type]
            continue
        default = f.default if f.default is not dataclasses.MISSING else "()"
        out.append((key, repr(default), f.metadata.get("help", "")))
    return out


# --------------------------------------------------------------------------------------------
# Cross-field checks


def parse_port_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)-(\d+)", text.strip())
    if not m:
        raise ValueError(f"port range must be lo-hi, not {text!r}")
    lo, hi = int(m.group(1)), int(m.group(2))
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"port range {text!r} must satisfy 1 <= lo <= hi <= 65535")
    return lo, hi


def bucket_port_range(rule: NatRule, buckets: int, bucket: int) -> tuple[int, int]:
    """Ingress SNAT: the slice of ``rule.ports`` reserved for ``bucket`` (equal, contiguous)."""
    lo, hi = parse_port_range(rule.ports)
    per = (hi - lo + 1) // buckets
    start = lo + bucket * per
    return start, start + per - 1


def _addr(text: str, source: str, key: str, *, prefix_ok: bool = False
          ) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        if "/" in text and not prefix_ok:
            raise ValueError("no prefix length expected")
        return ipaddress.ip_interface(text)
    except ValueError as exc:
        raise ConfigError(source, key, f"not an IP address: {text!r} ({exc})") from None


def split_host_port(text: str) -> tuple[str, int]:
    """``addr``, ``addr:port``, ``[v6]:port`` or bare v6 -> (addr, port or 0)."""
    if text.startswith("["):
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?", text)
        if not m:
            raise ValueError(f"bad address {text!r}")
        return m.group(1), int(m.group(2) or 0)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 0


def _check_cluster(cfg: ClusterConfig, source: str) -> None:
    c = cfg.cluster
    if not NAME_RE.match(c.name):
        raise ConfigError(source, "cluster.name", f"must match {NAME_RE.pattern}, not {c.name!r}")
    if not 1 <= c.buckets <= MAX_BUCKETS:
        raise ConfigError(source, "cluster.buckets", f"must be 1..{MAX_BUCKETS}, not {c.buckets}")
    if not 0 <= c.hash_seed <= 0xFFFFFFFF:
        raise ConfigError(source, "cluster.hash_seed", "must be a 32-bit unsigned integer")
    if c.min_ports_per_bucket < 1:
        raise ConfigError(source, "cluster.min_ports_per_bucket", "must be >= 1")
    if not cfg.nodes:
        raise ConfigError(source, "nodes", "at least one [[nodes]] entry is required")
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for i, n in enumerate(cfg.nodes):
        k = f"nodes[{i}]"
        if not 1 <= n.id <= 255:
            raise ConfigError(source, f"{k}.id", f"must be 1..255, not {n.id}")
        if n.id in seen_ids:
            raise ConfigError(source, f"{k}.id", f"duplicate node id {n.id}")
        seen_ids.add(n.id)
        name = n.name or f"node{n.id}"
        if name in seen_names:
            raise ConfigError(source, f"{k}.name", f"duplicate node name {name!r}")
        seen_names.add(name)
        if not 1 <= n.weight <= 1000:
            raise ConfigError(source, f"{k}.weight", f"must be 1..1000, not {n.weight}")
        if not n.replication_address:
            raise ConfigError(source, f"{k}.replication_address", "is required")
        _addr(n.replication_address, source, f"{k}.replication_address")
        if n.management_address:
            _addr(n.management_address, source, f"{k}.management_address")
    for fname in ("outside", "inside", "replication", "management"):
        v = getattr(cfg.interfaces, fname)
        if not IFNAME_RE.match(v):
            raise ConfigError(source, f"interfaces.{fname}", f"not a valid interface name: {v!r}")
    for side in ("outside", "inside"):
        for i, vip in enumerate(getattr(cfg.vips, side)):
            iface = _addr(vip, source, f"vips.{side}[{i}]", prefix_ok=True)
            if "/" not in vip:
                raise ConfigError(source, f"vips.{side}[{i}]", "needs a prefix length (addr/len)")
            del iface
        mac = getattr(cfg.vips, f"{side}_mac")
        if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac):
            raise ConfigError(source, f"vips.{side}_mac", f"not a lowercase MAC: {mac!r}")
    for i, rule in enumerate(cfg.nat):
        _check_nat(rule, c, source, f"nat[{i}]")
    r = cfg.replication
    if r.mode == "multicast":
        try:
            grp = ipaddress.ip_address(r.group4)
        except ValueError:
            raise ConfigError(source, "replication.group4",
                              f"not an address: {r.group4!r}") from None
        if grp not in ipaddress.ip_network("239.0.0.0/8"):
            raise ConfigError(source, "replication.group4", "must be in 239.0.0.0/8")
    if not 1 <= r.port <= 65535:
        raise ConfigError(source, "replication.port", "must be 1..65535")
    if not 0 <= r.control_port <= 65535:
        raise ConfigError(source, "replication.control_port", "must be 0 (port + 1) or 1..65535")
    if r.peer_control_port > 65535:
        raise ConfigError(source, "replication.control_port",
                          "port + 1 exceeds 65535: set it explicitly")
    if not 256 <= r.max_datagram <= 65000:
        raise ConfigError(source, "replication.max_datagram", "must be 256..65000")
    for name in ("history_datagrams", "history_bytes", "reorder_datagrams", "socket_buffer"):
        if getattr(r, name) <= 0:
            raise ConfigError(source, f"replication.{name}", "must be > 0")
    for name in ("flush_delay_ms", "idle_ms", "idle_max_ms"):
        if getattr(r, name) <= 0:
            raise ConfigError(source, f"replication.{name}", "must be > 0")
    m = cfg.membership
    if m.heartbeat_ms <= 0 or m.miss_count < 2:
        raise ConfigError(source, "membership", "heartbeat_ms must be > 0 and miss_count >= 2")
    if not 1 <= cfg.daemon.sched_priority <= 99:
        raise ConfigError(source, "daemon.sched_priority", "must be 1..99")
    if cfg.store.max_entries <= 0:
        raise ConfigError(source, "store.max_entries", "must be > 0")
    if cfg.kernel.batch_entries <= 0 or cfg.kernel.slice_entries <= 0:
        raise ConfigError(source, "kernel", "batch_entries and slice_entries must be > 0")
    ka = cfg.keepalived
    if not 0.01 <= ka.advert_int <= 255:
        raise ConfigError(source, "keepalived.advert_int", "must be 0.01..255 seconds")
    if ka.enabled and any(not n.management_address for n in cfg.nodes):
        raise ConfigError(source, "keepalived.enabled",
                          "every node needs a management_address for VRRP")


def _check_nat(rule: NatRule, c: ClusterSection, source: str, k: str) -> None:
    if not rule.to:
        raise ConfigError(source, f"{k}.to", "is required")
    if rule.match_proto not in ("", "tcp", "udp"):
        raise ConfigError(source, f"{k}.match_proto", "must be tcp, udp or ''")
    if not 0 <= rule.match_dport <= 65535:
        raise ConfigError(source, f"{k}.match_dport", "must be 0..65535")
    if rule.match_dport and not rule.match_proto:
        raise ConfigError(source, f"{k}.match_dport", "needs match_proto (tcp or udp)")
    for fname in ("match_saddr", "match_daddr"):
        v = getattr(rule, fname)
        if v:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError:
                raise ConfigError(source, f"{k}.{fname}", f"not a prefix: {v!r}") from None
    try:
        host, port = split_host_port(rule.to)
        to_addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(source, f"{k}.to", f"not an address[:port]: {rule.to!r}") from None
    if port and rule.kind != "dnat":
        raise ConfigError(source, f"{k}.to", "only dnat takes a port; SNAT ports go in 'ports'")
    for fname in ("match_saddr", "match_daddr"):
        v = getattr(rule, fname)
        if v and ipaddress.ip_network(v, strict=False).version != to_addr.version:
            raise ConfigError(source, f"{k}.{fname}", "address family differs from 'to'")
    try:
        lo, hi = parse_port_range(rule.ports)
    except ValueError as exc:
        raise ConfigError(source, f"{k}.ports", str(exc)) from None
    if rule.kind == "ingress_snat":
        per = (hi - lo + 1) // c.buckets
        if per < c.min_ports_per_bucket:
            raise ConfigError(
                source, f"{k}.ports",
                f"{hi - lo + 1} ports over {c.buckets} buckets leaves {per} per bucket, "
                f"fewer than cluster.min_ports_per_bucket={c.min_ports_per_bucket}")


# --------------------------------------------------------------------------------------------
# Loading


def parse_cluster(data: Mapping[str, Any], source: str = "<config>") -> ClusterConfig:
    cfg = _build(ClusterConfig, data, source, "")
    _check_cluster(cfg, source)
    return cfg


def load_cluster(path: Path | str = DEFAULT_CLUSTER_FILE) -> ClusterConfig:
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, "", "no such file") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(source, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"TOML syntax error: {exc}") from None
    return parse_cluster(data, source)


def load_node_id(cfg: ClusterConfig, node_id: int | None,
                 node_file: Path | str = DEFAULT_NODE_FILE) -> int:
    """The node's id from ``--node-id`` or from ``node.toml``; it must be in the cluster."""
    source = "--node-id"
    if node_id is None:
        path = Path(node_file)
        source = str(path)
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise ConfigError(source, "", "no such file (or pass --node-id)") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(source, "", f"cannot parse: {exc}") from None
        extra = set(data) - {"node_id"}
        if extra:
            raise ConfigError(source, sorted(extra)[0], "unknown key (known: node_id)")
        node_id = data.get("node_id")
        if isinstance(node_id, bool) or not isinstance(node_id, int):
            raise ConfigError(source, "node_id", "must be an integer")
    if node_id not in cfg.node_ids:
        raise ConfigError(source, "node_id",
                          f"{node_id} is not a node of cluster {cfg.cluster.name!r} "
                          f"(nodes: {', '.join(map(str, cfg.node_ids))})")
    return node_id
