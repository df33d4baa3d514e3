"""The keepalived.conf renderers, the notify-line parser and the VRRP interpreter (pure)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbsync.config import ClusterConfig, load_cluster, parse_cluster
from lbsync.keepalived import (
    OWN_PRIORITY,
    NotifyError,
    NotifyLine,
    VrrpInstanceChanged,
    VrrpInterpreter,
    VrrpOwnLinkFailed,
    VrrpOwnLinkRecovered,
    VrrpPeerDeclaredDead,
    VrrpPeerReturned,
    VrrpSignalLost,
    default_fifo_path,
    instance_name,
    instance_owner,
    keepalived_argv,
    parse_notify_line,
    priority_plan,
    render_incumbent_keepalived_conf,
    render_incumbent_notify_script,
    render_keepalived_conf,
    successors,
    token_address,
)

ROOT = Path(__file__).resolve().parents[2]


def cluster(n: int = 3, **extra: object) -> ClusterConfig:
    data: dict[str, object] = {
        "cluster": {"name": "unit"},
        "nodes": [{"id": i, "name": f"fw{i}", "replication_address": f"198.18.2.{i}",
                   "management_address": f"198.18.3.{i}"} for i in range(1, n + 1)],
    }
    data.update(extra)
    return parse_cluster(data, "<test>")


def blocks(text: str) -> dict[str, str]:
    """vrrp_instance name -> its body."""
    return dict(re.findall(r"^vrrp_instance (\S+) \{\n(.*?)^\}", text, re.S | re.M))


def field(body: str, key: str) -> str:
    m = re.search(rf"^    {key} (\S+)$", body, re.M)
    assert m, (key, body)
    return m.group(1)


# --------------------------------------------------------------------------------------------
# Plan and renderer


def test_instance_names_round_trip() -> None:
    assert instance_name(7) == "lbsync-7"
    assert instance_owner("lbsync-7") == 7
    for bad in ("lbsync-0", "lbsync-256", "lbsync-07", "lbsync-x", "VI_1", "lbsync-", "lbsync-1 "):
        assert instance_owner(bad) is None, bad


def test_priority_plan_owner_highest_successors_descending() -> None:
    assert successors([3, 1, 2], 2) == (3, 1)
    assert priority_plan([1, 2, 3], 2) == {2: OWN_PRIORITY, 3: 250, 1: 200}
    assert priority_plan([1, 2, 3], 3) == {3: OWN_PRIORITY, 1: 250, 2: 200}
    with pytest.raises(ValueError):
        priority_plan([1, 2], 5)


@pytest.mark.parametrize("n", [1, 2, 4, 9, 100, 251])
def test_priority_plan_distinct_and_valid(n: int) -> None:
    ids = list(range(1, n + 1))
    for owner in (1, n):
        plan = priority_plan(ids, owner)
        assert sorted(plan) == ids
        assert len(set(plan.values())) == n
        assert max(plan.values()) == plan[owner] == OWN_PRIORITY
        assert min(plan.values()) >= 1
        order = [plan[x] for x in successors(ids, owner)]
        assert order == sorted(order, reverse=True)


def test_priority_plan_refuses_too_many_nodes() -> None:
    with pytest.raises(ValueError, match="distinct"):
        priority_plan(range(1, 253), 1)


def test_render_one_instance_per_node_on_management() -> None:
    cfg = cluster(3)
    text = render_keepalived_conf(cfg, 1, fifo_path="/run/x.fifo", run_dir="/run/d")
    b = blocks(text)
    assert sorted(b) == ["lbsync-1", "lbsync-2", "lbsync-3"]
    for name, body in b.items():
        owner = instance_owner(name)
        assert field(body, "interface") == "mgmt0"
        assert field(body, "virtual_router_id") == str(owner)
        assert field(body, "advert_int") == "0.1"
        assert field(body, "unicast_src_ip") == "198.18.3.1"
        assert field(body, "state") == "BACKUP"
        peers = re.search(r"unicast_peer \{\n(.*?)\n    \}", body, re.S)
        assert peers and peers.group(1).split() == ["198.18.3.2", "198.18.3.3"]
        assert f"169.254.77.{owner}/32 dev lo scope host" in body
        # only the own instance tracks the shared-MAC links
        assert ("track_interface" in body) == (owner == 1)
    own = b["lbsync-1"]
    assert re.search(r"track_interface \{\n\s+outside0\n\s+inside0\n\s+\}", own)
    assert "repl0" not in text
    assert 'vrrp_notify_fifo "/run/x.fifo"' in text
    assert "vrrp_version 3" in text
    assert "router_id lbsync-unit-1" in text
    assert "--pid /run/d/keepalived.pid" in text


def test_render_priorities_agree_across_nodes() -> None:
    """Rendered on every node, each instance has distinct priorities, the owner's highest."""
    cfg = cluster(4)
    per_node = {i: blocks(render_keepalived_conf(cfg, i, fifo_path="/f", run_dir="/d"))
                for i in cfg.node_ids}
    for owner in cfg.node_ids:
        prios = {i: int(field(per_node[i][instance_name(owner)], "priority"))
                 for i in cfg.node_ids}
        assert len(set(prios.values())) == len(prios)
        assert max(prios, key=lambda k: prios[k]) == owner
        assert prios == priority_plan(cfg.node_ids, owner)


