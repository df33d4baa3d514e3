"""The lab farm's pure parts: address plan, generated cluster file, split, conntrack parsing."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbsync.config import ConfigError, load_cluster, parse_cluster
from lbsync.lab import farm
from lbsync.lab.farm import Lab, LabError


def make_lab(tmp_path: Path, *, nodes: int = 3, ipv6: bool = True, buckets: int = 64,
             prefix: str = "lbtu") -> Lab:
    data = farm.cluster_dict(prefix, nodes, ipv6=ipv6, buckets=buckets, directory=tmp_path)
    cfg = parse_cluster(data, "test")
    split, method = farm.initial_split(cfg)
    return Lab(prefix=prefix, nodes=nodes, ipv6=ipv6, buckets=buckets, directory=tmp_path,
               cluster_config=cfg, split=split, created=0.0, split_method=method)


def test_address_plan() -> None:
    a4, a6 = farm.addresses(4), farm.addresses(6)
    assert (a4.outside_vip, a4.client, a4.inside_vip, a4.server) == \
        ("198.18.0.1", "198.18.0.100", "198.18.1.1", "198.18.1.10")
    assert (a4.replication(2), a4.management(3)) == ("198.18.2.2", "198.18.3.3")
    assert (a6.outside_vip, a6.client, a6.inside_vip, a6.server) == \
        ("2001:db8::1", "2001:db8::100", "2001:db8:0:1::1", "2001:db8:0:1::10")
    assert a6.replication(1) == "2001:db8:0:2::1"
    for a in (a4, a6):
        nets = [ipaddress.ip_network(n) for n in (a.outside_net, a.inside_net,
                                                   a.replication_net, a.management_net)]
        # Only the test ranges, four distinct segments.
        test_range = ipaddress.ip_network("198.18.0.0/15" if a.family == 4 else "2001:db8::/32")
        assert all(n.subnet_of(test_range) for n in nets)  # type: ignore[arg-type]
        assert len(set(nets)) == 4
    with pytest.raises(ValueError):
        farm.addresses(5)


@pytest.mark.parametrize("ipv6", [False, True])
def test_generated_cluster_file_round_trips_through_the_loader(tmp_path: Path,
                                                               ipv6: bool) -> None:
    data = farm.cluster_dict("lbtu", 3, ipv6=ipv6, buckets=256, directory=tmp_path)
    text = farm.to_toml(data)
    assert tomllib.loads(text) == data
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    cfg = load_cluster(path)
    assert cfg == parse_cluster(data, "x")
    assert cfg.cluster.name == "lbtu" and cfg.node_ids == (1, 2, 3)
    kinds = sorted(r.kind for r in cfg.nat)
    per_family = ["dnat", "dnat", "egress_snat", "ingress_snat", "ingress_snat"]
    assert kinds == sorted(per_family * (2 if ipv6 else 1))
    assert len(cfg.vips.outside) == (2 if ipv6 else 1)


def test_to_toml_values() -> None:
    text = farm.to_toml({"a": 1, "b": "x\"y", "c": True, "d": ["p", "q"], "e": 1.5,
                         "t": {"k": 2}, "arr": [{"x": 1}, {"x": 2}]})
    assert tomllib.loads(text) == {"a": 1, "b": "x\"y", "c": True, "d": ["p", "q"],
                                   "e": 1.5, "t": {"k": 2}, "arr": [{"x": 1}, {"x": 2}]}
    with pytest.raises(TypeError):
        farm.to_toml({"a": object()})


def test_bad_bucket_counts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.buckets"):
        parse_cluster(farm.cluster_dict("lbtu", 3, ipv6=False, buckets=0), "lab")
    with pytest.raises(ConfigError, match="min_ports_per_bucket"):
        parse_cluster(farm.cluster_dict("lbtu", 3, ipv6=False, buckets=2000), "lab")


@given(nodes=st.integers(1, 16), buckets=st.integers(1, 1000))
def test_initial_split_partitions_the_buckets(nodes: int, buckets: int) -> None:
    cfg = parse_cluster(farm.cluster_dict("lbtu", nodes, ipv6=False, buckets=buckets,
                                          nat=()), "x")
    split, _method = farm.initial_split(cfg)
    assert set(split) == set(range(1, nodes + 1))
    flat = sorted(b for bs in split.values() for b in bs)
    assert flat == list(range(buckets))
    sizes = [len(bs) for bs in split.values()]
    assert max(sizes) - min(sizes) <= 1


def test_lab_names(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, nodes=3)
    assert lab.node_ns(2) == "lbtu-n2"
    assert lab.resolve_ns("2") == lab.resolve_ns("n2") == lab.resolve_ns("lbtu-n2") == "lbtu-n2"
    assert lab.resolve_ns("cli") == "lbtu-cli" and lab.resolve_ns("hubr") == "lbtu-hubr"
    assert len(lab.namespaces) == 9 and len(set(lab.namespaces)) == 9
    for bad in ("4", "n0", "x", "lbtu-n9"):
        with pytest.raises(LabError, match="no namespace"):
            lab.resolve_ns(bad)
    with pytest.raises(LabError, match="no node 4"):
        lab.node_ns(4)
    with pytest.raises(LabError, match="IPv6"):
        make_lab(tmp_path, ipv6=False).addr(6)
    state = lab.state()
    assert state["namespaces"]["nodes"]["3"] == "lbtu-n3"
    assert sorted(b for bs in state["split"].values() for b in bs) == list(range(64))


@pytest.mark.parametrize("prefix", ["", "Lbs", "1ab", "a-b", "abcdefghijklm", "lbs/x"])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(LabError, match="lab name"):
        farm.check_prefix(prefix)


def test_lab_load_errors(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="no lab named 'nolab'"):
        Lab.load("nolab", root=tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / farm.LAB_FILE).write_text("{")
    with pytest.raises(LabError, match="not valid JSON"):
        Lab.load("broken", root=tmp_path)


CT_SAMPLE = """\
ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.0.100 dst=198.18.1.10 sport=55052 \
dport=5002 packets=4 bytes=216 src=198.18.1.10 dst=198.18.1.1 sport=5002 dport=24883 \
packets=2 bytes=112 [ASSURED] mark=94 use=1
ipv4     2 udp      17 29 src=198.18.1.10 dst=198.18.0.100 sport=40000 dport=6000 \
[UNREPLIED] src=198.18.0.100 dst=198.18.0.1 sport=6000 dport=40000 mark=7 use=1
ipv6     10 udp      17 119 src=2001:db8::100 dst=2001:db8:0:1::10 sport=1 dport=5001 \
packets=3 bytes=1 src=2001:db8:0:1::10 dst=2001:db8::100 sport=5001 dport=1 packets=3 \
bytes=1 [ASSURED] mark=255 zone=3 use=1
ipv4     2 icmp     1 29 src=198.18.0.100 dst=198.18.1.10 type=8 code=0 id=7 \
src=198.18.1.10 dst=198.18.0.100 type=0 code=0 id=7 mark=3 use=1
conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.
garbage line
"""


def test_parse_conntrack() -> None:
    entries = farm.parse_conntrack(CT_SAMPLE)
    assert len(entries) == 4
    tcp, udp, udp6, icmp = entries
    assert (tcp.family, tcp.proto, tcp.state, tcp.mark, tcp.flags) == \
        (4, "tcp", "ESTABLISHED", 94, ("ASSURED",))
    assert tcp.orig == farm.CtTuple("198.18.0.100", "198.18.1.10", 55052, 5002, 4, 216)
    assert tcp.reply == farm.CtTuple("198.18.1.10", "198.18.1.1", 5002, 24883, 2, 112)
    assert udp.state == "" and udp.flags == ("UNREPLIED",) and udp.orig.packets is None
    assert udp.reply.dst == "198.18.0.1" and udp.mark == 7
    assert udp6.family == 6 and udp6.mark == 255 and udp6.reply.packets == 3
    assert icmp.proto == "icmp" and icmp.orig.sport is None and icmp.mark == 3


def test_flow_key_normalises_addresses() -> None:
    assert farm.flow_key("udp", "2001:db8:0:0::100", 1, "2001:0db8::1", 2) == \
        ("udp", "2001:db8::100", 1, "2001:db8::1", 2)
