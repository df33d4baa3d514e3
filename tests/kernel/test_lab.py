"""The lab farm itself: ``lbsync lab`` end to end, the topology it builds, and its teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lbsync import nft
from lbsync.config import load_cluster
from lbsync.lab import farm, traffic
from lbsync.lab.farm import Lab
from tests.kernel.conftest import assert_lab_gone, lab_prefix, lab_processes

pytestmark = pytest.mark.kernel


def lbsync(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbsync", *args], capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(cp: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = cp.stderr.strip().splitlines()
    assert cp.returncode == code, (cp.returncode, cp.stderr)
    assert len(lines) == 1, cp.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_lifecycle_topology_and_teardown() -> None:
    prefix = lab_prefix()
    root_links = set(os.listdir("/sys/class/net"))
    try:
        cp = lbsync("lab", "up", "--name", prefix, "--nodes", "2", "--ipv6", "--buckets", "32")
        assert cp.returncode == 0, cp.stderr
        assert prefix in cp.stdout

        # up on an existing lab: one line, exit 2, and the lab is untouched.
        one_error_line(lbsync("lab", "up", "--name", prefix), 2, prefix, "already exists")

        st = json.loads(lbsync("lab", "status", "--name", prefix, "--json").stdout)
        assert st["complete"] and [n["owned"] for n in st["nodes"]] == [16, 16]
        lab = Lab.load(prefix)
        assert sorted(lab.namespaces) == farm.lab_namespaces(prefix)
        assert len(lab.namespaces) == 8

        # Generated files: the cluster file loads with the normal loader; lab.json records
        # the split, which partitions the buckets, and matches the kernels' @owned.
        cfg = load_cluster(lab.config_path)
        assert cfg.cluster.name == prefix and cfg.node_ids == (1, 2)
        state = json.loads((lab.directory / farm.LAB_FILE).read_text())
        split = {int(k): set(v) for k, v in state["split"].items()}
        assert sorted(b for bs in split.values() for b in bs) == list(range(32))
        assert {i: lab.owned(i) for i in (1, 2)} == split

        # Hubs: every port of the shared segments learning off, flood on; ageing 0, STP off.
        for hub in ("hubo", "hubi"):
            out = lab.exec(lab.hub_ns(hub), ["ip", "-d", "link", "show", "type", "bridge"],
                           check=True).stdout
            assert "ageing_time 0 " in out and "stp_state 0 " in out, out
            assert "mcast_snooping 0 " in out, out
            ports = lab.exec(lab.hub_ns(hub), ["bridge", "-d", "link"], check=True).stdout
            blocks = [b for b in ports.split("\n") if "learning" in b]
            assert len(blocks) == 3 and all("learning off flood on" in b for b in blocks), ports

        # Nodes: same VIPs and MACs on the shared segments, own replication/management
        # addresses, the sysctls the datapath needs.
        macs = set()
        for i in lab.node_ids:
            ns = lab.node_ns(i)
            for ifname, vip4, vip6 in (("outside0", "198.18.0.1/24", "2001:db8::1/64"),
                                       ("inside0", "198.18.1.1/24", "2001:db8:0:1::1/64")):
                link = json.loads(lab.exec(ns, ["ip", "-j", "addr", "show", ifname],
                                           check=True).stdout)[0]
                macs.add((ifname, link["address"]))
                addrs = {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]}
                assert {vip4, vip6} <= addrs
            repl = lab.exec(ns, ["ip", "-br", "addr", "show", "repl0"], check=True).stdout
            assert f"198.18.2.{i}/24" in repl and f"2001:db8:0:2::{i}/64" in repl
            mgmt = lab.exec(ns, ["ip", "-br", "addr", "show", "mgmt0"], check=True).stdout
            assert f"198.18.3.{i}/24" in mgmt
            values = lab.exec(ns, ["sysctl", "-n", "net.ipv4.ip_forward",
                                   "net.ipv4.conf.all.send_redirects",
                                   "net.netfilter.nf_conntrack_tcp_loose",
                                   "net.ipv6.conf.all.forwarding"], check=True).stdout.split()
            assert values == ["1", "0", "0", "1"]
        assert macs == {("outside0", cfg.vips.outside_mac), ("inside0", cfg.vips.inside_mac)}

        # exec: the command's exit code, in the right namespace.
        cp = lbsync("lab", "exec", "--name", prefix, "2", "--", "ip", "-br", "addr", "show",
                    "repl0")
        assert cp.returncode == 0 and "198.18.2.2/24" in cp.stdout
        assert lbsync("lab", "exec", "--name", prefix, "cli", "--", "false").returncode == 1

        # traffic from the CLI (JSON report), then processes exist in the lab...
        cp = lbsync("lab", "traffic", "--name", prefix, "--tcp", "6", "--udp", "6",
                    "--rate", "5", "--duration", "1", "--family", "46", "--json")
        assert cp.returncode == 0, cp.stderr
        rep = json.loads(cp.stdout.strip().splitlines()[-1])
        assert rep["alive"] == 12 and rep["resets"] == 0 and rep["lost_replies"] == 0
        assert traffic.server_running(lab) is not None
        assert lab_processes([prefix])

        # Nothing of the lab is in the root namespace.
        assert set(os.listdir("/sys/class/net")) == root_links

        # ...and down removes namespaces, processes and state.
        cp = lbsync("lab", "down", "--name", prefix)
        assert cp.returncode == 0, cp.stderr
        assert_lab_gone(prefix)
        one_error_line(lbsync("lab", "down", "--name", prefix), 1, prefix, "no lab")
        one_error_line(lbsync("lab", "status", "--name", prefix), 2, prefix)
    finally:
        farm.destroy(prefix)
    assert_lab_gone(prefix)


def test_half_built_lab_is_removed_and_create_failure_cleans_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A stray namespace of a lab (e.g. a crash mid-build) counts as an existing lab...
    prefix = lab_prefix()
    subprocess.run(["ip", "netns", "add", f"{prefix}-n1"], check=True)
    try:
        assert farm.exists(prefix)
        with pytest.raises(farm.LabError, match="already exists"):
            Lab.create(prefix)
        # ...and down removes it.
        assert farm.destroy(prefix)
    finally:
        farm.destroy(prefix)
    assert_lab_gone(prefix)
    # A build that fails part-way (here: nft refuses the ruleset) leaves nothing behind.
    prefix = lab_prefix()
    real = nft.apply_ruleset

    def failing(text: str, netns: str | None = None) -> None:
        real(text + "this is not nft\n", netns)

    monkeypatch.setattr(nft, "apply_ruleset", failing)
    try:
        with pytest.raises(nft.NftError):
            Lab.create(prefix, 2)
    finally:
        farm.destroy(prefix)
    assert_lab_gone(prefix)


@pytest.mark.parametrize("args,words", [
    (["lab", "up", "--nodes", "0"], ["--nodes", ">= 1"]),
    (["lab", "up", "--nodes", "x"], ["--nodes", "integer"]),
    (["lab", "up", "--nodes", "17", "--name", "PREFIX"], ["--nodes", "1..16"]),
    (["lab", "up", "--name", "Bad-Name"], ["--name", "Bad-Name"]),
    (["lab", "up", "--buckets", "5000", "--name", "PREFIX"], ["cluster.buckets"]),
    (["lab", "up", "--buckets", "2000", "--name", "PREFIX"], ["ports", "min_ports_per_bucket"]),
    (["lab", "frobnicate"], ["frobnicate"]),
    (["lab", "traffic", "--name", "lbtnolab", "--tcp", "1"], ["no lab", "lbtnolab"]),
    (["lab", "traffic", "--tcp", "-1"], ["--tcp", ">= 0"]),
    (["lab", "traffic", "--rate", "0", "--tcp", "1"], ["--rate", "> 0"]),
    (["lab", "traffic", "--mode", "sideways"], ["--mode", "sideways"]),
    (["lab", "traffic"], ["nothing to do"]),
    (["lab", "exec", "--name", "lbtnolab", "1", "--", "true"], ["no lab", "lbtnolab"]),
    (["lab", "exec", "1"], ["no command"]),
])
def test_bad_cli_arguments_one_line_exit_2(args: list[str], words: list[str]) -> None:
    prefix = lab_prefix()
    try:
        cp = lbsync(*[prefix if a == "PREFIX" else a for a in args])
        one_error_line(cp, 2, *words)
    finally:
        farm.destroy(prefix)
    assert_lab_gone(prefix)


def test_cli_up_with_daemons_and_down_removes_their_runtime_files() -> None:
    prefix = lab_prefix()
    try:
        cp = lbsync("lab", "up", "--name", prefix, "--nodes", "2", "--daemons")
        assert cp.returncode == 0, cp.stderr
        lab = Lab.load(prefix)
        runtime = [lab.cluster_config.runtime_path(i, s) for i in (1, 2) for s in ("sock",
                                                                                  "lock")]
        assert all(p.exists() for p in runtime)
        daemons = [p for p, _ in lab_processes([prefix])]
        assert len(farm.netns_pids([lab.node_ns(1)])[lab.node_ns(1)]) >= 1 and daemons
        cp = lbsync("lab", "down", "--name", prefix)
        assert cp.returncode == 0, cp.stderr
        assert not any(p.exists() for p in runtime)
    finally:
        farm.destroy(prefix)
    assert_lab_gone(prefix)


def test_cli_up_vrrp_mode_builds_the_incumbent() -> None:
    prefix = lab_prefix()
    try:
        one_error_line(lbsync("lab", "up", "--name", prefix, "--mode", "vrrp", "--ipv6"), 2,
                       "vrrp")
        cp = lbsync("lab", "up", "--name", prefix, "--mode", "vrrp", "--json")
        assert cp.returncode == 0, cp.stderr
        state = json.loads(cp.stdout)
        assert state["mode"] == "vrrp" and state["nodes"] == 2, state
        cp = lbsync("lab", "traffic", "--name", prefix, "--mode", "snat", "--tcp", "4",
                    "--udp", "4", "--rate", "5", "--duration", "1", "--json")
        assert cp.returncode == 0, cp.stderr
        rep = json.loads(cp.stdout.strip().splitlines()[-1])
        assert rep["alive"] == 8 and rep["resets"] == 0, rep["states"]
    finally:
        farm.destroy(prefix)
    assert_lab_gone(prefix)
