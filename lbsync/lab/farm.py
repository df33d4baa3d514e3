"""The lab farm: an active-active firewall farm built from network namespaces on one machine.

Topology (docs/lab.md has the picture)::

    <p>-cli --- <p>-hubo --- outside0 of <p>-n1 .. <p>-nN --- inside0 --- <p>-hubi --- <p>-srv
                             repl0 --- <p>-hubr          mgmt0 --- <p>-hubm

- Every hub is a bridge ``br0`` in its own namespace; the two shared-MAC segments (outside,
  inside) are hubs in the DESIGN.md sense: ``ageing_time 0``, STP off, multicast snooping off,
  every port ``learning off flood on``, so every node sees every frame. Replication and
  management hubs are plain bridges (snooping off, so multicast reaches every port).
- Every node carries the same VIPs and the same MAC on outside0 and inside0; replication and
  management addresses are per node.
- Nothing in the root namespace changes: namespaces are created (``/run/netns/<p>-*``), every
  link lives inside them, and they go away with ``destroy``.
- pyroute2 does namespaces, links, addresses and routes (the control plane role it has in
  lbsync); sysctls and nft run as ``ip netns exec`` subprocesses.
- Lab state lives in ``/run/lbsync/lab/<prefix>/``: ``cluster.toml`` (generated from a
  :class:`~lbsync.config.ClusterConfig` and validated by the normal loader), ``lab.json``
  (what was built, the initial bucket split). ``lab.json`` is written last: a lab without it
  is half-built and ``destroy`` still removes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbsync import nft
from lbsync.config import RUN_DIR, ClusterConfig, NatRule, load_cluster, parse_cluster

log = logging.getLogger(__name__)

LAB_ROOT = RUN_DIR / "lab"
NETNS_DIR = Path("/run/netns")
DEFAULT_PREFIX = "lbs"
DEFAULT_NODES = 3
DEFAULT_BUCKETS = 64
MAX_NODES = 16
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
LAB_FILE = "lab.json"
CONFIG_FILE = "cluster.toml"
LAB_FORMAT = 1

HUBS = ("hubo", "hubi", "hubr", "hubm")
ENDPOINT_IF = "eth0"      # the one interface of the client and server namespaces
BRIDGE = "br0"            # the bridge in every hub namespace

# Services the traffic tool uses and the lab's default NAT rules point at.
PLAIN_PORT = 5001         # server: no NAT
SNAT_PORT = 5002          # server: ingress SNAT to the inside VIP
SERVICE_PORT = 5003       # server: the DNAT target
DNAT_PORT = 8080          # outside VIP port DNATed to SERVICE_PORT on the server
EGRESS_PORT = 6000        # outside server (in the client namespace): EGRESS_PORT..+EGRESS_PORTS-1
EGRESS_PORTS = 8

_NODE_SYSCTLS = (
    "net.ipv4.ip_forward=1",
    "net.ipv4.conf.all.send_redirects=0",
    "net.ipv4.conf.default.send_redirects=0",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.accept_dad=0",
    "net.netfilter.nf_conntrack_tcp_loose=0",
    "net.netfilter.nf_conntrack_acct=1",
)
_ENDPOINT_SYSCTLS = (
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.accept_dad=0",
    "net.netfilter.nf_conntrack_acct=1",
)
_HUB_SYSCTLS = (
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
)

# Conntrack is registered in a namespace only when something there uses it: this table makes
# the client and server namespaces track their flows (with acct), so tests can compare the
# packets each flow's owner forwarded with the packets its far end received.
OBSERVE_TABLE = "lbsync_lab"
OBSERVE_RULESET = f"""table inet {OBSERVE_TABLE} {{
\tchain prerouting {{
\t\ttype filter hook prerouting priority filter; policy accept;
\t\tct state new counter
\t}}
}}
"""

_IFA_F_NODAD = 0x02


class LabError(Exception):
    """A lab operation the user asked for cannot be done (exists, missing, bad argument)."""


# --------------------------------------------------------------------------------------------
# Address plan


@dataclass(frozen=True, slots=True)
class FamilyAddresses:
    """The lab's addresses of one family (strings, without prefix length)."""

    family: int
    prefixlen: int
    outside_net: str
    inside_net: str
    replication_net: str
    management_net: str
    outside_vip: str
    inside_vip: str
    client: str
    server: str

    def replication(self, node_id: int) -> str:
        return _host(self.replication_net, node_id)

    def management(self, node_id: int) -> str:
        return _host(self.management_net, node_id)


