"""The rendered datapath against the real nf_tables and conntrack, in fresh namespaces.

- every rendered ruleset passes ``nft -c -f``;
- ``apply_ruleset`` installs, re-applies and reshapes the table while ``@owned`` (and any
  other named set) keeps its elements; a refused apply changes nothing;
- owned transactions tolerate present and absent buckets;
- ``lbsync datapath apply|show|diff --netns``;
- one forwarding node between a client and a server (IPv4 and IPv6): the bucket lands in the ct
  mark, a non-owned bucket is dropped and an owned one forwarded, ingress SNAT uses the
  bucket's own port slice, and the input guard drops NEW TCP to the node's own address
  silently (no reset).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hashing.jhash import bucket_of
from lbsync import nft
from lbsync.config import bucket_port_range, parse_cluster
from lbsync.datapath import render_ruleset
from tests.netns import NetnsSet

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "cluster.toml"


def example_data(buckets: int = 8) -> dict[str, Any]:
    d = tomllib.loads(EXAMPLE.read_text())
    d["cluster"]["buckets"] = buckets
    return d


def v6_data() -> dict[str, Any]:
    d = example_data(16)
    d["nat"] += [
        {"kind": "ingress_snat", "match_daddr": "2001:db8:0:2::10/128", "to": "2001:db8:0:2::1"},
        {"kind": "egress_snat", "match_saddr": "2001:db8:0:2::/64", "to": "2001:db8:0:1::1",
         "match_proto": "udp"},
        {"kind": "dnat", "match_daddr": "2001:db8:0:1::1/128", "to": "[2001:db8:0:2::10]:5353"},
    ]
    return d


def test_rendered_rulesets_pass_nft_check(netns: NetnsSet) -> None:
    ns = netns.add("c")
    configs = [example_data(256), example_data(1), v6_data()]
    big = example_data(1008)
    big["cluster"]["min_ports_per_bucket"] = 64  # 64512 / 1008 = 64
    configs.append(big)
    for d in configs:
        text = render_ruleset(parse_cluster(d), 1)
        nft.check_ruleset(text, ns)
    # the check can fail: a broken rule is refused
    with pytest.raises(nft.NftError):
        nft.check_ruleset(text.replace("ct state invalid drop", "ct state bogus drop"), ns)
    assert nft.list_table(ns) is None  # -c installs nothing


def without_alive(listing: str) -> str:
    out, n = re.subn(r"\n\tset alive \{\n.*?\n\t\}\n", "", listing, flags=re.S)
    assert n == 1, listing
    return out


def test_apply_replaces_chains_and_keeps_owned(netns: NetnsSet) -> None:
    ns = netns.add("a")
    text = render_ruleset(parse_cluster(example_data(8)), 1)
    nft.apply_ruleset(text, ns)
    listed = nft.list_table(ns, terse=True)
    assert listed == nft.canonical_listing(text)
    assert nft.list_owned(ns) == set()

    nft.owned_transaction([1, 2, 3], [], ns)
    assert nft.list_owned(ns) == {1, 2, 3}
    nft.owned_transaction([3, 4], [1, 9], ns)  # 3 already present, 9 absent: tolerated
    assert nft.list_owned(ns) == {2, 3, 4}
    nft.owned_transaction([], [4, 4, 200], ns)
    assert nft.list_owned(ns) == {2, 3}
    nft.owned_transaction([7], [], ns)
    # A named set someone else owns (e.g. a fencing set) is runtime state too.
    netns.ns(ns, ["nft", "-f", "-"], input=(
        "add set inet lbsync alive { type ifname; }\n"
        'add element inet lbsync alive { "outside0" }\n'))

    with_alive = nft.list_table(ns, terse=True)
    assert with_alive is not None and without_alive(with_alive) == listed

    # Re-applying the same text: nothing duplicated, @owned untouched.
    nft.apply_ruleset(text, ns)
    assert nft.list_table(ns, terse=True) == with_alive
    assert nft.list_owned(ns) == {2, 3, 7}
    # Even with a stale view of the kernel (as if another apply raced this one), the text's
    # own chains are replaced, not appended to.
    nft.run_nft(["-f", "-"], netns=ns, input=nft.apply_text(text, [], []))
    assert nft.list_table(ns, terse=True) == with_alive

    # Reshape: a chain with another priority, a stale base chain and bucket chains that go.
    netns.ns(ns, ["nft", "-f", "-"], input=(
        "delete chain inet lbsync input\n"
        "add chain inet lbsync input { type filter hook input priority 10; policy accept; }\n"
        "add chain inet lbsync stale { type filter hook forward priority 0; }\n"
        "add chain inet lbsync stale2\n"
        "add rule inet lbsync stale2 counter\n"
        "add rule inet lbsync stale jump stale2\n"))
    d = example_data(8)
    d["nat"] = [n for n in d["nat"] if n["kind"] != "ingress_snat"]
    text2 = render_ruleset(parse_cluster(d), 1)
    nft.apply_ruleset(text2, ns)
    listed2 = nft.list_table(ns, terse=True)
    assert listed2 is not None and "set alive" in listed2
    canonical2 = nft.canonical_listing(text2)
    order = list(nft.listing_blocks(canonical2))
    assert nft.aligned_listing(without_alive(listed2), order) == canonical2
    assert "snat0_b" not in listed2 and "stale" not in listed2
    assert nft.list_owned(ns) == {2, 3, 7}
    assert '"outside0"' in netns.ns(ns, "nft list set inet lbsync alive").stdout

    # A refused apply changes nothing (one transaction).
    broken = text.replace("ct state invalid drop", "ct state invalid jump nosuchchain")
    with pytest.raises(nft.NftError):
        nft.apply_ruleset(broken, ns)
    assert nft.list_table(ns, terse=True) == listed2
    assert nft.list_owned(ns) == {2, 3, 7}


def lbsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbsync", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_apply_show_diff(netns: NetnsSet, tmp_path: Path) -> None:
    ns = netns.add("d")
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(EXAMPLE.read_text().replace("buckets = 256", "buckets = 16"))
    common = ["--config", str(cfg), "--node-id", "2", "--netns", ns]

    cp = lbsync("datapath", "show", "--netns", ns)
    assert cp.returncode == 1 and "no table inet lbsync" in cp.stderr
    cp = lbsync("datapath", "diff", *common)
    assert cp.returncode == 1 and "+++ kernel (no table)" in cp.stdout

    cp = lbsync("datapath", "apply", *common)
    assert cp.returncode == 0, cp.stderr
    assert "kept 0 buckets" in cp.stdout
    nft.owned_transaction([5, 6], [], ns)
    cp = lbsync("datapath", "apply", *common)
    assert cp.returncode == 0 and "kept 2 buckets" in cp.stdout
    cp = lbsync("datapath", "diff", *common)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "matches" in cp.stdout
    cp = lbsync("datapath", "show", "--netns", ns)
    assert cp.returncode == 0 and "elements = { 0x00000005, 0x00000006 }" in cp.stdout

    netns.ns(ns, "nft add rule inet lbsync input tcp dport 9 drop")
    cp = lbsync("datapath", "diff", *common)
    assert cp.returncode == 1
    assert [x for x in cp.stdout.splitlines() if x.startswith("+\t")] == [
        "+\t\ttcp dport 9 drop"]
    assert lbsync("datapath", "apply", *common).returncode == 0
    assert lbsync("datapath", "diff", *common).returncode == 0
    assert nft.list_owned(ns) == {5, 6}


# --------------------------------------------------------------------------------------------
# Traffic through one node

UDP_SERVER = """
import json, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
try:
    data, peer = s.recvfrom(100)
    print(json.dumps([peer[0], peer[1]]), flush=True)
