"""The nftables datapath: render ``table inet lbsync`` from the cluster config, and the
``lbsync datapath render|apply|show|diff`` commands.

:func:`render_ruleset` is pure and deterministic: the same config gives the same text, on every
node (the node id only appears in the header comment). What the ruleset does, hook by hook
(docs/datapath.md explains each rule and what was verified):

- ``raw_prerouting`` / ``raw_output`` (priority raw): replication datagrams (UDP
  ``replication.port`` on the replication interface) are not tracked.
- ``prerouting`` (filter, priority mangle: after conntrack at -200, before DNAT at -100), for
  packets on the two cluster interfaces only: ``ct state invalid`` is dropped; a NEW connection
  gets its bucket written into the ct mark, hashed from the OUTSIDE endpoint (source on the
  outside interface, destination on the inside interface; address and port for TCP/UDP,
  address only otherwise), so both directions of a flow land in the same bucket on every node
  (the key expression is :func:`hashing.jhash.nft_jhash_expr`, whose value
  ``hashing.jhash.bucket_of`` reproduces); a packet whose bucket is not in ``@owned`` is
  dropped, after ``ct event set 0`` silences the events of its entry; owned packets restore
  the full event mask.
- ``input``: NEW TCP/UDP arriving on a cluster interface for a local (shared) address is
  dropped, so non-owners' own stacks never reset flows they do not own.
- ``dstnat`` (priority dstnat): DNAT rules, for flows arriving on the outside interface.
- ``srcnat`` (priority srcnat): ingress SNAT jumps through ``ct mark vmap`` to one chain per
  bucket (``snat<R>_b<B>``) holding that bucket's own port slice; egress SNAT uses the full
  port range.
- ``set owned { type mark; flags timeout; }`` is always rendered empty: ownership is the
  daemon's, and the daemon gives its elements its majority lease as timeout (self-fencing).

- ``output`` (priority mangle) and the first rule of ``prerouting``: the node's own connections
  (opened by it, or arriving on any other interface) get ct mark ``LOCAL_MARK`` (0xffffffff),
  which is never a bucket.

The ct mark value IS the bucket number (0..B-1) for forwarded flows; the ct mark belongs to
lbsync.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import sys
from dataclasses import dataclass
from typing import Any, Literal

from hashing.jhash import nft_jhash_expr
from lbsync import nft
from lbsync.config import (
    DEFAULT_CLUSTER_FILE,
    ClusterConfig,
    ConfigError,
    NatRule,
    bucket_port_range,
    load_cluster,
    load_node_id,
    parse_port_range,
    split_host_port,
)

Family = Literal[4, 6]

FAMILIES: tuple[Family, ...] = (4, 6)
_NFPROTO = {4: "ipv4", 6: "ipv6"}
_IPKW = {4: "ip", 6: "ip6"}
_L4 = "{ tcp, udp }"

# ct event bits new..synproxy (0x001..0x800): the full mask, written as a number because nft
# 1.0.6 rejects some of the names (DESIGN section 4).
CT_EVENTS_ALL = 0xFFF

# The ct mark of the node's own connections (replication peer control, management, VRRP...):
# never a bucket (buckets are 0..4095), so owners neither replicate them (the event filter
# passes owned marks only) nor treat them as standby copies. Without it they kept mark 0 and
# looked like bucket 0's flows.
LOCAL_MARK = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# The ruleset model


@dataclass(frozen=True, slots=True)
class Chain:
    """One chain: ``base`` is ``(type, hook, priority)`` for a base chain, None otherwise."""

    name: str
    rules: tuple[str, ...]
    base: tuple[str, str, str] | None = None


def _q(name: str) -> str:
    return f'"{name}"'


def _ifset(names: tuple[str, ...]) -> str:
    uniq = sorted(set(names))
    if len(uniq) == 1:
        return _q(uniq[0])
    return "{ " + ", ".join(_q(n) for n in uniq) + " }"


def _family_of(rule: NatRule) -> Family:
    host, _port = split_host_port(rule.to)
    return 4 if ipaddress.ip_address(host).version == 4 else 6


def _nat_addr(family: Family, host: str, ports: tuple[int, int] | None) -> str:
    addr = host if family == 4 else f"[{host}]"
    if ports is None:
        return addr
    lo, hi = ports
    return f"{addr}:{lo}-{hi}" if lo != hi else f"{addr}:{lo}"


def _matches(rule: NatRule, family: Family) -> str:
    """The rule's match expressions (address family always pinned)."""
    ipkw = _IPKW[family]
    parts = [f"meta nfproto {_NFPROTO[family]}"]
    if rule.match_saddr:
        parts.append(f"{ipkw} saddr {ipaddress.ip_network(rule.match_saddr, strict=False)}")
    if rule.match_daddr:
        parts.append(f"{ipkw} daddr {ipaddress.ip_network(rule.match_daddr, strict=False)}")
    if rule.match_proto:
        parts.append(f"meta l4proto {rule.match_proto}")
        if rule.match_dport:
            parts.append(f"th dport {rule.match_dport}")
    return " ".join(parts)