def _host(net: str, index: int) -> str:
    return str(ipaddress.ip_network(net)[index])


def _plan(family: int) -> FamilyAddresses:
    if family == 4:
        nets = [f"198.18.{n}.0/24" for n in range(4)]
        plen = 24
    elif family == 6:
        nets = [f"2001:db8:0:{n}::/64" for n in range(4)]
        plen = 64
    else:
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    return FamilyAddresses(
        family=family, prefixlen=plen, outside_net=nets[0], inside_net=nets[1],
        replication_net=nets[2], management_net=nets[3],
        outside_vip=_host(nets[0], 1), inside_vip=_host(nets[1], 1),
        client=_host(nets[0], 0x100 if family == 6 else 100),
        server=_host(nets[1], 0x10 if family == 6 else 10))


ADDR4 = _plan(4)
ADDR6 = _plan(6)


def addresses(family: int) -> FamilyAddresses:
    """The address plan of ``family`` (4 or 6)."""
    return ADDR4 if family == 4 else ADDR6 if family == 6 else _plan(family)


def _hostpref(a: str) -> str:
    return f"{a}/{32 if ':' not in a else 128}"


def _bracket(a: str) -> str:
    return f"[{a}]" if ":" in a else a


def default_nat(ipv6: bool = False) -> tuple[NatRule, ...]:
    """The lab's NAT rules: the four cases of the datapath acceptance test, per family.

    - plain: client -> server:PLAIN_PORT, untranslated;
    - ingress SNAT: client -> server:SNAT_PORT, source translated to the inside VIP;
    - DNAT: client -> outside VIP:DNAT_PORT, translated to server:SERVICE_PORT;
    - egress SNAT: inside hosts -> anything outside, source translated to the outside VIP.
    """
    rules: list[NatRule] = []
    for a in (ADDR4, ADDR6) if ipv6 else (ADDR4,):
        for proto in ("tcp", "udp"):
            rules.append(NatRule(kind="ingress_snat", to=a.inside_vip,
                                 match_daddr=_hostpref(a.server), match_proto=proto,
                                 match_dport=SNAT_PORT))
        for proto in ("tcp", "udp"):
            rules.append(NatRule(kind="dnat", to=f"{_bracket(a.server)}:{SERVICE_PORT}",
                                 match_daddr=_hostpref(a.outside_vip), match_proto=proto,
                                 match_dport=DNAT_PORT))
        rules.append(NatRule(kind="egress_snat", to=a.outside_vip, match_saddr=a.inside_net))
    return tuple(rules)


# --------------------------------------------------------------------------------------------
# Config generation


def _toml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """A small TOML writer for config dicts: scalars, string lists, tables, arrays of tables."""
    out: list[str] = []

    def table(d: Mapping[str, Any], path: str) -> None:
        scalars = [(k, v) for k, v in d.items() if not _is_table(v)]
        for k, v in scalars:
            out.append(f"{k} = {_toml_scalar(v)}")
        for k, v in d.items():
            if isinstance(v, Mapping):
                name = f"{path}.{k}" if path else k
                out.append("")
                out.append(f"[{name}]")
                table(v, name)
            elif _is_table(v):
                name = f"{path}.{k}" if path else k
                for item in v:
                    out.append("")
                    out.append(f"[[{name}]]")
                    table(item, name)

    table(data, "")
    return "\n".join(out).lstrip("\n") + "\n"


