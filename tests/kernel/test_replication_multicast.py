"""Kernel tier: three node namespaces on a replication bridge, real multicast (and unicast),
20 % random drop on every receiver's input by nftables; every node converges to every owner."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.netns import NetnsSet

pytestmark = pytest.mark.kernel

PORT = 7946
GROUP = "239.18.0.77"
DROP_RULES = f"""
table inet lbt_repl {{
    chain input {{
        type filter hook input priority 0; policy accept;
        udp dport {PORT} numgen random mod 100 < 20 counter drop
    }}
}}
"""


def _farm(netns: NetnsSet, n: int) -> list[str]:
    hub = netns.add("hub")
    netns.ns(hub, "ip link add br0 type bridge mcast_snooping 0 stp_state 0")
    netns.ns(hub, "ip link set br0 up")
    nodes = []
    for i in range(1, n + 1):
        node = netns.add(f"n{i}")
        netns.veth(node, "repl0", hub, f"p{i}")
        netns.ns(hub, f"ip link set p{i} master br0")
        netns.ns(node, f"ip addr add 198.18.7.{i}/24 dev repl0")
        netns.ns(node, ["nft", "-f", "-"], input=DROP_RULES)
        nodes.append(node)
    return nodes


def _drill(netns: NetnsSet, nodes: list[str], mode: str) -> list[dict[str, object]]:
    ids = ",".join(str(i) for i in range(1, len(nodes) + 1))
    procs = []
    for i, node in enumerate(nodes, 1):
        argv = [sys.executable, "-m", "lbsync.replication.drill", "--node-id", str(i),
                "--nodes", ids, "--mode", mode, "--iface", "repl0", "--group", GROUP,
                "--port", str(PORT), "--records", "2000", "--traffic", "1.0",
                "--quiet", "3.5", "--address", f"198.18.7.{i}",
                "--peers", ",".join(f"198.18.7.{j}" for j in range(1, len(nodes) + 1)
                                    if j != i)]
        procs.append(netns.popen(node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


def _assert_converged(netns: NetnsSet, nodes: list[str], results: list[dict[str, object]]
                      ) -> None:
    owner_of = {}
    for r in results:
        for b in r["owned"]:  # type: ignore[attr-defined]
            owner_of[str(b)] = r["node"]
    by_node = {r["node"]: r for r in results}
    for bucket, owner in owner_of.items():
        want = by_node[owner]["digests"][bucket]  # type: ignore[index]
        for r in results:
            assert r["digests"][bucket] == want, (  # type: ignore[index]
                f"node {r['node']} bucket {bucket}: {r['digests'][bucket]} != {want}")  # type: ignore[index]
    # The loss was real and was repaired by the protocol, not luck.
    for node in nodes:
        counters = netns.ns(node, "nft list chain inet lbt_repl input").stdout
        dropped = int(counters.split("packets ")[1].split()[0])
        assert dropped > 20, counters
    assert all(r["receiver"]["nack_messages"] > 0 for r in results)  # type: ignore[index]
    assert all(r["sender"]["retransmitted"] > 0 for r in results)  # type: ignore[index]
    assert all(r["entries"] > 2000 for r in results)


def test_multicast_three_nodes_converge_under_20_percent_drop(netns: NetnsSet) -> None:
    nodes = _farm(netns, 3)
    results = _drill(netns, nodes, "multicast")
    _assert_converged(netns, nodes, results)


def test_unicast_three_nodes_converge_under_20_percent_drop(netns: NetnsSet) -> None:
    nodes = _farm(netns, 3)
    results = _drill(netns, nodes, "unicast")
    _assert_converged(netns, nodes, results)