def _raw_chains(cfg: ClusterConfig) -> list[Chain]:
    repl = _q(cfg.interfaces.replication)
    port = cfg.replication.port
    pre = tuple(f"iifname {repl} udp {d}port {port} notrack" for d in ("d", "s"))
    out = tuple(f"oifname {repl} udp {d}port {port} notrack" for d in ("d", "s"))
    return [Chain("raw_prerouting", pre, ("filter", "prerouting", "raw")),
            Chain("raw_output", out, ("filter", "output", "raw"))]


def _stamp_rules(cfg: ClusterConfig) -> list[str]:
    c = cfg.cluster
    rules = []
    for side in ("outside", "inside"):
        iface = _q(getattr(cfg.interfaces, side))
        for family in FAMILIES:
            for l4 in (True, False):
                proto = f"meta l4proto {_L4}" if l4 else f"meta l4proto != {_L4}"
                key = nft_jhash_expr(family, side, l4, c.buckets, c.hash_seed)
                rules.append(f"ct state new iifname {iface} meta nfproto {_NFPROTO[family]} "
                             f"{proto} ct mark set {key}")
    return rules


def _prerouting_chain(cfg: ClusterConfig) -> Chain:
    cluster = _ifset((cfg.interfaces.outside, cfg.interfaces.inside))
    rules = [
        f"iifname != {cluster} ct state new ct mark set 0x{LOCAL_MARK:x}",
        f"iifname != {cluster} accept",
        "ct state invalid drop",
        *_stamp_rules(cfg),
        f"ct mark != @{nft.OWNED_SET} ct event set 0 drop",
        f"ct event set 0x{CT_EVENTS_ALL:x}",
    ]
    return Chain("prerouting", tuple(rules), ("filter", "prerouting", "mangle"))


def _output_chain() -> Chain:
    # connections this node opens itself (priority mangle: conntrack has seen the packet)
    return Chain("output", (f"ct state new ct mark set 0x{LOCAL_MARK:x}",),
                 ("filter", "output", "mangle"))


def _input_chain(cfg: ClusterConfig) -> Chain:
    cluster = _ifset((cfg.interfaces.outside, cfg.interfaces.inside))
    rule = f"iifname {cluster} ct state new meta l4proto {_L4} fib daddr type local drop"
    return Chain("input", (rule,), ("filter", "input", "filter"))


def _dnat_rules(cfg: ClusterConfig) -> list[str]:
    outside = _q(cfg.interfaces.outside)
    rules = []
    for rule in cfg.nat:
        if rule.kind != "dnat":
            continue
        family = _family_of(rule)
        host, port = split_host_port(rule.to)
        target = _nat_addr(family, host, (port, port) if port else None)
        # A port mapping needs a transport protocol in the same rule.
        l4 = f" meta l4proto {_L4}" if port and not rule.match_proto else ""
        rules.append(f"iifname {outside} {_matches(rule, family)}{l4} "
                     f"dnat {_IPKW[family]} to {target}")
    return rules