def _is_table(v: Any) -> bool:
    return isinstance(v, Mapping) or (
        isinstance(v, list | tuple) and bool(v) and all(isinstance(x, Mapping) for x in v))


def cluster_dict(prefix: str, nodes: int, *, ipv6: bool, buckets: int,
                 nat: Sequence[NatRule] | None = None, directory: Path | None = None,
                 hash_seed: int = 0x6C627379) -> dict[str, Any]:
    """The lab's cluster file as a dict (the cluster is named after the prefix)."""
    directory = directory if directory is not None else LAB_ROOT / prefix
    rules = default_nat(ipv6) if nat is None else tuple(nat)
    fams = (ADDR4, ADDR6) if ipv6 else (ADDR4,)
    return {
        "cluster": {"name": prefix, "buckets": buckets, "hash_seed": hash_seed,
                    "key_file": str(directory / "cluster.key")},
        "nodes": [{"id": i, "name": f"n{i}", "replication_address": ADDR4.replication(i),
                   "management_address": ADDR4.management(i)} for i in range(1, nodes + 1)],
        "vips": {"outside": [f"{a.outside_vip}/{a.prefixlen}" for a in fams],
                 "inside": [f"{a.inside_vip}/{a.prefixlen}" for a in fams]},
        "nat": [{k: v for k, v in dataclasses.asdict(r).items()
                 if v != getattr(NatRule(), k) or k == "kind"} for r in rules],
    }


def initial_split(cfg: ClusterConfig) -> tuple[dict[int, tuple[int, ...]], str]:
    """The static initial bucket split (node id -> buckets it owns) and how it was made.

    ``hashing.ownermap.assign`` over every node with its weight and no previous map (the map a
    fresh cluster computes, epoch 1) when that module is there; otherwise round-robin over the
    node ids (bucket b -> node_ids[b % N]). Either way every bucket has exactly one owner.
    """
    ids = sorted(cfg.node_ids)
    split: dict[int, list[int]] = {i: [] for i in ids}
    try:
        from hashing.ownermap import Member, View, assign
    except ImportError:
        for b in range(cfg.cluster.buckets):
            split[ids[b % len(ids)]].append(b)
        return {i: tuple(bs) for i, bs in split.items()}, "round-robin"
    view = View.of(Member(node_id=n.id, weight=n.weight) for n in cfg.nodes)
    owner_map = assign(view, cfg.cluster.buckets, None)
    for b, owner in enumerate(owner_map.owners):
        split[owner].append(b)
    return {i: tuple(bs) for i, bs in split.items()}, "hashing.ownermap.assign"


# --------------------------------------------------------------------------------------------
# Processes and namespaces


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; with ``check``, a failure raises :class:`LabError` with its stderr."""
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            input=input)
    except FileNotFoundError as exc:
        raise LabError(f"cannot run {argv[0]}: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}: timed out after {timeout} s") from None
    if check and cp.returncode != 0:
        err = cp.stderr.strip().splitlines()
        raise LabError(f"{' '.join(argv)}: exit {cp.returncode}: {err[0] if err else ''}")
    return cp


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def netns_pids(names: Iterable[str]) -> dict[str, list[int]]:
    """The pids of processes whose network namespace is one of ``names`` (one /proc scan)."""
    inodes: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(NETNS_DIR / name)
        except OSError:
            continue
        inodes[(st.st_dev, st.st_ino)] = name
    out: dict[str, list[int]] = {n: [] for n in inodes.values()}
    if not inodes:
        return out
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        owner = inodes.get((st.st_dev, st.st_ino))
        if owner is not None:
            out[owner].append(int(entry.name))
    return out


def kill_pids(pids: Iterable[int], *, grace: float = 1.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left."""
    alive = set(pids)
    for pid in list(alive):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            alive.discard(pid)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = {p for p in alive if _pid_alive(p)}
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def lab_namespaces(prefix: str) -> list[str]:
    """The namespaces of ``/run/netns`` that belong to lab ``prefix``."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    pat = re.compile(rf"^{re.escape(prefix)}-(cli|srv|hub[oirm]|n\d+)$")
    return sorted(n for n in names if pat.match(n))


def list_labs(root: Path = LAB_ROOT) -> list[str]:
    """Prefixes of the labs with a state directory under ``root``."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------------------------
