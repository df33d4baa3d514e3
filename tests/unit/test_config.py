"""Config validation: good files load, every bad value is one error naming file and key."""

from __future__ import annotations

import itertools
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from lbsync.config import (
    ClusterConfig,
    ConfigError,
    bucket_port_range,
    load_cluster,
    load_node_id,
    parse_cluster,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "cluster.toml"


def example() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text())


def test_example_loads_into_frozen_dataclasses() -> None:
    cfg = load_cluster(EXAMPLE)
    assert isinstance(cfg, ClusterConfig)
    assert cfg.cluster.name == "edge"
    assert cfg.node_ids == (1, 2, 3)
    assert cfg.nat[0].kind == "ingress_snat"
    with pytest.raises(AttributeError):
        cfg.cluster.buckets = 3  # type: ignore[misc]
    assert str(cfg.runtime_path(2, "sock")) == "/run/lbsync/edge-2.sock"


@pytest.mark.parametrize(
    ("mutate", "key", "words"),
    [
        (lambda d: d["cluster"].update(bogus=1), "cluster.bogus", "unknown key"),
        (lambda d: d.update(extra={}), "extra", "unknown key"),
        (lambda d: d["cluster"].update(buckets=0), "cluster.buckets", "1..4096"),
        (lambda d: d["cluster"].update(buckets="64"), "cluster.buckets", "integer"),
        (lambda d: d["cluster"].update(name="Bad Name"), "cluster.name", "must match"),
        (lambda d: d["nodes"][1].update(id=1), "nodes[1].id", "duplicate"),
        (lambda d: d["nodes"][0].update(weight=0), "nodes[0].weight", "1..1000"),
        (lambda d: d["nodes"][2].update(replication_address="x"),
         "nodes[2].replication_address", "not an IP"),
        (lambda d: d["nodes"][0].update(colour="red"), "nodes[0].colour", "unknown key"),
        (lambda d: d["nat"][0].update(kind="masquerade"), "nat[0].kind", "must be one of"),
        (lambda d: d["nat"][0].update(ports="1024-2000"), "nat[0].ports", "per bucket"),
        (lambda d: d["nat"][0].update(ports="9-3"), "nat[0].ports", "lo <= hi"),
        (lambda d: d["nat"][2].update(to="198.18.0.1:99"), "nat[2].to", "only dnat"),
        (lambda d: d["nat"][1].update(match_proto=""), "nat[1].match_dport", "needs match_proto"),
        (lambda d: d["vips"].update(outside=["198.18.0.1"]), "vips.outside[0]", "prefix length"),
        (lambda d: d["replication"].update(group4="224.0.0.1"), "replication.group4", "239"),
        (lambda d: d["interfaces"].update(outside="x" * 16), "interfaces.outside", "interface"),
        (lambda d: d.update(nodes=[]), "nodes", "at least one"),
        (lambda d: d.update(keepalived={"advert_int": 0}), "keepalived.advert_int", "0.01..255"),
        (lambda d: (d.update(keepalived={"enabled": True}),
                    d["nodes"][0].pop("management_address", None)),
         "keepalived.enabled", "management_address"),
    ],
)
def test_bad_values_name_file_and_key(mutate: Any, key: str, words: str) -> None:
    data = example()
    mutate(data)
    with pytest.raises(ConfigError) as ei:
        parse_cluster(data, "cluster.toml")
    msg = str(ei.value)
    assert msg.startswith(f"cluster.toml: {key}: "), msg
    assert words in msg
    assert "\n" not in msg


def test_ingress_snat_port_slices_are_disjoint_and_cover_min() -> None:
    cfg = load_cluster(EXAMPLE)
    rule = cfg.nat[0]
    slices = [bucket_port_range(rule, cfg.cluster.buckets, b) for b in range(cfg.cluster.buckets)]
    for (lo, hi), (lo2, _hi2) in itertools.pairwise(slices):
        assert hi < lo2
        assert hi - lo + 1 >= cfg.cluster.min_ports_per_bucket
    assert slices[0][0] == 1024 and slices[-1][1] <= 65535


def test_node_id_from_flag_and_file(tmp_path: Path) -> None:
    cfg = load_cluster(EXAMPLE)
    assert load_node_id(cfg, 2) == 2
    with pytest.raises(ConfigError, match="not a node"):
        load_node_id(cfg, 9)
    f = tmp_path / "node.toml"
    f.write_text("node_id = 3\n")
    assert load_node_id(cfg, None, f) == 3
    f.write_text("node_id = 3\nrole = 'x'\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_node_id(cfg, None, f)
    with pytest.raises(ConfigError, match="no such file"):
        load_node_id(cfg, None, tmp_path / "absent.toml")


def test_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[cluster\n")
    with pytest.raises(ConfigError, match="TOML syntax"):
        load_cluster(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_cluster(tmp_path / "none.toml")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbsync", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_config_check_ok_and_bad(tmp_path: Path) -> None:
    ok = _cli("config", "check", str(EXAMPLE))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("buckets = 256", "buckets = 99999"))
    cp = _cli("config", "check", str(bad))
    assert cp.returncode == 2
    assert cp.stderr.strip().count("\n") == 0
    assert f"{bad}: cluster.buckets: must be 1..4096" in cp.stderr


def test_cli_bad_arguments_exit_2() -> None:
    for argv in (["nonsense"], ["config"], ["config", "check"], []):
        cp = _cli(*argv)
        assert cp.returncode == 2, argv
        assert cp.stderr.strip() and cp.stderr.strip().count("\n") == 0, cp.stderr