def _snat_chains(cfg: ClusterConfig) -> tuple[list[str], list[Chain]]:
    """The srcnat rules and the per-bucket chains of ingress SNAT."""
    outside, inside = _q(cfg.interfaces.outside), _q(cfg.interfaces.inside)
    buckets = cfg.cluster.buckets
    rules: list[str] = []
    chains: list[Chain] = []
    for index, rule in enumerate(cfg.nat):
        if rule.kind == "dnat":
            continue
        family = _family_of(rule)
        host, _port = split_host_port(rule.to)
        snat = f"snat {_IPKW[family]} to"
        if rule.kind == "ingress_snat":
            head = f"iifname {outside} oifname {inside} {_matches(rule, family)}"
        else:
            head = f"iifname {inside} oifname {outside} {_matches(rule, family)}"
        l4 = "" if rule.match_proto else f" meta l4proto {_L4}"
        if rule.kind == "ingress_snat":
            names = [f"snat{index}_b{b}" for b in range(buckets)]
            vmap = ", ".join(f"{b} : jump {n}" for b, n in enumerate(names))
            rules.append(f"{head}{l4} ct mark vmap {{ {vmap} }}")
            for b, name in enumerate(names):
                ports = bucket_port_range(rule, buckets, b)
                body = f"meta l4proto {rule.match_proto or _L4} {snat} " \
                       f"{_nat_addr(family, host, ports)}"
                chains.append(Chain(name, (body,)))
        else:
            ports = parse_port_range(rule.ports)
            rules.append(f"{head}{l4} {snat} {_nat_addr(family, host, ports)}")
        if not rule.match_proto:
            # Other protocols (ICMP...) have no ports to split: address only.
            rules.append(f"{head} meta l4proto != {_L4} {snat} {_nat_addr(family, host, None)}")
    return rules, chains


def build_chains(cfg: ClusterConfig) -> tuple[Chain, ...]:
    """Every chain of the ruleset, in rendering order."""
    snat_rules, bucket_chains = _snat_chains(cfg)
    return (
        *_raw_chains(cfg),
        _prerouting_chain(cfg),
        _input_chain(cfg),
        _output_chain(),
        Chain("dstnat", tuple(_dnat_rules(cfg)), ("nat", "prerouting", "dstnat")),
        Chain("srcnat", tuple(snat_rules), ("nat", "postrouting", "srcnat")),
        *bucket_chains,
    )


def render_ruleset(cfg: ClusterConfig, node_id: int) -> str:
    """The complete ``table inet lbsync`` for ``node_id`` (pure, deterministic).

    Its ``set owned`` is always empty: load it with :func:`lbsync.nft.apply_ruleset`, which
    keeps the kernel's elements.
    """
    if node_id not in cfg.node_ids:
        raise ConfigError("--node-id", "node_id",
                          f"{node_id} is not a node of cluster {cfg.cluster.name!r}")
    c = cfg.cluster
    lines = [
        f"# lbsync datapath: cluster {c.name!r}, node {node_id}, {c.buckets} buckets, "
        f"seed 0x{c.hash_seed:x}.",
        "# Generated by `lbsync datapath render`; install with `lbsync datapath apply`, which",
        "# replaces chains atomically and keeps the elements of @owned (the daemon's).",
        f"table {nft.FAMILY} {nft.TABLE} {{",
        f"\tset {nft.OWNED_SET} {{",
        "\t\ttype mark",
        # Elements carry the daemon's lease as their timeout (self-fencing: a hung daemon's
        # node stops forwarding by itself); elements added without a timeout never expire.
        "\t\tflags timeout",
        "\t}",
    ]
    for chain in build_chains(cfg):
        lines.append("")
        lines.append(f"\tchain {chain.name} {{")
        if chain.base is not None:
            ctype, hook, prio = chain.base
            lines.append(f"\t\ttype {ctype} hook {hook} priority {prio}; policy accept;")
        lines.extend(f"\t\t{r}" for r in chain.rules)
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# CLI