# Conntrack, read through conntrack(8) in a namespace


@dataclass(frozen=True, slots=True)
class CtTuple:
    """One direction of a conntrack entry."""

    src: str
    dst: str
    sport: int | None
    dport: int | None
    packets: int | None = None
    bytes: int | None = None


@dataclass(frozen=True, slots=True)
class CtEntry:
    """One conntrack entry as ``conntrack -L -o extended`` lists it."""

    family: int
    proto: str
    state: str
    orig: CtTuple
    reply: CtTuple
    mark: int
    flags: tuple[str, ...]


def parse_conntrack(text: str) -> list[CtEntry]:
    """Parse ``conntrack -L -o extended`` output (lines that do not parse are skipped)."""
    out: list[CtEntry] = []
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) < 5 or tokens[0] not in ("ipv4", "ipv6"):
            continue
        family = 4 if tokens[0] == "ipv4" else 6
        proto = tokens[2]
        state = ""
        dirs: list[dict[str, str]] = []
        flags: list[str] = []
        mark = 0
        for tok in tokens[5:]:
            if tok.startswith("["):
                flags.append(tok.strip("[]"))
                continue
            if "=" not in tok:
                if not dirs and tok.isupper():
                    state = tok
                continue
            key, _, value = tok.partition("=")
            if key == "src":
                dirs.append({})
            if key == "mark":
                mark = int(value)
            elif dirs and key in ("src", "dst", "sport", "dport", "packets", "bytes"):
                dirs[-1].setdefault(key, value)
        if len(dirs) != 2:
            continue
        tup = [CtTuple(src=d.get("src", ""), dst=d.get("dst", ""),
                       sport=_int(d.get("sport")), dport=_int(d.get("dport")),
                       packets=_int(d.get("packets")), bytes=_int(d.get("bytes")))
               for d in dirs]
        out.append(CtEntry(family=family, proto=proto, state=state, orig=tup[0],
                           reply=tup[1], mark=mark, flags=tuple(flags)))
    return out


def _int(v: str | None) -> int | None:
    return int(v) if v is not None else None


def conntrack_entries(ns: str) -> list[CtEntry]:
    """Every IPv4 and IPv6 conntrack entry of namespace ``ns``."""
    entries: list[CtEntry] = []
    for fam in ("ipv4", "ipv6"):
        cp = run(ns_argv(ns, ["conntrack", "-L", "-f", fam, "-o", "extended"]), check=False)
        if cp.returncode != 0 and "0 flow entries" not in cp.stderr:
            raise LabError(f"conntrack -L in {ns}: {cp.stderr.strip()}")
        entries.extend(parse_conntrack(cp.stdout))
    return entries


def flow_key(proto: str, src: str, sport: int | None, dst: str, dport: int | None
             ) -> tuple[str, str, int | None, str, int | None]:
    """A hashable original-direction key (addresses normalised)."""
    return (proto, str(ipaddress.ip_address(src)), sport, str(ipaddress.ip_address(dst)), dport)


# --------------------------------------------------------------------------------------------
# The lab


