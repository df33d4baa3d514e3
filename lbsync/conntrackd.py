"""conntrackd.conf for the incumbent in the lab (``lbsync lab up --mode vrrp``): conntrackd FTFW
between the two nodes of an active-backup pair, on their replication link.

What DESIGN section 3 found necessary to run it next to other instances on one host, all here:

- every node gets its own ``LockFile``, ``UNIX { Path }`` and log file, under ``run_dir`` and
  named after the node (a SIGKILLed conntrackd leaves its lock file behind: the lab removes it
  before a restart, as a reboot would; the notify script does it for a dead daemon);
- ``Protocol Accept`` lists UDP (the packaged example accepts only TCP, SCTP and DCCP);
- ``Address Ignore`` lists loopback, every node's replication and management addresses and
  whatever the caller adds (the lab's own per-node addresses, the VRRP subnets), so neither the
  sync traffic nor connections to the firewalls themselves are replicated (the sync traffic must
  also be ``notrack``ed in nftables: that is the lab's ruleset);
- the channel is unicast UDP to the peer's replication address (default) or multicast on the
  replication link (group in 239.0.0.0/8), with checksums;
- conntrackd 1.4.7 runs with SCHED_RR priority 99 even without a ``Scheduler`` block, and its
  parser knows only RR and FIFO: the file states RR 99 explicitly, and a comparison that wants
  both daemons at the same policy demotes the running process with
  :func:`equalise_scheduling_argv` (``chrt --rr 50``: lbsync's own default policy), measured to
  work here.

FTFW's reliable protocol is two-party (no sender id on the wire), hence exactly two nodes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lbsync.config import ClusterConfig

DEFAULT_PORT = 3780
DEFAULT_GROUP = "239.18.0.2"
PROTOCOLS = ("TCP", "UDP", "SCTP", "DCCP")
SOCKET_BUFFER = 4 * 1024 * 1024
NETLINK_BUFFER = 8 * 1024 * 1024
NETLINK_BUFFER_MAX = 64 * 1024 * 1024


def conntrackd_paths(run_dir: str, node_id: int) -> dict[str, str]:
    """The per-node files: ``lock``, ``socket`` (UNIX Path), ``log``."""
    d = Path(run_dir)
    return {"lock": str(d / f"conntrackd-{node_id}.lock"),
            "socket": str(d / f"conntrackd-{node_id}.ctl"),
            "log": str(d / f"conntrackd-{node_id}.log")}


def conntrackd_argv(conf_path: str, *, binary: str = "conntrackd") -> list[str]:
    """Run conntrackd in the foreground ("console mode") with this file."""
    return [binary, "-C", conf_path]


def equalise_scheduling_argv(pid: int, *, policy: str = "rr", priority: int = 50) -> list[str]:
    """Put a running conntrackd (all its threads) at lbsync's scheduling policy and priority
    (``[daemon]`` defaults: SCHED_RR 50), for like-for-like comparisons; ``policy`` "other"
    gives SCHED_OTHER (priority 0)."""
    if policy == "other":
        return ["chrt", "--all-tasks", "--other", "--pid", "0", str(pid)]
    return ["chrt", "--all-tasks", f"--{policy}", "--pid", str(priority), str(pid)]


def _ignore_line(entry: str) -> str:
    try:
        net = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(f"not an address or prefix: {entry!r}") from None
    text = str(net.network_address) if net.num_addresses == 1 else str(net)
    return f"IPv{net.version}_address {text}"


def render_conntrackd_conf(cfg: ClusterConfig, node_id: int, *, run_dir: str,
                           channel: Literal["udp", "multicast"] = "udp",
                           port: int = DEFAULT_PORT, group: str = DEFAULT_GROUP,
                           ignore: Sequence[str] = (), hash_limit: int = 262144) -> str:
    """conntrackd.conf (FTFW) for node ``node_id`` of a two-node cluster; pure."""
    if len(cfg.nodes) != 2:
        raise ValueError(f"conntrackd FTFW is two-party: the cluster has {len(cfg.nodes)} nodes")
    me = cfg.node(node_id)
    peer = next(n for n in cfg.nodes if n.id != node_id)
    mine = ipaddress.ip_address(me.replication_address)
    theirs = ipaddress.ip_address(peer.replication_address)
    if mine.version != theirs.version:
        raise ValueError("replication addresses of both nodes must be of one family")
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, not {port}")
    paths = conntrackd_paths(run_dir, node_id)
    v = mine.version
    if channel == "udp":
        chan = [
            "    UDP {",
            f"        IPv{v}_address {mine}",
            f"        IPv{v}_Destination_Address {theirs}",
            f"        Port {port}",
            f"        Interface {cfg.interfaces.replication}",
            f"        SndSocketBuffer {SOCKET_BUFFER}",
            f"        RcvSocketBuffer {SOCKET_BUFFER}",
            "        Checksum on",
            "    }",
        ]
    elif channel == "multicast":
        grp = ipaddress.ip_address(group)
        if v != 4 or grp not in ipaddress.ip_network("239.0.0.0/8"):
            raise ValueError(f"multicast needs IPv4 and a group in 239.0.0.0/8, not {group}")
        chan = [
            "    Multicast {",
            f"        IPv4_address {grp}",
            f"        Group {port}",
            f"        IPv4_interface {mine}",
            f"        Interface {cfg.interfaces.replication}",
            f"        SndSocketBuffer {SOCKET_BUFFER}",
            f"        RcvSocketBuffer {SOCKET_BUFFER}",
            "        Checksum on",
            "    }",
        ]
    else:
        raise ValueError(f"channel must be udp or multicast, not {channel!r}")
    ignored = ["127.0.0.1", "::1"]
    for n in cfg.nodes:
        ignored += [a for a in (n.replication_address, n.management_address) if a]
    ignored += list(ignore)
    lines: list[str] = []
    for entry in ignored:
        line = _ignore_line(entry)
        if line not in lines:
            lines.append(line)
    for path in paths.values():
        if any(c.isspace() or c in '"{}#' for c in path):
            raise ValueError(f"conntrackd cannot take this path: {path!r}")
    out = [
        f"# conntrackd.conf (FTFW) for the incumbent lab, cluster {cfg.cluster.name!r}, "
        f"node {node_id}, peer {peer.id}:",
        "# rendered by lbsync.conntrackd.render_conntrackd_conf; do not edit.",
        "Sync {",
        "    Mode FTFW {",
        "        DisableExternalCache Off",
        "    }",
        *chan,
        "}",
        "General {",
        "    Systemd off",
        "    HashSize 32768",
        f"    HashLimit {hash_limit}",
        f"    LogFile {paths['log']}",
        "    Syslog off",
        f"    LockFile {paths['lock']}",
        "    UNIX {",
        f"        Path {paths['socket']}",
        "    }",
        "    Scheduler {",
        "        Type RR",
        "        Priority 99",
        "    }",
        f"    NetlinkBufferSize {NETLINK_BUFFER}",
        f"    NetlinkBufferSizeMaxGrowth {NETLINK_BUFFER_MAX}",
        "    NetlinkOverrunResync On",
        "    Filter From Userspace {",
        "        Protocol Accept {",
        *(f"            {p}" for p in PROTOCOLS),
        "        }",
        "        Address Ignore {",
        *(f"            {line}" for line in lines),
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(out) + "\n"