def test_render_interfaces_from_config_and_advert_int_formats() -> None:
    cfg = cluster(2, interfaces={"management": "eth9", "outside": "ext0", "inside": "int0"})
    text = render_keepalived_conf(cfg, 2, advert_int=1, fifo_path="/f", run_dir="/d")
    own = blocks(text)["lbsync-2"]
    assert field(own, "interface") == "eth9"
    assert re.search(r"track_interface \{\n\s+ext0\n\s+int0\n", own)
    assert field(own, "advert_int") == "1"
    assert field(blocks(render_keepalived_conf(cfg, 2, advert_int=0.25, fifo_path="/f",
                                               run_dir="/d"))["lbsync-1"], "advert_int") == "0.25"
    for bad in (0.0, 0.005, 0.123, 41.0):
        with pytest.raises(ValueError, match="advert_int"):
            render_keepalived_conf(cfg, 2, advert_int=bad, fifo_path="/f", run_dir="/d")


def test_render_refuses_missing_management_address_and_is_deterministic() -> None:
    cfg = parse_cluster({"cluster": {"name": "u"}, "nodes": [
        {"id": 1, "replication_address": "198.18.2.1", "management_address": "198.18.3.1"},
        {"id": 2, "replication_address": "198.18.2.2"}]}, "<t>")
    with pytest.raises(ValueError, match="management_address"):
        render_keepalived_conf(cfg, 1, fifo_path="/f", run_dir="/d")
    with pytest.raises(ValueError, match="management_address"):
        render_keepalived_conf(cfg, 2, fifo_path="/f", run_dir="/d")
    c3 = cluster(3)
    assert render_keepalived_conf(c3, 3, fifo_path="/f", run_dir="/d") == \
        render_keepalived_conf(c3, 3, fifo_path="/f", run_dir="/d")
    with pytest.raises(ValueError, match="quote"):
        render_keepalived_conf(c3, 3, fifo_path='/f"x', run_dir="/d")


def test_render_ipv6_management() -> None:
    cfg = parse_cluster({"cluster": {"name": "v6"}, "nodes": [
        {"id": i, "replication_address": f"198.18.2.{i}",
         "management_address": f"2001:db8:3::{i}"} for i in (1, 2)]}, "<t>")
    b = blocks(render_keepalived_conf(cfg, 2, fifo_path="/f", run_dir="/d"))
    assert field(b["lbsync-1"], "unicast_src_ip") == "2001:db8:3::2"
    assert "fd6c:6273:796e:6b61::1/128 dev lo\n" in b["lbsync-1"]
    with pytest.raises(ValueError, match="family"):
        render_keepalived_conf(cfg, 2, fifo_path="/f", run_dir="/d",
                               token_network="169.254.77.0/24")
    mixed = parse_cluster({"cluster": {"name": "mx"}, "nodes": [
        {"id": 1, "replication_address": "198.18.2.1", "management_address": "198.18.3.1"},
        {"id": 2, "replication_address": "198.18.2.2", "management_address": "2001:db8::2"}]},
        "<t>")
    with pytest.raises(ValueError, match="same family"):
        render_keepalived_conf(mixed, 1, fifo_path="/f", run_dir="/d")


def test_token_address() -> None:
    assert token_address(3, "fd6c:6273:796e:6b61::/64") == "fd6c:6273:796e:6b61::3/128"
    assert token_address(1) == "169.254.77.1/32"
    assert token_address(255) == "169.254.77.255/32"
    with pytest.raises(ValueError):
        token_address(8, "169.254.77.0/30")


def test_example_config_is_the_rendering_of_cluster_toml() -> None:
    cfg = load_cluster(ROOT / "configs" / "cluster.toml")
    expected = render_keepalived_conf(cfg, 1, fifo_path=default_fifo_path(cfg, 1),
                                      run_dir="/run/lbsync")
    assert (ROOT / "configs" / "keepalived.conf.example").read_text() == expected


