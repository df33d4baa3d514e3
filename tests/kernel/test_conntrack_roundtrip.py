"""Kernel round trip: real traffic -> event -> record -> msgpack -> decode -> inject elsewhere.

Topology: ``cli`` -- ``fw`` (forwarding, NAT, marks, zone, label, FTP helper) -- ``srv``, plus a
``peer`` namespace with the same ruleset and no links, where the replicated entries are
injected. Every flow kind the issue names is opened for real; the records built from the
events seen in ``fw`` are injected into ``peer``, which is then dumped: every field must equal
the event's record except the timeout (at most a few seconds lower) and the NAT_DONE status
bits, which a kernel sets when its own NAT hook first sees the flow (see docs/kernel.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sys
import time

import pytest

from lbsync.kernel import ctnetlink as C
from lbsync.kernel.conntrack import DEFAULT_GROUPS, EXPECT_GROUPS, Conntrack, ConntrackRequests
from lbsync.kernel.ctnetlink import CtEvent, ExpectRecord, ExpEvent
from lbsync.kernel.flowrecord import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPS_DST_NAT,
    IPS_DST_NAT_DONE,
    IPS_SEQ_ADJUST,
    IPS_SRC_NAT,
    IPS_SRC_NAT_DONE,
    TCP_ESTABLISHED,
    FlowRecord,
    merge_records,
)
from lbsync.kernel.netns import entered
from tests.netns import NetnsSet

pytestmark = pytest.mark.kernel

RULESET = """
table inet lbct {
  ct helper ftp-standard { type "ftp" protocol tcp; }
  chain raw { type filter hook prerouting priority raw;
    tcp dport 7003 ct zone set 5; tcp sport 7003 ct zone set 5; }
  chain pre { type filter hook prerouting priority mangle;
    ct state new ct mark set 0x2a; ct state new tcp dport 7004 ct label set 1;
    ct label 1 counter; }
  chain helpers { type filter hook forward priority 0;
    tcp dport 21 ct helper set "ftp-standard"; }
  chain nat_pre { type nat hook prerouting priority dstnat;
    ip daddr 198.18.3.100 tcp dport 7002 dnat to 198.18.2.2:8002;
    ip daddr 198.18.3.100 tcp dport 7005 dnat to 198.18.2.2:8005; }
  chain nat_post { type nat hook postrouting priority srcnat;
    ip daddr 198.18.2.2 tcp dport 8001 snat to 198.18.2.1:40000-40010;
    ip daddr 198.18.2.2 tcp dport 8005 snat to 198.18.2.1:41000-41010;
    ip6 daddr 2001:db8:2::2 tcp dport 8006 snat to [2001:db8:2::1]:42000-42010; }
}
"""

SERVER = r"""
import socket, threading, sys
def echo(c):
    try:
        while True:
            d = c.recv(4096)
            if not d: break
            c.sendall(d)
    except OSError: pass