def register(sub: Any) -> None:
    p = sub.add_parser("datapath", help="render, install, show or compare the nftables datapath")
    dsub = p.add_subparsers(dest="datapath_command", metavar="ACTION", parser_class=type(p))
    dsub.required = True
    specs = [
        ("render", "print the ruleset rendered from the config", True, _render),
        ("apply", "install the rendered ruleset (keeps @owned)", True, _apply),
        ("show", "print the kernel's current table inet lbsync", False, _show),
        ("diff", "compare the rendered ruleset with the kernel's (exit 1 if they differ)",
         True, _diff),
    ]
    for name, text, needs_config, func in specs:
        a = dsub.add_parser(name, help=text)
        if needs_config:
            a.add_argument("--config", default=str(DEFAULT_CLUSTER_FILE), metavar="FILE",
                           help="cluster file (default %(default)s)")
            a.add_argument("--node-id", type=int, default=None, metavar="N",
                           help="this node's id (default: from /etc/lbsync/node.toml)")
        if name != "render":
            a.add_argument("--netns", default=None, metavar="NAME",
                           help="run nft in this network namespace (the lab)")
        a.set_defaults(func=func)


def _usage(message: str) -> Exception:
    from lbsync.cli import UsageError  # lbsync.cli imports this module: import late

    return UsageError(message)


def _rendered(args: argparse.Namespace) -> str:
    cfg = load_cluster(args.config)
    node_id = load_node_id(cfg, args.node_id)
    return render_ruleset(cfg, node_id)


def _netns(args: argparse.Namespace) -> str | None:
    name: str | None = args.netns
    if name is None:
        return None
    if not nft.NETNS_RE.match(name):
        raise _usage(f"--netns: not a network namespace name: {name!r}")
    if not (nft.NETNS_DIR / name).exists():
        raise _usage(f"--netns: no network namespace {name!r}")
    return name


def _fail(exc: nft.NftError) -> int:
    sys.stderr.write(f"lbsync: error: {exc}\n")
    return 1


def _render(args: argparse.Namespace) -> int:
    sys.stdout.write(_rendered(args))
    return 0


def _apply(args: argparse.Namespace) -> int:
    text = _rendered(args)
    netns = _netns(args)
    try:
        nft.apply_ruleset(text, netns)
        owned = nft.list_owned(netns)
    except nft.NftError as exc:
        return _fail(exc)
    chains, _sets = nft.declared_objects(text)
    print(f"applied table {nft.FAMILY} {nft.TABLE}: {len(chains)} chains; "
          f"@{nft.OWNED_SET} kept {len(owned)} buckets")
    return 0


def _show(args: argparse.Namespace) -> int:
    netns = _netns(args)
    try:
        listing = nft.list_table(netns)
    except nft.NftError as exc:
        return _fail(exc)
    if listing is None:
        sys.stderr.write(f"lbsync: no table {nft.FAMILY} {nft.TABLE}\n")
        return 1
    sys.stdout.write(listing)
    return 0


def diff_listings(rendered: str, kernel: str | None) -> list[str]:
    """Unified diff lines between two terse listings (empty when they are equal)."""
    return list(difflib.unified_diff(
        rendered.splitlines(keepends=True),
        (kernel or "").splitlines(keepends=True),
        fromfile="rendered", tofile="kernel" if kernel is not None else "kernel (no table)"))


def _diff(args: argparse.Namespace) -> int:
    text = _rendered(args)
    netns = _netns(args)
    try:
        # Both sides through the kernel's own formatter, without set elements (@owned's are
        # the daemon's): the rendered text via a throwaway namespace, the live one as it is.
        rendered = nft.canonical_listing(text)
        kernel = nft.list_table(netns, terse=True)
    except nft.NftError as exc:
        return _fail(exc)
    if kernel is not None:
        kernel = nft.aligned_listing(kernel, list(nft.listing_blocks(rendered)))
    lines = diff_listings(rendered, kernel)
    if not lines:
        print(f"table {nft.FAMILY} {nft.TABLE}: kernel matches the rendered ruleset")
        return 0
    sys.stdout.writelines(lines)
    return 1