def test_keepalived_argv_own_pid_files() -> None:
    argv = keepalived_argv("/d/k.conf", "/d")
    assert argv[:3] == ["keepalived", "--dont-fork", "--vrrp"]
    for opt, path in (("--pid", "/d/keepalived.pid"), ("--vrrp_pid", "/d/keepalived-vrrp.pid"),
                      ("--checkers_pid", "/d/keepalived-checkers.pid"),
                      ("--use-file", "/d/k.conf")):
        assert argv[argv.index(opt) + 1] == path


# --------------------------------------------------------------------------------------------
# The incumbent


def incumbent_cluster() -> ClusterConfig:
    return cluster(2, vips={"outside": ["198.18.0.1/24", "2001:db8:0:1::1/64"],
                            "inside": ["198.18.1.1/24"]})


def test_incumbent_conf_sync_group_and_vips() -> None:
    cfg = incumbent_cluster()
    t1 = render_incumbent_keepalived_conf(cfg, 1, notify_script="/lab/pb.sh", advert_int=0.1)
    t2 = render_incumbent_keepalived_conf(cfg, 2, notify_script="/lab/pb.sh")
    b1, b2 = blocks(t1), blocks(t2)
    assert sorted(b1) == ["incumbent-inside", "incumbent-outside"]
    assert field(b1["incumbent-outside"], "interface") == "outside0"
    assert field(b1["incumbent-inside"], "interface") == "inside0"
    assert field(b1["incumbent-outside"], "virtual_router_id") != \
        field(b1["incumbent-inside"], "virtual_router_id")
    assert field(b1["incumbent-outside"], "priority") == "150"
    assert field(b2["incumbent-outside"], "priority") == "100"
    assert field(b1["incumbent-outside"], "advert_int") == "0.1"
    assert field(b2["incumbent-outside"], "advert_int") == "1"
    assert "vrrp_version 3" in t1 and "vrrp_version 2" in t2
    assert "vrrp_version 3" in render_incumbent_keepalived_conf(cfg, 2, notify_script="/x",
                                                                vrrp_version=3)
    with pytest.raises(ValueError, match="VRRPv2"):
        render_incumbent_keepalived_conf(cfg, 2, notify_script="/x", advert_int=0.5,
                                         vrrp_version=2)
    assert "198.18.0.1/24 dev outside0" in b1["incumbent-outside"]
    assert re.search(r"virtual_ipaddress_excluded \{\n\s+2001:db8:0:1::1/64 dev outside0",
                     b1["incumbent-outside"])
    assert "nopreempt" in b1["incumbent-inside"]
    assert "nopreempt" not in blocks(render_incumbent_keepalived_conf(
        cfg, 1, notify_script="/x", preempt=True))["incumbent-inside"]
    for state, arg in (("master", "primary"), ("backup", "backup"), ("fault", "fault")):
        assert f'notify_{state} "/lab/pb.sh {arg}"' in t1
    with pytest.raises(ValueError):
        render_incumbent_keepalived_conf(cluster(2), 1, notify_script="/x")  # no VIPs


def test_incumbent_notify_script_choreography() -> None:
    text = render_incumbent_notify_script(conntrackd_conf="/lab/c 1.conf", lock_file="/lab/l",
                                          log_file="/lab/log")
    assert text.startswith("#!/bin/sh\n")
    assert "CONF='/lab/c 1.conf'" in text

    def section(name: str) -> list[str]:
        m = re.search(rf"^  {name}\)\n(.*?)^    ;;", text, re.S | re.M)
        assert m, name
        return re.findall(r"run (-\w)", m.group(1))

    # commit, flush, resync from the kernel, bulk send; backup: shorten timers, ask resync
    assert section("primary") == ["-c", "-f", "-R", "-B"]
    assert section("backup") == ["-d", "-t", "-n"]
    assert section("fault") == ["-t"]


# --------------------------------------------------------------------------------------------
# Notify lines


def test_parse_notify_lines() -> None:
    assert parse_notify_line(b'INSTANCE "lbsync-2" MASTER 250\n') == \
        NotifyLine(kind="INSTANCE", name="lbsync-2", state="MASTER", priority=250)
    assert parse_notify_line('GROUP "G1" BACKUP 0') == \
        NotifyLine(kind="GROUP", name="G1", state="BACKUP", priority=0)
    assert parse_notify_line(b'INSTANCE "lbsync-1" MASTER_RX_LOWER_PRI 254').state == \
        "MASTER_RX_LOWER_PRI"