def listen(fam, addr, port, handler):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(16)
    def loop():
        while True:
            c, _ = s.accept(); threading.Thread(target=handler, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
def ftp(c):
    c.sendall(b"220 lbsync test\r\n")
    f = c.makefile("rb")
    for line in f:
        if line.startswith(b"PASV"):
            c.sendall(b"227 Entering Passive Mode (198,18,2,2,19,137)\r\n")
        else:
            c.sendall(b"200 ok\r\n")
for p in (8000, 8001, 8002, 7003, 7004, 8005, 5001):
    listen(socket.AF_INET, "198.18.2.2", p, echo)
for p in (8000, 8006):
    listen(socket.AF_INET6, "2001:db8:2::2", p, echo)
listen(socket.AF_INET, "198.18.2.2", 21, ftp)
def udp(fam, addr):
    u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((addr, 9000))
    def loop():
        while True:
            d, a = u.recvfrom(2048); u.sendto(d, a)
    threading.Thread(target=loop, daemon=True).start()
udp(socket.AF_INET, "198.18.2.2"); udp(socket.AF_INET6, "2001:db8:2::2")
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = r"""
import socket, struct, sys, threading, time
conns = []
def tcp(fam, addr, port):
    c = socket.create_connection((addr, port), timeout=5)
    c.sendall(b"hello"); assert c.recv(16) == b"hello"
    conns.append(c)
for addr, port in (("198.18.2.2", 8000), ("198.18.2.2", 8001), ("198.18.3.100", 7002),
                   ("198.18.2.2", 7003), ("198.18.2.2", 7004), ("198.18.3.100", 7005),
                   ("2001:db8:2::2", 8000), ("2001:db8:2::2", 8006)):
    tcp(None, addr, port)
for fam, addr in ((socket.AF_INET, "198.18.2.2"), (socket.AF_INET6, "2001:db8:2::2")):
    u = socket.socket(fam, socket.SOCK_DGRAM); u.settimeout(5)
    u.bind(("", 5353 if fam == socket.AF_INET else 5354))
    u.sendto(b"x", (addr, 9000)); u.recvfrom(16); conns.append(u)
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
r4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); r4.settimeout(5)
pkt = struct.pack("!BBHHH", 8, 0, 0, 0x4c42, 1) + b"lbsyncic"
pkt = pkt[:2] + struct.pack("!H", csum(pkt)) + pkt[4:]
r4.sendto(pkt, ("198.18.2.2", 0)); r4.recvfrom(256)
r6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6); r6.settimeout(5)
r6.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x4c43, 1) + b"lbsync66", ("2001:db8:2::2", 0))
while r6.recvfrom(256)[0][0] != 129: pass
f = socket.create_connection(("198.18.2.2", 21), timeout=5); ff = f.makefile("rb")
ff.readline(); f.sendall(b"PASV\r\n"); assert ff.readline().startswith(b"227")
conns.append(f)
time.sleep(0.3)  # the expectation event comes before the data connection consumes it
d = socket.create_connection(("198.18.2.2", 5001), timeout=5); d.sendall(b"data"); d.recv(16)
conns.append(d)
print("ready", flush=True)
threading.Event().wait()
"""


def build_farm(netns: NetnsSet) -> dict[str, str]:
    ns = {n: netns.add(n) for n in ("cli", "fw", "srv", "peer")}
    netns.veth(ns["cli"], "c0", ns["fw"], "f0")
    netns.veth(ns["fw"], "f1", ns["srv"], "s0")
    for name, dev, v4, v6, gw4, gw6 in (
            ("cli", "c0", "198.18.1.2/24", "2001:db8:1::2/64", "198.18.1.1", "2001:db8:1::1"),
            ("srv", "s0", "198.18.2.2/24", "2001:db8:2::2/64", "198.18.2.1", "2001:db8:2::1")):
        netns.ns(ns[name], f"ip addr add {v4} dev {dev}")
        netns.ns(ns[name], f"ip -6 addr add {v6} dev {dev} nodad")
        netns.ns(ns[name], f"ip route add default via {gw4}")
        netns.ns(ns[name], f"ip -6 route add default via {gw6}")
    netns.ns(ns["fw"], "ip addr add 198.18.1.1/24 dev f0")
    netns.ns(ns["fw"], "ip addr add 198.18.2.1/24 dev f1")
    netns.ns(ns["fw"], "ip -6 addr add 2001:db8:1::1/64 dev f0 nodad")
    netns.ns(ns["fw"], "ip -6 addr add 2001:db8:2::1/64 dev f1 nodad")
    netns.ns(ns["fw"], "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
    for n in ("fw", "peer"):
        netns.ns(ns[n], ["nft", "-f", "-"], input=RULESET)
    return ns


def start(netns: NetnsSet, name: str, code: str) -> None:
    import subprocess
    p = netns.popen(name, [sys.executable, "-c", code], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != b"ready":
        p.kill()
        _, err = p.communicate(timeout=5)
        raise AssertionError(f"traffic script failed: {line!r} {err.decode()[-2000:]}")


def comparable(rec: FlowRecord) -> FlowRecord:
    """Everything but timeout and the local NAT_DONE bits."""
    return dataclasses.replace(rec, timeout=None,
                               status=rec.status & ~(IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE))


def exp_comparable(e: ExpectRecord) -> ExpectRecord:
    return dataclasses.replace(e, timeout=None)


def test_round_trip_every_flow_kind(netns: NetnsSet) -> None:
    ns = build_farm(netns)
    events: list[CtEvent] = []
    exps: list[ExpEvent] = []

    async def scenario() -> None:
        with entered(ns["fw"]):
            ct = Conntrack(on_events=events.extend, on_expectations=exps.extend,
                           groups=DEFAULT_GROUPS + EXPECT_GROUPS)
        with entered(ns["peer"]):
            peer = ConntrackRequests()
        ct.start()
        try:
            await asyncio.to_thread(start, netns, ns["srv"], SERVER)
            await asyncio.to_thread(start, netns, ns["cli"], CLIENT)
            await asyncio.sleep(0.3)
            assert ct.statistics().events.decode_errors == 0
            source = {e.key: FlowRecord.unpack(e.record) for e in await ct.requests.dump_all()}

            # event -> record: the latest state of each flow, fields missing from later
            # events (helper, labels: only sent when they change) kept from earlier ones
            latest: dict[bytes, FlowRecord] = {}
            for ev in events:
                rec = FlowRecord.unpack(ev.record)
                if ev.kind == C.KIND_DESTROY:
                    latest.pop(ev.key, None)
                else:
                    old = latest.get(ev.key)
                    latest[ev.key] = rec if old is None else merge_records(old, rec)
            # msgpack round trip of every record
            packed = {k: r.pack() for k, r in latest.items()}
            assert {k: FlowRecord.unpack(p) for k, p in packed.items()} == latest

            plain = [p for k, p in packed.items() if latest[k].master is None]
            related = [p for k, p in packed.items() if latest[k].master is not None]
            t0 = time.monotonic()
            res = await peer.inject(plain)
            assert res.failed == (), res.errno_counts()
            res = await peer.inject(related)
            assert res.failed == (), res.errno_counts()
            new_exps = [e.expect for e in exps if e.kind == C.KIND_NEW]
            assert len(new_exps) == 1
            res = await peer.create_expectations(new_exps)
            assert res.failed == (), res.errno_counts()
            dumped = {e.key: FlowRecord.unpack(e.record) for e in await peer.dump_all()}
            peer_exps = await peer.dump_expectations()
            elapsed = int(time.monotonic() - t0) + 1
        finally:
            ct.close()
            peer.close()

        assert set(dumped) == set(latest) == set(source)
        for k, want in latest.items():
            got = dumped[k]
            assert comparable(got) == comparable(want), (want, got)
            assert comparable(source[k]) == comparable(want)
            assert want.timeout is not None and got.timeout is not None
            assert want.timeout - 2 - elapsed <= got.timeout <= want.timeout

        # every kind the issue names is present, with the right content
        recs = list(latest.values())

        def find(l4: int, dport: int, v6: bool = False) -> FlowRecord:
            hits = [r for r in recs if r.l4proto == l4 and r.orig.dport == dport
                    and (len(r.orig.src) == 16) == v6]
            assert len(hits) == 1, (l4, dport, v6, recs)
            return hits[0]

        assert all(r.mark == 0x2A for r in recs)
        plain4 = find(IPPROTO_TCP, 8000)
        assert plain4.tcp is not None and plain4.tcp.state == TCP_ESTABLISHED
        assert find(IPPROTO_TCP, 8000, v6=True).tcp is not None
        snat = find(IPPROTO_TCP, 8001)
        assert snat.snat is not None and snat.dnat is None
        assert socket.inet_ntop(socket.AF_INET, snat.snat.addr) == "198.18.2.1"
        assert snat.snat.port is not None and 40000 <= snat.snat.port <= 40010
        dnat = find(IPPROTO_TCP, 7002)
        assert dnat.dnat is not None and dnat.snat is None and dnat.dnat.port == 8002
        both = find(IPPROTO_TCP, 7005)
        assert both.status & IPS_SRC_NAT and both.status & IPS_DST_NAT
        assert both.dnat is not None and both.dnat.port == 8005
        assert both.snat is not None and both.snat.port is not None
        assert 41000 <= both.snat.port <= 41010
        snat6 = find(IPPROTO_TCP, 8006, v6=True)
        assert snat6.snat is not None and snat6.snat.port is not None
        assert 42000 <= snat6.snat.port <= 42010
        assert find(IPPROTO_TCP, 7003).zone == 5
        labelled = find(IPPROTO_TCP, 7004)
        assert labelled.labels is not None and labelled.labels[0] & 0x02
        assert find(IPPROTO_UDP, 9000).l4proto == IPPROTO_UDP
        assert find(IPPROTO_UDP, 9000, v6=True).l4proto == IPPROTO_UDP
        icmp = [r for r in recs if r.l4proto == IPPROTO_ICMP]
        assert len(icmp) == 1 and icmp[0].orig.icmp_type == 8 and icmp[0].orig.icmp_id == 0x4C42
        icmp6 = [r for r in recs if r.l4proto == IPPROTO_ICMPV6]
        assert len(icmp6) == 1 and icmp6[0].orig.icmp_type == 128
        ftp = find(IPPROTO_TCP, 21)
        assert ftp.helper == "ftp"
        data = find(IPPROTO_TCP, 5001)
        assert data.master is not None and data.master.tuple == ftp.orig

        assert len(peer_exps) == 1
        assert exp_comparable(peer_exps[0]) == exp_comparable(new_exps[0])
        assert new_exps[0].master.tuple == ftp.orig and new_exps[0].tuple.tuple.dport == 5001

    asyncio.run(scenario())


FTP_VIA_VIP = r"""
import socket, threading
f = socket.create_connection(("198.18.3.100", 21), timeout=5); ff = f.makefile("rb")
ff.readline(); f.sendall(b"PASV\r\n"); line = ff.readline()
assert line.startswith(b"227") and b"198,18,3,100" in line, line  # rewritten by the NAT helper
f.sendall(b"NOOP\r\n"); ff.readline()  # data after the rewrite: sequence adjustment in use
print("ready", flush=True)
threading.Event().wait()
"""


def test_round_trip_ftp_behind_dnat_with_sequence_adjustment(netns: NetnsSet) -> None:
    """The FTP NAT helper rewrites the server's 227 reply (2 bytes longer): the control entry
    carries a sequence adjustment and the expectation a NAT tuple and callback. No event
    reports the adjustment, so the record comes from a get of the entry."""
    ns = build_farm(netns)
    netns.ns(ns["fw"], "nft add rule inet lbct nat_pre ip daddr 198.18.3.100 tcp dport 21 "
                       "dnat to 198.18.2.2:21")
    netns.ns(ns["peer"], "nft add rule inet lbct nat_pre ip daddr 198.18.3.100 tcp dport 21 "
                         "dnat to 198.18.2.2:21")
    events: list[CtEvent] = []
    exps: list[ExpEvent] = []

    async def scenario() -> None:
        with entered(ns["fw"]):
            ct = Conntrack(on_events=events.extend, on_expectations=exps.extend,
                           groups=DEFAULT_GROUPS + EXPECT_GROUPS)
        with entered(ns["peer"]):
            peer = ConntrackRequests()
        ct.start()
        try:
            await asyncio.to_thread(start, netns, ns["srv"], SERVER)
            await asyncio.to_thread(start, netns, ns["cli"], FTP_VIA_VIP)
            await asyncio.sleep(0.3)
            latest: dict[bytes, FlowRecord] = {}
            for ev in events:
                rec = FlowRecord.unpack(ev.record)
                old = latest.get(ev.key)
                latest[ev.key] = rec if old is None else merge_records(old, rec)
            (from_events,) = [r for r in latest.values() if r.orig.dport == 21]
            # Kernel fact: the helper's sequence adjustment (and the IPS_SEQ_ADJUST bit) is
            # reported by no event; a get (or dump) of the entry has it.
            assert from_events.seqadj_reply is None
            (got_src,) = await ct.requests.get([from_events.key])
            assert got_src is not None
            ctl = FlowRecord.unpack(got_src.record)
            assert ctl.helper == "ftp" and ctl.dnat is not None
            assert ctl.seqadj_reply is not None and ctl.seqadj_reply.offset_after == 2
            assert ctl.status & IPS_SEQ_ADJUST and not from_events.status & IPS_SEQ_ADJUST
            assert await ct.requests.get([b"\x02\x06" + bytes(14)]) == [None]
            res = await peer.inject([ctl.pack()])
            assert res.failed == (), res.errno_counts()
            (exp,) = [e.expect for e in exps if e.kind == C.KIND_NEW]
            assert exp.nat_tuple is not None and exp.fn == "nat-follow-master"
            res = await peer.create_expectations([exp])
            assert res.failed == (), res.errno_counts()
            (got,) = [FlowRecord.unpack(e.record) for e in await peer.dump_all()]
            (got_exp,) = await peer.dump_expectations()
        finally:
            ct.close()
            peer.close()
        assert comparable(got) == comparable(ctl)
        assert got.seqadj_reply == ctl.seqadj_reply and got.seqadj_orig == ctl.seqadj_orig
        assert exp_comparable(got_exp) == exp_comparable(exp)

    asyncio.run(scenario())