except TimeoutError:
    print(json.dumps(None), flush=True)
"""

UDP_SEND = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.sendto(b"x", (sys.argv[3], int(sys.argv[4])))
"""

TCP_CONNECT = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(1.0)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
"""

BUCKETS = 64
SEED = 0x1234

ADDRS = {
    4: {"client": "198.18.0.2", "outside": "198.18.0.1", "inside": "198.18.1.1",
        "server": "198.18.1.10", "len": 24},
    6: {"client": "2001:db8:0:1::2", "outside": "2001:db8:0:1::1", "inside": "2001:db8:0:2::1",
        "server": "2001:db8:0:2::10", "len": 64},
}


def one_node(netns: NetnsSet, family: int) -> tuple[str, str, str, dict[str, Any]]:
    a = ADDRS[family]
    c, fw, s = netns.add("c"), netns.add("fw"), netns.add("s")
    netns.veth(c, "c0", fw, "outside0")
    netns.veth(fw, "inside0", s, "s0")
    nodad = ["nodad"] if family == 6 else []
    for ns, dev, addr in ((c, "c0", a["client"]), (fw, "outside0", a["outside"]),
                          (fw, "inside0", a["inside"]), (s, "s0", a["server"])):
        netns.ns(ns, ["ip", "addr", "add", f"{addr}/{a['len']}", "dev", dev, *nodad])
    netns.ns(c, ["ip", f"-{family}", "route", "add", "default", "via", a["outside"]])
    netns.ns(s, ["ip", f"-{family}", "route", "add", "default", "via", a["inside"]])
    key = "net.ipv4.ip_forward" if family == 4 else "net.ipv6.conf.all.forwarding"
    netns.ns(fw, ["sysctl", "-qw", f"{key}=1"])
    d = example_data(BUCKETS)
    d["cluster"]["hash_seed"] = SEED
    d["nodes"] = d["nodes"][:1]
    host_len = 32 if family == 4 else 128
    d["nat"] = [{"kind": "ingress_snat", "match_daddr": f"{a['server']}/{host_len}",
                 "match_proto": "udp", "match_dport": 5002, "to": a["inside"]}]
    return c, fw, s, d


def udp_once(netns: NetnsSet, c: str, s: str, a: dict[str, Any], sport: int
             ) -> list[Any] | None:
    srv = netns.popen(s, [sys.executable, "-c", UDP_SERVER, a["server"], "5002", "1.5"],
                      stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None
    assert srv.stdout.readline().strip() == "ready"
    netns.ns(c, [sys.executable, "-c", UDP_SEND, a["client"], str(sport), a["server"], "5002"])
    got: list[Any] | None = json.loads(srv.stdout.readline())
    srv.wait(timeout=5)
    return got


def ct_marks(netns: NetnsSet, fw: str, family: int) -> list[int]:
    cp = netns.ns(fw, ["conntrack", "-L", "-f", "ipv4" if family == 4 else "ipv6", "-p", "udp"],
                  check=False)
    return [int(m) for m in re.findall(r"\bmark=(\d+)", cp.stdout)]


@pytest.mark.parametrize("family", [4, 6])
def test_one_node_bucket_ownership_snat_slice_and_input_guard(netns: NetnsSet,
                                                              family: int) -> None:
    a = ADDRS[family]
    c, fw, s, d = one_node(netns, family)
    cfg = parse_cluster(copy.deepcopy(d))
    nft.apply_ruleset(render_ruleset(cfg, 1), fw)
    if family == 6:
        # Neighbour discovery is untracked by conntrack, so no bucket applies: it passes the
        # node with nothing owned (a UDP datagram to the node makes the client resolve it).
        netns.ns(c, [sys.executable, "-c", UDP_SEND, a["client"], "39999", a["outside"], "9"])
        assert _neigh_reachable(netns, c, a["outside"]), "ND blocked by the ruleset"
    nft.owned_transaction(range(BUCKETS), [], fw)

    sport = 40000
    got = udp_once(netns, c, s, a, sport)
    assert got is not None, "owned bucket not forwarded"
    marks = ct_marks(netns, fw, family)
    assert len(marks) == 1
    bucket = marks[0]
    # The kernel's bucket is the one the Python bucket function predicts.
    assert bucket == bucket_of(a["client"], sport, buckets=BUCKETS, seed=SEED)
    lo, hi = bucket_port_range(cfg.nat[0], BUCKETS, bucket)
    assert got[0] == a["inside"] and lo <= got[1] <= hi

    # The same flow with its bucket not owned: dropped, and no entry confirmed.
    nft.owned_transaction([], [bucket], fw)
    netns.ns(fw, "conntrack -F", check=False)
    assert udp_once(netns, c, s, a, sport) is None
    assert ct_marks(netns, fw, family) == []
    # Flows of the other (still owned) buckets keep passing: try client ports until one
    # hashes elsewhere; a dropped one must have left no entry.
    for port in range(40001, 40021):
        netns.ns(fw, "conntrack -F", check=False)
        forwarded = udp_once(netns, c, s, a, port)
        marks = ct_marks(netns, fw, family)
        predicted = bucket_of(a["client"], port, buckets=BUCKETS, seed=SEED)
        if forwarded is not None:
            assert marks == [predicted] and predicted != bucket
            break
        assert marks == [] and predicted == bucket
    else:
        pytest.fail("no flow of an owned bucket was forwarded")

    # Claimed again: forwarded again.
    nft.owned_transaction([bucket], [], fw)
    netns.ns(fw, "conntrack -F", check=False)
    assert udp_once(netns, c, s, a, sport) is not None

    # Input guard: NEW TCP to the node's own outside address is dropped silently, not reset.
    cp = netns.ns(c, [sys.executable, "-c", TCP_CONNECT, a["outside"], "22"])
    assert cp.stdout.strip() == "timeout"
    # Counter-check: the same connect to the server (no listener) is refused by the server's
    # stack, so a reset would have been seen.
    cp = netns.ns(c, [sys.executable, "-c", TCP_CONNECT, a["server"], "22"])
    assert cp.stdout.strip() == "refused"



def _neigh_reachable(netns: NetnsSet, ns: str, addr: str) -> bool:
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        out = netns.ns(ns, ["ip", "-6", "neigh", "show", addr, "dev", "c0"]).stdout
        if "REACHABLE" in out or "STALE" in out:
            return True
        time.sleep(0.05)
    return False
