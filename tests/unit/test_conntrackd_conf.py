"""The incumbent's conntrackd.conf renderer (pure)."""

from __future__ import annotations

import re

import pytest

from lbsync.config import ClusterConfig, parse_cluster
from lbsync.conntrackd import (
    conntrackd_argv,
    conntrackd_paths,
    equalise_scheduling_argv,
    render_conntrackd_conf,
)


def pair(n: int = 2, v6: bool = False) -> ClusterConfig:
    nodes = []
    for i in range(1, n + 1):
        repl = f"2001:db8:2::{i}" if v6 else f"198.18.2.{i}"
        nodes.append({"id": i, "name": f"fw{i}", "replication_address": repl,
                      "management_address": f"198.18.3.{i}"})
    return parse_cluster({"cluster": {"name": "inc"}, "nodes": nodes}, "<test>")


def section(text: str, name: str) -> str:
    """The body of the first ``name {`` block (nested blocks included)."""
    start = text.index(f"{name} {{")
    depth, i = 0, start
    while True:
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
        i += 1


def test_own_lock_socket_and_log_per_node() -> None:
    t1 = render_conntrackd_conf(pair(), 1, run_dir="/lab/run")
    t2 = render_conntrackd_conf(pair(), 2, run_dir="/lab/run")
    assert "LockFile /lab/run/conntrackd-1.lock" in t1
    assert "LockFile /lab/run/conntrackd-2.lock" in t2
    assert re.search(r"UNIX \{\n\s+Path /lab/run/conntrackd-1\.ctl\n", t1)
    assert "LogFile /lab/run/conntrackd-1.log" in t1 and "Syslog off" in t1
    assert conntrackd_paths("/lab/run", 2) == {"lock": "/lab/run/conntrackd-2.lock",
                                               "socket": "/lab/run/conntrackd-2.ctl",
                                               "log": "/lab/run/conntrackd-2.log"}
    assert "Mode FTFW" in t1


def test_udp_in_protocol_accept_and_addresses_ignored() -> None:
    text = render_conntrackd_conf(pair(), 1, run_dir="/r",
                                  ignore=["198.18.4.0/24", "198.18.0.2", "198.18.3.1"])
    accept = section(text, "Protocol Accept").split()
    assert {"TCP", "UDP"} <= set(accept)
    ignore = section(text, "Address Ignore")
    listed = re.findall(r"IPv[46]_address (\S+)", ignore)
    assert listed == ["127.0.0.1", "::1", "198.18.2.1", "198.18.3.1", "198.18.2.2",
                      "198.18.3.2", "198.18.4.0/24", "198.18.0.2"]  # duplicates once
    with pytest.raises(ValueError, match="not an address"):
        render_conntrackd_conf(pair(), 1, run_dir="/r", ignore=["eth0"])


def test_udp_channel_to_the_peer_on_the_replication_link() -> None:
    udp = section(render_conntrackd_conf(pair(), 2, run_dir="/r", port=3999), "UDP")
    assert "IPv4_address 198.18.2.2" in udp
    assert "IPv4_Destination_Address 198.18.2.1" in udp
    assert "Port 3999" in udp and "Interface repl0" in udp and "Checksum on" in udp
    udp6 = section(render_conntrackd_conf(pair(v6=True), 1, run_dir="/r"), "UDP")
    assert "IPv6_address 2001:db8:2::1" in udp6
    assert "IPv6_Destination_Address 2001:db8:2::2" in udp6


def test_multicast_channel() -> None:
    text = render_conntrackd_conf(pair(), 1, run_dir="/r", channel="multicast")
    mc = section(text, "Multicast")
    assert "IPv4_address 239.18.0.2" in mc and "IPv4_interface 198.18.2.1" in mc
    assert "Interface repl0" in mc and "Group 3780" in mc
    assert "UDP {" not in text
    with pytest.raises(ValueError, match="239"):
        render_conntrackd_conf(pair(), 1, run_dir="/r", channel="multicast", group="225.0.0.50")
    with pytest.raises(ValueError, match="IPv4"):
        render_conntrackd_conf(pair(v6=True), 1, run_dir="/r", channel="multicast")


def test_refusals() -> None:
    with pytest.raises(ValueError, match="two-party"):
        render_conntrackd_conf(pair(3), 1, run_dir="/r")
    with pytest.raises(KeyError):
        render_conntrackd_conf(pair(), 5, run_dir="/r")
    with pytest.raises(ValueError, match="path"):
        render_conntrackd_conf(pair(), 1, run_dir="/my run")
    with pytest.raises(ValueError, match="port"):
        render_conntrackd_conf(pair(), 1, run_dir="/r", port=0)


def test_scheduler_and_argv() -> None:
    text = render_conntrackd_conf(pair(), 1, run_dir="/r")
    assert re.search(r"Scheduler \{\n\s+Type RR\n\s+Priority 99\n", text)
    assert conntrackd_argv("/r/c.conf") == ["conntrackd", "-C", "/r/c.conf"]
    assert equalise_scheduling_argv(42) == ["chrt", "--all-tasks", "--rr", "--pid", "50", "42"]
    assert equalise_scheduling_argv(42, policy="other")[-2:] == ["0", "42"]
    # braces balance: conntrackd's parser would refuse anything else
    assert text.count("{") == text.count("}")
