"""The datapath renderer (pure), the nft adapter's text builders, the CLI's user errors, and
``config check``'s refusal of ingress-SNAT port plans that leave a bucket too few ports."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hashing.jhash import nft_jhash_expr
from lbsync import nft
from lbsync.config import (
    ClusterConfig,
    ConfigError,
    bucket_port_range,
    parse_cluster,
    parse_port_range,
)
from lbsync.datapath import build_chains, diff_listings, render_ruleset

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "cluster.toml"


def example_data() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text())


def small(buckets: int = 4, **cluster: Any) -> dict[str, Any]:
    d = example_data()
    d["cluster"].update(buckets=buckets, **cluster)
    return d


def v6_data() -> dict[str, Any]:
    """Example plus IPv6 NAT of every kind."""
    d = small(8)
    d["nat"] += [
        {"kind": "ingress_snat", "match_daddr": "2001:db8:0:2::10/128", "to": "2001:db8:0:2::1",
         "ports": "2000-2799"},
        {"kind": "egress_snat", "match_saddr": "2001:db8:0:2::/64", "to": "2001:db8:0:1::1"},
        {"kind": "dnat", "match_daddr": "2001:db8:0:1::1/128", "match_proto": "udp",
         "match_dport": 53, "to": "[2001:db8:0:2::10]:5353"},
    ]
    return d


def chain_body(text: str, name: str) -> list[str]:
    m = re.search(rf"^\tchain {re.escape(name)} {{\n(.*?)^\t}}", text, re.M | re.S)
    assert m, f"chain {name} not rendered"
    return [line.strip() for line in m.group(1).splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Renderer


def test_render_is_deterministic_and_node_independent_but_for_the_header() -> None:
    cfg = parse_cluster(example_data())
    a, b, c = render_ruleset(cfg, 1), render_ruleset(cfg, 1), render_ruleset(cfg, 2)
    assert a == b
    strip = [line for line in a.splitlines() if not line.startswith("#")]
    assert strip == [line for line in c.splitlines() if not line.startswith("#")]
    assert "node 1" in a.splitlines()[0] and "node 2" in c.splitlines()[0]


def test_render_rejects_a_node_not_in_the_cluster() -> None:
    cfg = parse_cluster(example_data())
    with pytest.raises(ConfigError, match="9 is not a node"):
        render_ruleset(cfg, 9)


def test_owned_set_is_always_empty() -> None:
    text = render_ruleset(parse_cluster(v6_data()), 3)
    m = re.search(r"^\tset owned {\n(.*?)^\t}", text, re.M | re.S)
    assert m and [x.strip() for x in m.group(1).splitlines()] == ["type mark", "flags timeout"]
    assert "elements =" not in text


def test_prerouting_order_guards_stamp_then_ownership() -> None:
    text = render_ruleset(parse_cluster(small(16, hash_seed=0x1234)), 1)
    body = chain_body(text, "prerouting")
    assert body[0] == "type filter hook prerouting priority mangle; policy accept;"
    # the node's own connections: a mark that is never a bucket, then out of the datapath
    assert body[1] == 'iifname != { "inside0", "outside0" } ct state new ct mark set 0xffffffff'
    assert body[2] == 'iifname != { "inside0", "outside0" } accept'
    assert chain_body(text, "output")[1:] == ["ct state new ct mark set 0xffffffff"]
    body = body[1:]
    assert body[2] == "ct state invalid drop"
    stamps = body[3:11]
    assert all(r.startswith("ct state new iifname ") and " ct mark set jhash " in r
               for r in stamps)
    # The bucket is the outside endpoint: source on the outside, destination on the inside.
    expected = []
    for side, iface in (("outside", "outside0"), ("inside", "inside0")):
        for fam, proto in ((4, "ipv4"), (6, "ipv6")):
            for l4, sel in ((True, "meta l4proto { tcp, udp }"),
                            (False, "meta l4proto != { tcp, udp }")):
                expected.append(f'ct state new iifname "{iface}" meta nfproto {proto} {sel} '
                                f"ct mark set {nft_jhash_expr(fam, side, l4, 16, 0x1234)}")
    assert stamps == expected
    assert "jhash ip saddr . th sport mod 16 seed 0x1234" in stamps[0]
    assert "jhash ip6 daddr mod 16 seed 0x1234" in stamps[7]
    # Non-owned: events silenced, then dropped; owned: full event mask restored.
    assert body[11] == "ct mark != @owned ct event set 0 drop"
    assert body[12] == "ct event set 0xfff"
    assert len(body) == 13


def test_guards_and_notrack() -> None:
    d = small()
    d["replication"]["port"] = 9999
    d["interfaces"]["replication"] = "sync7"
    text = render_ruleset(parse_cluster(d), 1)
    assert chain_body(text, "input")[1:] == [
        'iifname { "inside0", "outside0" } ct state new meta l4proto { tcp, udp } '
        "fib daddr type local drop"]
    assert chain_body(text, "raw_prerouting") == [
        "type filter hook prerouting priority raw; policy accept;",
        'iifname "sync7" udp dport 9999 notrack', 'iifname "sync7" udp sport 9999 notrack']
    assert chain_body(text, "raw_output")[1:] == [
        'oifname "sync7" udp dport 9999 notrack', 'oifname "sync7" udp sport 9999 notrack']


@pytest.mark.parametrize("buckets", [1, 4, 64, 252])
def test_ingress_snat_one_chain_per_bucket_with_its_own_port_slice(buckets: int) -> None:
    cfg = parse_cluster(small(buckets))
    rule = cfg.nat[0]
    text = render_ruleset(cfg, 1)
    srcnat = chain_body(text, "srcnat")
    vmap = re.search(r"ct mark vmap \{ (.*) \}", srcnat[1])
    assert vmap and srcnat[1].startswith(
        'iifname "outside0" oifname "inside0" meta nfproto ipv4 ip daddr 198.18.1.10/32 '
        "meta l4proto tcp th dport 5002 ct mark vmap")
    entries = vmap.group(1).split(", ")
    assert entries == [f"{b} : jump snat0_b{b}" for b in range(buckets)]
    lo, hi = parse_port_range(rule.ports)
    seen: set[int] = set()
    for b in range(buckets):
        blo, bhi = bucket_port_range(rule, buckets, b)
        assert chain_body(text, f"snat0_b{b}") == [
            f"meta l4proto tcp snat ip to 198.18.1.1:{blo}-{bhi}"]
        ports = set(range(blo, bhi + 1))
        assert not ports & seen and lo <= blo <= bhi <= hi
        assert len(ports) >= cfg.cluster.min_ports_per_bucket
        seen |= ports
    assert f"snat0_b{buckets}" not in text


def test_egress_snat_full_range_and_address_only_for_other_protocols() -> None:
    text = render_ruleset(parse_cluster(small(64)), 1)
    srcnat = chain_body(text, "srcnat")
    assert srcnat[2:] == [
        'iifname "inside0" oifname "outside0" meta nfproto ipv4 ip saddr 198.18.1.0/24 '
        "meta l4proto { tcp, udp } snat ip to 198.18.0.1:1024-65535",
        'iifname "inside0" oifname "outside0" meta nfproto ipv4 ip saddr 198.18.1.0/24 '
        "meta l4proto != { tcp, udp } snat ip to 198.18.0.1",
    ]
    assert chain_body(text, "dstnat")[1:] == [
        'iifname "outside0" meta nfproto ipv4 ip daddr 198.18.0.1/32 meta l4proto tcp '
        "th dport 8080 dnat ip to 198.18.1.10:5003"]


def test_ipv6_nat() -> None:
    cfg = parse_cluster(v6_data())
    text = render_ruleset(cfg, 1)
    srcnat = chain_body(text, "srcnat")
    assert any(r.startswith('iifname "outside0" oifname "inside0" meta nfproto ipv6 '
                            "ip6 daddr 2001:db8:0:2::10/128 meta l4proto { tcp, udp } "
                            "ct mark vmap { 0 : jump snat3_b0,") for r in srcnat)
    # any protocol: ICMPv6 is translated address-only
    assert ('iifname "outside0" oifname "inside0" meta nfproto ipv6 ip6 daddr '
            "2001:db8:0:2::10/128 meta l4proto != { tcp, udp } snat ip6 to [2001:db8:0:2::1]"
            in srcnat)
    assert chain_body(text, "snat3_b7") == [
        "meta l4proto { tcp, udp } snat ip6 to [2001:db8:0:2::1]:2700-2799"]
    assert ('iifname "inside0" oifname "outside0" meta nfproto ipv6 ip6 saddr 2001:db8:0:2::/64 '
            "meta l4proto { tcp, udp } snat ip6 to [2001:db8:0:1::1]:1024-65535" in srcnat)
    assert ('iifname "outside0" meta nfproto ipv6 ip6 daddr 2001:db8:0:1::1/128 meta l4proto udp '
            "th dport 53 dnat ip6 to [2001:db8:0:2::10]:5353" in chain_body(text, "dstnat"))


def test_dnat_port_without_protocol_match_pins_tcp_udp() -> None:
    d = small()
    d["nat"] = [{"kind": "dnat", "match_daddr": "198.18.0.1/32", "to": "198.18.1.10:80"}]
    text = render_ruleset(parse_cluster(d), 1)
    assert chain_body(text, "dstnat")[1:] == [
        'iifname "outside0" meta nfproto ipv4 ip daddr 198.18.0.1/32 meta l4proto { tcp, udp } '
        "dnat ip to 198.18.1.10:80"]
    assert chain_body(text, "srcnat")[1:] == []


def test_declared_objects_reads_the_rendering() -> None:
    cfg = parse_cluster(small(4))
    chains, sets = nft.declared_objects(render_ruleset(cfg, 1))
    assert sets == [("set", "owned")]
    names = [c.name for c in chains]
    assert names == [c.name for c in build_chains(cfg)]
    by = {c.name: c for c in chains}
    assert by["raw_prerouting"] == nft.ChainSpec("raw_prerouting", "filter", "prerouting", -300)
    assert by["prerouting"].priority == -150
    assert by["dstnat"] == nft.ChainSpec("dstnat", "nat", "prerouting", -100)
    assert by["srcnat"] == nft.ChainSpec("srcnat", "nat", "postrouting", 100)
    assert by["input"].priority == 0
    assert by["snat0_b3"] == nft.ChainSpec("snat0_b3")


# --------------------------------------------------------------------------------------------
# The adapter's transactions (text only; the kernel tier runs them)


def test_owned_transaction_text_adds_then_deletes_removals() -> None:
    assert nft.owned_transaction_text([3, 1], [9]) == (
        "add element inet lbsync owned { 1, 3 }\n"
        "add element inet lbsync owned { 9 }\n"
        "delete element inet lbsync owned { 9 }\n")
    assert nft.owned_transaction_text([], [2, 0]) == (
        "add element inet lbsync owned { 0, 2 }\n"
        "delete element inet lbsync owned { 0, 2 }\n")
    assert nft.owned_transaction_text([], []) == ""
    with pytest.raises(ValueError, match="both added and removed: 2"):
        nft.owned_transaction_text([1, 2], [2])
    with pytest.raises(ValueError, match="not a bucket"):
        nft.owned_transaction_text([-1], [])


def test_apply_text_flushes_deletes_stale_and_never_touches_owned() -> None:
    text = render_ruleset(parse_cluster(small(2)), 1)
    kernel = [
        nft.ChainSpec("prerouting", "filter", "prerouting", -150),  # same: kept, flushed
        nft.ChainSpec("input", "filter", "input", 10),              # other priority: recreated
        nft.ChainSpec("snat0_b7"),                                  # gone from the config
        nft.ChainSpec("snat0_b1"),
    ]
    out = nft.apply_text(text, kernel, [("set", "owned"), ("set", "alive"), ("map", "old"),
                                        ("map", "gone")])
    pre = out[: out.index("# lbsync datapath")].splitlines()
    assert pre == [
        "add table inet lbsync",
        "flush chain inet lbsync prerouting",
        "flush chain inet lbsync input",
        "flush chain inet lbsync snat0_b7",
        "flush chain inet lbsync snat0_b1",
        "delete chain inet lbsync input",
        "delete chain inet lbsync snat0_b7",
        "delete map inet lbsync old",
        "delete map inet lbsync gone",
        "add chain inet lbsync raw_prerouting { type filter hook prerouting priority -300; "
        "policy accept; }",
        "flush chain inet lbsync raw_prerouting",
        "add chain inet lbsync raw_output { type filter hook output priority -300; "
        "policy accept; }",
        "flush chain inet lbsync raw_output",
        "add chain inet lbsync prerouting { type filter hook prerouting priority -150; "
        "policy accept; }",
        "flush chain inet lbsync prerouting",
        "add chain inet lbsync input { type filter hook input priority 0; policy accept; }",
        "flush chain inet lbsync input",
        "add chain inet lbsync output { type filter hook output priority -150; "
        "policy accept; }",
        "flush chain inet lbsync output",
        "add chain inet lbsync dstnat { type nat hook prerouting priority -100; "
        "policy accept; }",
        "flush chain inet lbsync dstnat",
        "add chain inet lbsync srcnat { type nat hook postrouting priority 100; "
        "policy accept; }",
        "flush chain inet lbsync srcnat",
        "add chain inet lbsync snat0_b0",
        "flush chain inet lbsync snat0_b0",
        "add chain inet lbsync snat0_b1",
        "flush chain inet lbsync snat0_b1",
    ]
    assert out.endswith(text)
    assert "owned" not in "\n".join(pre) and "alive" not in "\n".join(pre)


def test_parse_elements() -> None:
    js = ('{"nftables": [{"metainfo": {}}, {"set": {"family": "inet", "name": "owned", '
          '"table": "lbsync", "type": "mark", "handle": 9, "elem": [1, 2, 4]}}]}')
    assert nft.parse_elements(js) == {1, 2, 4}
    assert nft.parse_elements('{"nftables": [{"set": {"name": "owned"}}]}') == set()
    with pytest.raises(nft.NftError):
        nft.parse_elements("not json")


def test_nft_argv() -> None:
    assert nft.nft_argv(["list", "ruleset"]) == ["nft", "list", "ruleset"]
    assert nft.nft_argv(["-f", "-"], "lab-n1") == ["ip", "netns", "exec", "lab-n1", "nft",
                                                   "-f", "-"]
    with pytest.raises(ValueError):
        nft.nft_argv(["x"], "../etc")


def test_diff_listings() -> None:
    assert diff_listings("a\nb\n", "a\nb\n") == []
    lines = diff_listings("a\nb\n", "a\nc\n")
    assert "-b\n" in lines and "+c\n" in lines
    assert diff_listings("a\n", None)[1].startswith("+++ kernel (no table)")


# --------------------------------------------------------------------------------------------
# config check: port plans


def _ingress(d: dict[str, Any], ports: str) -> dict[str, Any]:
    d = copy.deepcopy(d)
    d["nat"][0]["ports"] = ports
    return d


def test_config_rejects_ingress_port_plan_below_the_minimum() -> None:
    d = small(256, min_ports_per_bucket=64)
    parse_cluster(_ingress(d, f"1024-{1024 + 256 * 64 - 1}"))  # exactly 64 per bucket
    with pytest.raises(ConfigError) as ei:
        parse_cluster(_ingress(d, f"1024-{1024 + 256 * 64 - 2}"))  # 63 per bucket
    assert ei.value.key == "nat[0].ports"
    assert "63 per bucket" in str(ei.value) and "min_ports_per_bucket=64" in str(ei.value)
    # More buckets, same range: too few.
    with pytest.raises(ConfigError, match="per bucket"):
        parse_cluster(small(1024, min_ports_per_bucket=64))


def test_config_port_plan_does_not_apply_to_egress_snat() -> None:
    d = small(4096, min_ports_per_bucket=1000)
    d["nat"] = [n for n in d["nat"] if n["kind"] != "ingress_snat"]
    d["nat"][-1]["ports"] = "40000-40999"  # egress: full range shared by every bucket
    cfg: ClusterConfig = parse_cluster(d)
    assert "40000-40999" in render_ruleset(cfg, 1)


def test_config_check_cli_port_plan_one_line_exit_2(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("buckets = 256", "buckets = 2048")
    f = tmp_path / "cluster.toml"
    f.write_text(text)
    cp = subprocess.run([sys.executable, "-m", "lbsync", "config", "check", str(f)],
                        capture_output=True, text=True)
    assert cp.returncode == 2
    assert cp.stderr.count("\n") == 1
    assert f"{f}: nat[0].ports:" in cp.stderr and "31 per bucket" in cp.stderr


# --------------------------------------------------------------------------------------------
# CLI


def lbsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbsync", *args], capture_output=True,
                          text=True)


def test_cli_render() -> None:
    cp = lbsync("datapath", "render", "--config", str(EXAMPLE), "--node-id", "2")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == render_ruleset(parse_cluster(example_data()), 2)


@pytest.mark.parametrize(("args", "words"), [
    (["datapath", "render", "--config", "/nonexistent/c.toml", "--node-id", "1"],
     "/nonexistent/c.toml: no such file"),
    (["datapath", "render", "--config", str(EXAMPLE), "--node-id", "9"],
     "9 is not a node of cluster 'edge'"),
    (["datapath", "render", "--config", str(EXAMPLE), "--node-id", "one"],
     "invalid int value"),
    (["datapath", "apply", "--config", str(EXAMPLE), "--node-id", "1", "--netns", "a/b"],
     "not a network namespace name"),
    (["datapath", "diff", "--config", str(EXAMPLE), "--node-id", "1", "--netns", "lbno-such"],
     "no network namespace 'lbno-such'"),
    (["datapath", "show", "--netns", "lbno-such"], "no network namespace 'lbno-such'"),
    (["datapath", "frobnicate"], "invalid choice"),
])
def test_cli_user_errors_one_line_exit_2(args: list[str], words: str) -> None:
    cp = lbsync(*args)
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    assert cp.stderr.count("\n") == 1, cp.stderr
    assert words in cp.stderr


def test_listing_blocks_and_alignment() -> None:
    listing = ("table inet lbsync {\n\tset owned {\n\t\ttype mark\n\t}\n\n"
               "\tchain b {\n\t\tcounter\n\t}\n\n\tchain a {\n\t\ttype filter hook input "
               "priority filter; policy accept;\n\t}\n}\n")
    blocks = nft.listing_blocks(listing)
    assert list(blocks) == ["set owned", "chain b", "chain a"]
    assert blocks["chain b"] == "\tchain b {\n\t\tcounter\n\t}\n"
    assert nft.aligned_listing(listing, ["set owned", "chain b", "chain a"]) == listing
    swapped = nft.aligned_listing(listing, ["set owned", "chain a"])
    assert list(nft.listing_blocks(swapped)) == ["set owned", "chain a", "chain b"]
    assert nft.aligned_listing(swapped, ["set owned", "chain b", "chain a"]) == listing