@pytest.mark.parametrize("line", [
    b"", b"\n", b"INSTANCE lbsync-2 MASTER 250", b'INSTANCE "lbsync-2" MASTER',
    b'INSTANCE "lbsync-2" master 250', b'INSTANCE "lbsync-2" ZOMBIE 250',
    b'INSTANCE "lbsync-2" MASTER 300', b'VS "x" UP 1', b'INSTANCE "a\x01" MASTER 1',
    b'INSTANCE "lbsync-2" MASTER 250 extra', b"\xff\xfe", b'INSTANCE "' + b"a" * 600 + b'" X 1',
])
def test_parse_notify_rejects(line: bytes) -> None:
    with pytest.raises(NotifyError):
        parse_notify_line(line)


def feed(interp: VrrpInterpreter, *lines: str) -> list[object]:
    out: list[object] = []
    for line in lines:
        out += [e for e in interp.feed_line(line.encode())
                if not isinstance(e, VrrpInstanceChanged)]
    return out


def test_interpreter_startup_then_peer_death_and_return() -> None:
    it = VrrpInterpreter(1, [1, 2, 3])
    assert feed(it, 'INSTANCE "lbsync-1" BACKUP 254', 'INSTANCE "lbsync-2" BACKUP 200',
                'INSTANCE "lbsync-3" BACKUP 250', 'INSTANCE "lbsync-1" MASTER 254') == []
    assert it.state_of(1) == "MASTER"
    assert feed(it, 'INSTANCE "lbsync-3" MASTER 250') == [VrrpPeerDeclaredDead(node_id=3)]
    # repeated MASTER (a priority notification) and a lower-priority advert: nothing new
    assert feed(it, 'INSTANCE "lbsync-3" MASTER 250',
                'INSTANCE "lbsync-3" MASTER_RX_LOWER_PRI 250',
                'INSTANCE "lbsync-3" MASTER 250') == []
    assert it.state_of(3) == "MASTER"
    assert feed(it, 'INSTANCE "lbsync-3" BACKUP 250') == [VrrpPeerReturned(node_id=3)]
    assert feed(it, 'INSTANCE "lbsync-3" BACKUP 250') == []
    # losing the position to FAULT is not the peer returning
    assert feed(it, 'INSTANCE "lbsync-2" MASTER 200') == [VrrpPeerDeclaredDead(node_id=2)]
    assert feed(it, 'INSTANCE "lbsync-2" FAULT 200', 'INSTANCE "lbsync-2" BACKUP 200') == []
    s = it.statistics()
    assert (s.peers_declared_dead, s.peers_returned) == (2, 1)
    assert s.states == {"lbsync-1": "MASTER", "lbsync-2": "BACKUP", "lbsync-3": "BACKUP"}


def test_interpreter_own_fault_and_recovery() -> None:
    it = VrrpInterpreter(2, [1, 2, 3])
    assert feed(it, 'INSTANCE "lbsync-2" MASTER 254', 'INSTANCE "lbsync-2" FAULT 254') == \
        [VrrpOwnLinkFailed()]
    assert feed(it, 'INSTANCE "lbsync-2" FAULT 254') == []
    assert feed(it, 'INSTANCE "lbsync-2" BACKUP 254') == [VrrpOwnLinkRecovered()]
    assert feed(it, 'INSTANCE "lbsync-2" MASTER 254') == []
    # own instance MASTER -> BACKUP without FAULT is not a link event
    assert feed(it, 'INSTANCE "lbsync-2" BACKUP 254') == []
    # the FAULT memory survives a keepalived restart
    assert feed(it, 'INSTANCE "lbsync-2" FAULT 254', 'INSTANCE "lbsync-2" STOP 254') == \
        [VrrpOwnLinkFailed(), VrrpSignalLost(reason="stopped")]
    assert feed(it, 'INSTANCE "lbsync-2" BACKUP 254') == [VrrpOwnLinkRecovered()]
    s = it.statistics()
    assert (s.own_link_failures, s.own_link_recoveries, s.signal_losses) == (2, 2, 1)


def test_interpreter_signal_lost_once_until_keepalived_speaks_again() -> None:
    it = VrrpInterpreter(1, [1, 2])
    assert feed(it, 'INSTANCE "lbsync-1" STOP 254', 'INSTANCE "lbsync-2" STOP 200') == \
        [VrrpSignalLost(reason="stopped")]
    assert it.notifier_closed() == []
    assert feed(it, 'INSTANCE "lbsync-1" BACKUP 254') == []
    assert it.notifier_closed() == [VrrpSignalLost(reason="fifo_closed")]
    assert it.notifier_closed() == []
    assert feed(it, 'INSTANCE "lbsync-1" DELETED 254') == []  # still lost: nothing new
    assert it.statistics().signal_losses == 2