@dataclass
class Lab:
    """A built lab: namespaces, generated files, and the initial bucket split."""

    prefix: str
    nodes: int
    ipv6: bool
    buckets: int
    directory: Path
    cluster_config: ClusterConfig
    split: dict[int, tuple[int, ...]]
    created: float
    split_method: str = "round-robin"

    # ---- names

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(range(1, self.nodes + 1))

    def node_ns(self, node_id: int) -> str:
        if node_id not in self.node_ids:
            raise LabError(f"lab {self.prefix!r} has no node {node_id} (nodes 1..{self.nodes})")
        return f"{self.prefix}-n{node_id}"

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-cli"

    @property
    def server_ns(self) -> str:
        return f"{self.prefix}-srv"

    def hub_ns(self, hub: str) -> str:
        if hub not in HUBS:
            raise LabError(f"no hub {hub!r} (hubs: {', '.join(HUBS)})")
        return f"{self.prefix}-{hub}"

    @property
    def namespaces(self) -> list[str]:
        return ([self.hub_ns(h) for h in HUBS] + [self.client_ns, self.server_ns]
                + [self.node_ns(i) for i in self.node_ids])

    def resolve_ns(self, name: str) -> str:
        """A namespace from a user's word: ``1``, ``n1``, ``cli``, ``srv``, ``hubo`` or a full
        namespace name of this lab."""
        short = name[len(self.prefix) + 1:] if name.startswith(f"{self.prefix}-") else name
        if short.isdigit():
            short = f"n{short}"
        full = f"{self.prefix}-{short}"
        if full not in self.namespaces:
            raise LabError(f"lab {self.prefix!r} has no namespace {name!r} "
                           f"(nodes 1..{self.nodes}, cli, srv, {', '.join(HUBS)})")
        return full

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)

    def addr(self, family: int = 4) -> FamilyAddresses:
        if family not in self.families:
            raise LabError(f"lab {self.prefix!r} has no IPv{family} (build it with --ipv6)")
        return addresses(family)

    @property
    def ifaces(self) -> dict[str, str]:
        i = self.cluster_config.interfaces
        return {"outside": i.outside, "inside": i.inside, "replication": i.replication,
                "management": i.management}

    # ---- running things

    def exec(self, ns: str, argv: Sequence[str], *, check: bool = False, timeout: float = 60.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in namespace ``ns`` (captured output)."""
        return run(ns_argv(ns, argv), check=check, timeout=timeout, input=input)

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in namespace ``ns``; :meth:`destroy` kills it with the namespace."""
        return subprocess.Popen(ns_argv(ns, argv), **kw)

    # ---- kernel state

    def owned(self, node_id: int) -> set[int]:
        """The buckets in node ``node_id``'s ``@owned`` right now."""
        return nft.list_owned(self.node_ns(node_id))

    def owners(self) -> dict[int, int]:
        """bucket -> node id for every bucket some node owns right now (last node wins if a
        bucket were owned twice: use :meth:`owned` to see that)."""
        out: dict[int, int] = {}
        for i in self.node_ids:
            for b in self.owned(i):
                out[b] = i
        return out

    def initial_owner(self, bucket: int) -> int:
        for node_id, bs in self.split.items():
            if bucket in bs:
                return node_id
        raise LabError(f"bucket {bucket} is not in the split")

    def conntrack(self, ns: str) -> list[CtEntry]:
        return conntrack_entries(ns)

    # ---- failures, for drills

    def set_node_links(self, node_id: int, up: bool,
                       segments: Sequence[str] = ("outside", "inside", "replication",
                                                  "management")) -> None:
        """Unplug (``up=False``) or replug the node's cables: its ports on the hubs go down
        or up, so the node's interfaces lose or regain carrier (as keepalived's
        ``track_interface`` would see a pulled cable)."""
        from pyroute2 import IPRoute

        hub_of = dict(zip(("outside", "inside", "replication", "management"), HUBS,
                          strict=True))
        for seg in segments:
            if seg not in hub_of:
                raise LabError(f"no segment {seg!r} (segments: {', '.join(hub_of)})")
        port = f"n{self.node_ns(node_id).rsplit('-n', 1)[1]}"
        for seg in segments:
            with IPRoute(netns=self.hub_ns(hub_of[seg])) as ip:
                idx = ip.link_lookup(ifname=port)
                if not idx:
                    raise LabError(f"hub {hub_of[seg]} has no port {port}")
                ip.link("set", index=idx[0], state="up" if up else "down")

    def kill_node_processes(self, node_id: int, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process in the node's namespace; the pids signalled."""
        ns = self.node_ns(node_id)
        pids = netns_pids([ns]).get(ns, [])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def status(self) -> dict[str, Any]:
        """What exists right now: namespaces, per node @owned and conntrack counts."""
        present = set(lab_namespaces(self.prefix))
        nodes: list[dict[str, Any]] = []
        for i in self.node_ids:
            ns = self.node_ns(i)
            row: dict[str, Any] = {"id": i, "namespace": ns, "present": ns in present}
            if ns in present:
                try:
                    row["owned"] = len(self.owned(i))
                except nft.NftError as exc:
                    row["owned"] = None
                    row["error"] = str(exc)
                cp = self.exec(ns, ["conntrack", "-C"])
                row["conntrack"] = int(cp.stdout.strip()) if cp.stdout.strip().isdigit() \
                    else None
            nodes.append(row)
        pids = netns_pids(present)
        return {
            "prefix": self.prefix, "directory": str(self.directory),
            "config": str(self.config_path), "ipv6": self.ipv6, "buckets": self.buckets,
            "nodes": nodes,
            "namespaces": {ns: ns in present for ns in self.namespaces},
            "processes": sum(len(p) for p in pids.values()),
            "complete": all(ns in present for ns in self.namespaces),
        }

    # ---- lifecycle

    @classmethod
    def create(cls, prefix: str = DEFAULT_PREFIX, nodes: int = DEFAULT_NODES, *,
               ipv6: bool = False, buckets: int = DEFAULT_BUCKETS,
               nat: Sequence[NatRule] | None = None, root: Path = LAB_ROOT) -> Lab:
        """Build a lab; on any failure everything built so far is removed again."""
        check_prefix(prefix)
        if not 1 <= nodes <= MAX_NODES:
            raise LabError(f"--nodes must be 1..{MAX_NODES}, not {nodes}")
        if exists(prefix, root):
            raise LabError(f"lab {prefix!r} already exists (lbsync lab down --name {prefix})")
        directory = root / prefix
        data = cluster_dict(prefix, nodes, ipv6=ipv6, buckets=buckets, nat=nat,
                            directory=directory)
        cfg = parse_cluster(data, f"lab {prefix}")  # ConfigError for bad buckets/NAT plans
        directory.mkdir(parents=True, exist_ok=False)
        (directory / CONFIG_FILE).write_text(to_toml(data))
        cfg = load_cluster(directory / CONFIG_FILE)
        split, method = initial_split(cfg)
        lab = cls(prefix=prefix, nodes=nodes, ipv6=ipv6, buckets=buckets, directory=directory,
                  cluster_config=cfg, split=split, created=time.time(), split_method=method)
        try:
            t0 = time.monotonic()
            lab._build()
            log.info("lab.up prefix=%s nodes=%d ipv6=%s buckets=%d seconds=%.2f",
                     prefix, nodes, ipv6, buckets, time.monotonic() - t0)
        except BaseException:
            lab.destroy()
            raise
        return lab

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX, *, root: Path = LAB_ROOT) -> Lab:
        """The lab ``prefix`` as ``create`` recorded it."""
        check_prefix(prefix)
        directory = root / prefix
        try:
            state = json.loads((directory / LAB_FILE).read_text())
        except FileNotFoundError:
            raise LabError(f"no lab named {prefix!r} (lbsync lab up --name {prefix})") from None
        except ValueError as exc:
            raise LabError(f"{directory / LAB_FILE}: not valid JSON ({exc})") from None
        if state.get("format") != LAB_FORMAT:
            raise LabError(f"{directory / LAB_FILE}: unknown format {state.get('format')!r}")
        cfg = load_cluster(directory / CONFIG_FILE)
        return cls(prefix=prefix, nodes=int(state["nodes"]), ipv6=bool(state["ipv6"]),
                   buckets=int(state["buckets"]), directory=directory, cluster_config=cfg,
                   split={int(k): tuple(v) for k, v in state["split"].items()},
                   created=float(state["created"]),
                   split_method=str(state.get("split_method", "round-robin")))

    def state(self) -> dict[str, Any]:
        """What ``lab.json`` holds."""
        return {
            "format": LAB_FORMAT, "prefix": self.prefix, "nodes": self.nodes,
            "ipv6": self.ipv6, "buckets": self.buckets,
            "hash_seed": self.cluster_config.cluster.hash_seed, "created": self.created,
            "config": str(self.config_path),
            "namespaces": {"client": self.client_ns, "server": self.server_ns,
                           "hubs": {h: self.hub_ns(h) for h in HUBS},
                           "nodes": {str(i): self.node_ns(i) for i in self.node_ids}},
            "interfaces": self.ifaces,
            "addresses": {str(f): dataclasses.asdict(self.addr(f)) for f in self.families},
            "split_method": self.split_method,
            "split": {str(k): list(v) for k, v in self.split.items()},
        }

    def destroy(self) -> None:
        """Kill every process in the lab's namespaces, delete them and the state directory."""
        destroy(self.prefix, root=self.directory.parent)

    # ---- building

    def _build(self) -> None:
        from pyroute2 import netns as pnetns

        for ns in self.namespaces:
            pnetns.create(ns)
        hubs = {self.hub_ns(h) for h in HUBS}
        for ns in self.namespaces:
            sysctls = (_HUB_SYSCTLS if ns in hubs else
                       _ENDPOINT_SYSCTLS if ns in (self.client_ns, self.server_ns)
                       else _NODE_SYSCTLS)
            run(ns_argv(ns, ["sysctl", "-q", "-w", *sysctls]))
        ifs = self.ifaces
        # Hub ports: (hub, port name, endpoint namespace, endpoint interface)
        ports: list[tuple[str, str, str, str]] = [
            ("hubo", "cli", self.client_ns, ENDPOINT_IF),
            ("hubi", "srv", self.server_ns, ENDPOINT_IF),
        ]
        for i in self.node_ids:
            for hub, role in zip(HUBS, ("outside", "inside", "replication", "management"),
                                 strict=True):
                ports.append((hub, f"n{i}", self.node_ns(i), ifs[role]))
        for hub in HUBS:
            self._build_hub(hub, [(p, ens, eif) for h, p, ens, eif in ports if h == hub])
        self._build_endpoint(self.client_ns, "outside")
        self._build_endpoint(self.server_ns, "inside")
        for i in self.node_ids:
            self._build_node(i)
        for ns in (self.client_ns, self.server_ns):
            run(ns_argv(ns, ["nft", "-f", "-"]), input=OBSERVE_RULESET)
        from lbsync.datapath import render_ruleset

        for i in self.node_ids:
            ns = self.node_ns(i)
            nft.apply_ruleset(render_ruleset(self.cluster_config, i), ns)
            nft.owned_transaction(self.split[i], (), ns)
        (self.directory / LAB_FILE).write_text(json.dumps(self.state(), indent=1) + "\n")

    def _build_hub(self, hub: str, ports: list[tuple[str, str, str]]) -> None:
        from pyroute2 import IPRoute

        shared = hub in ("hubo", "hubi")
        with IPRoute(netns=self.hub_ns(hub)) as ip:
            ip.link("add", ifname=BRIDGE, kind="bridge", br_ageing_time=0, br_stp_state=0,
                    br_mcast_snooping=0)
            br = ip.link_lookup(ifname=BRIDGE)[0]
            for port, ens, eif in ports:
                ip.link("add", ifname=port, kind="veth", peer={"ifname": eif, "net_ns_fd": ens})
                idx = ip.link_lookup(ifname=port)[0]
                ip.link("set", index=idx, master=br, state="up")
                if shared:
                    ip.brport("set", index=idx, learning=0, unicast_flood=1)
            ip.link("set", index=br, state="up")

    def _build_endpoint(self, ns: str, side: str) -> None:
        from pyroute2 import IPRoute

        with IPRoute(netns=ns) as ip:
            idx = ip.link_lookup(ifname=ENDPOINT_IF)[0]
            ip.link("set", index=idx, state="up")
            ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
            for f in self.families:
                a = self.addr(f)
                host = a.client if side == "outside" else a.server
                gw = a.outside_vip if side == "outside" else a.inside_vip
                _addr_add(ip, idx, host, a.prefixlen)
                ip.route("add", dst="default" if f == 4 else "::/0", gateway=gw,
                         family=2 if f == 4 else 10)

    def _build_node(self, node_id: int) -> None:
        from pyroute2 import IPRoute

        ifs = self.ifaces
        vips = self.cluster_config.vips
        with IPRoute(netns=self.node_ns(node_id)) as ip:
            ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
            for role, mac in (("outside", vips.outside_mac), ("inside", vips.inside_mac)):
                idx = ip.link_lookup(ifname=ifs[role])[0]
                ip.link("set", index=idx, address=mac)
                ip.link("set", index=idx, state="up")
                for f in self.families:
                    a = self.addr(f)
                    _addr_add(ip, idx, a.outside_vip if role == "outside" else a.inside_vip,
                              a.prefixlen)
            for role in ("replication", "management"):
                idx = ip.link_lookup(ifname=ifs[role])[0]
                ip.link("set", index=idx, state="up")
                for f in self.families:
                    a = self.addr(f)
                    host = a.replication(node_id) if role == "replication" \
                        else a.management(node_id)
                    _addr_add(ip, idx, host, a.prefixlen)


def _addr_add(ip: Any, index: int, address: str, prefixlen: int) -> None:
    if ":" in address:
        # No DAD: every node carries the same VIP (and, with one MAC, the same link-local).
        ip.addr("add", index=index, address=address, prefixlen=prefixlen, flags=_IFA_F_NODAD)
    else:
        ip.addr("add", index=index, address=address, prefixlen=prefixlen)


def check_prefix(prefix: str) -> None:
    if not PREFIX_RE.match(prefix):
        raise LabError(f"lab name must match {PREFIX_RE.pattern} (lowercase, <= 12 chars), "
                       f"not {prefix!r}")


def exists(prefix: str, root: Path = LAB_ROOT) -> bool:
    """A lab is there if its state directory or any of its namespaces is."""
    return (root / prefix).exists() or bool(lab_namespaces(prefix))


def destroy(prefix: str, *, root: Path = LAB_ROOT) -> bool:
    """Tear lab ``prefix`` down (also a half-built one); False if nothing was there."""
    from pyroute2 import netns as pnetns

    check_prefix(prefix)
    names = lab_namespaces(prefix)
    directory = root / prefix
    if not names and not directory.exists():
        return False
    # Every process the lab starts runs in one of its namespaces: found by namespace, never by
    # a pid file (a stale pid may belong to someone else by now).
    # Several rounds: a supervisor (keepalived's parent, say) may respawn a child between the
    # scan and its own death; a process left in a namespace keeps it alive after the unmount.
    pids: list[int] = []
    for round_ in range(10):
        found = [p for ps in netns_pids(names).values() for p in ps if p != os.getpid()]
        if not found:
            break
        pids += found
        kill_pids(found, grace=1.0 if round_ == 0 else 0.2)
    for ns in names:
        with contextlib.suppress(OSError):
            pnetns.remove(ns)
    shutil.rmtree(directory, ignore_errors=True)
    remove_runtime_files(prefix)
    log.info("lab.down prefix=%s namespaces=%d processes=%d", prefix, len(names), len(pids))
    return True


def remove_runtime_files(prefix: str) -> None:
    """The lab's cluster is named after its prefix: its daemons' control sockets and locks and
    keepalived's notify FIFOs (/run/lbsync/<prefix>-<node>.{sock,lock,vrrp.fifo}; a SIGKILLed
    daemon leaves them)."""
    runtime = re.compile(rf"^{re.escape(prefix)}-\d+\.(sock|lock|vrrp\.fifo)$")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(RUN_DIR):
            if runtime.match(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