def test_interpreter_counts_and_ignores_garbage_groups_and_strangers() -> None:
    it = VrrpInterpreter(1, [1, 2, 3])
    events = []
    for line in (b"garbage", b'GROUP "G" MASTER 0', b'INSTANCE "VI_1" MASTER 100',
                 b'INSTANCE "lbsync-9" MASTER 100', b"\x00\xff", b'INSTANCE "lbsync-2" X 1'):
        events += it.feed_line(line)
    assert events == []
    s = it.statistics()
    assert (s.lines, s.malformed_lines, s.group_lines, s.unknown_instances) == (6, 3, 1, 2)
    assert s.states == {}


def test_interpreter_instance_changed_comes_first() -> None:
    it = VrrpInterpreter(1, [1, 2])
    assert it.feed_line('INSTANCE "lbsync-2" MASTER 250') == [
        VrrpInstanceChanged(instance="lbsync-2", node_id=2, state="MASTER", priority=250),
        VrrpPeerDeclaredDead(node_id=2)]


def test_interpreter_notify_path() -> None:
    it = VrrpInterpreter(3, [1, 2, 3])
    assert [e for e in it.notify("lbsync-1", "master") if not isinstance(
        e, VrrpInstanceChanged)] == [VrrpPeerDeclaredDead(node_id=1)]
    assert it.notify("lbsync-3", " Fault ")[-1] == VrrpOwnLinkFailed()
    assert it.notify("VI_1", "MASTER") == []
    assert it.statistics().unknown_instances == 1
    for inst, state in (("lbsync-1", "dead"), ("lbsync-1", ""), ('a"b', "MASTER"), ("", "MASTER")):
        with pytest.raises(NotifyError):
            it.notify(inst, state)
    with pytest.raises(ValueError):
        VrrpInterpreter(4, [1, 2, 3])


@given(st.lists(st.binary(max_size=80), max_size=30))
def test_interpreter_never_raises_on_bytes(lines: list[bytes]) -> None:
    it = VrrpInterpreter(1, [1, 2, 3])
    for line in lines:
        it.feed_line(line)
    assert it.statistics().lines == len(lines)


@given(st.lists(st.tuples(st.sampled_from([1, 2, 3]),
                          st.sampled_from(["MASTER", "BACKUP", "FAULT", "STOP"])), max_size=40))
def test_interpreter_event_order_invariants(seq: list[tuple[int, str]]) -> None:
    """A peer is never reported returned twice in a row nor before it was declared dead (it may
    be declared dead again after this node lost the position to FAULT/STOP: consumers treat it
    as idempotent); own link failures and recoveries strictly alternate, failure first."""
    it = VrrpInterpreter(1, [1, 2, 3])
    last: dict[object, type] = {}
    for node, state in seq:
        for ev in it.feed_line(f'INSTANCE "lbsync-{node}" {state} 100'):
            if isinstance(ev, VrrpPeerReturned):
                assert last.get(ev.node_id) is VrrpPeerDeclaredDead
                last[ev.node_id] = VrrpPeerReturned
            elif isinstance(ev, VrrpPeerDeclaredDead):
                assert ev.node_id != 1 and state == "MASTER"
                last[ev.node_id] = VrrpPeerDeclaredDead
            elif isinstance(ev, (VrrpOwnLinkFailed, VrrpOwnLinkRecovered)):
                assert node == 1
                assert last.get("own", VrrpOwnLinkRecovered) is not type(ev)
                last["own"] = type(ev)


def test_interpreter_module_stays_sans_io() -> None:
    """lbsync.keepalived imports no I/O, clock or event-loop module (the adapter does that)."""
    import ast

    import lbsync.keepalived as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"asyncio", "socket", "time", "os", "subprocess", "select", "pyroute2"}
    assert imported & forbidden == set()


def test_render_notify_command_in_every_instance() -> None:
    cfg = cluster(3)
    plain = render_keepalived_conf(cfg, 2, fifo_path="/f", run_dir="/d")
    assert "notify" not in plain.replace("vrrp_notify_fifo", "") and "script_user" not in plain
    text = render_keepalived_conf(cfg, 2, fifo_path="/f", run_dir="/d",
                                  notify_command="/usr/bin/lbsync notify --node-id 2")
    for body in blocks(text).values():
        assert '    notify "/usr/bin/lbsync notify --node-id 2"' in body
    assert "script_user root" in text and "enable_script_security" in text
    with pytest.raises(ValueError):
        render_keepalived_conf(cfg, 2, fifo_path="/f", run_dir="/d", notify_command='a"b')
