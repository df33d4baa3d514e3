"""State moves for real: a SNATed TCP connection survives a path change to a second firewall.

``cli`` reaches ``srv`` through ``fwa`` (links c0/s0) or ``fwb`` (links c1/s1); both firewalls
carry the same addresses and the same ruleset: SNAT to 198.18.2.1:40000-40010, ``ct state
invalid drop`` and ``nf_conntrack_tcp_loose=0``, so a connection ``fwb`` does not know stalls.
Two connections are opened through ``fwa``; only the first one's entry (read from ``fwa`` by
the adapter) is injected into ``fwb``. Then the path moves: c0/s0 down, c1/s1 up. The injected
connection keeps carrying data both ways with the same translated address and port; the other
one (the control) stalls.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from lbsync.kernel.conntrack import ConntrackRequests
from lbsync.kernel.flowrecord import TCP_ESTABLISHED, FlowRecord
from lbsync.kernel.netns import entered
from tests.netns import NetnsSet

pytestmark = pytest.mark.kernel

RULESET = """
table inet lbmove {
  chain filter_fw { type filter hook forward priority 0; ct state invalid drop; }
  chain nat_post { type nat hook postrouting priority srcnat;
    ip daddr 198.18.2.2 tcp dport 8001 snat to 198.18.2.1:40000-40010; }
}
"""

SERVER = r"""
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.2.2", 8001)); s.listen(8)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    def echo(c=c, peer=peer):
        while True:
            d = c.recv(4096)
            if not d: return
            # answer with the peer address the server sees: it must never change
            c.sendall(d + b" " + f"{peer[0]}:{peer[1]}".encode() + b"\n")
    threading.Thread(target=echo, daemon=True).start()
"""

CLIENT = r"""
import socket, sys
conns = [socket.create_connection(("198.18.2.2", 8001), timeout=5) for _ in range(2)]
def ask(i, tmo):
    c = conns[i]; c.settimeout(tmo)
    try:
        c.sendall(b"ping%d" % i)
        return c.recv(256).decode().strip()
    except OSError as e:
        return "stalled " + type(e).__name__
print("ready", " | ".join(ask(i, 5) for i in range(2)), flush=True)
for line in sys.stdin:
    i, tmo = line.split()
    print(ask(int(i), float(tmo)), flush=True)
"""


def test_snat_tcp_connection_moves_to_second_firewall(netns: NetnsSet) -> None:
    cli, srv = netns.add("cli"), netns.add("srv")
    fws = {"a": netns.add("fwa"), "b": netns.add("fwb")}
    for i, (tag, fw) in enumerate(fws.items()):
        netns.veth(cli, f"c{i}", fw, f"{tag}0")
        netns.veth(fw, f"{tag}1", srv, f"s{i}")
        netns.ns(fw, f"ip addr add 198.18.1.1/24 dev {tag}0")
        netns.ns(fw, f"ip addr add 198.18.2.1/24 dev {tag}1")
        netns.ns(fw, "sysctl -qw net.ipv4.ip_forward=1 net.netfilter.nf_conntrack_tcp_loose=0")
        netns.ns(fw, ["nft", "-f", "-"], input=RULESET)
        netns.ns(cli, f"ip addr add 198.18.1.2/24 dev c{i}")
        netns.ns(srv, f"ip addr add 198.18.2.2/24 dev s{i}")
    # the second path stays down until the takeover
    netns.ns(cli, "ip link set c1 down")
    netns.ns(srv, "ip link set s1 down")
    netns.ns(cli, "ip route add 198.18.2.0/24 via 198.18.1.1 dev c0")

    server = netns.popen(srv, [sys.executable, "-c", SERVER], stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
    client = netns.popen(cli, [sys.executable, "-c", CLIENT], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    first = client.stdout.readline().decode().split(maxsplit=1)
    assert first[0] == "ready", first
    before = [part.split()[1] for part in first[1].split(" | ")]
    assert all(p.startswith("198.18.2.1:400") for p in before), before

    async def move() -> tuple[int, list[FlowRecord]]:
        with entered(fws["a"]):
            src = ConntrackRequests()
        with entered(fws["b"]):
            dst = ConntrackRequests()
        try:
            table = [FlowRecord.unpack(e.record) for e in await src.dump_all()]
            # the entry of the connection whose translated port the server saw first
            nat_port = int(before[0].rsplit(":", 1)[1])
            moving = [r for r in table if r.snat is not None and r.snat.port == nat_port]
            assert len(moving) == 1, table
            assert moving[0].tcp is not None and moving[0].tcp.state == TCP_ESTABLISHED
            res = await dst.inject([moving[0].pack()])
            assert res.failed == (), res.errno_counts()
            return nat_port, [FlowRecord.unpack(e.record) for e in await dst.dump_all()]
        finally:
            src.close()
            dst.close()

    nat_port, injected = asyncio.run(move())
    assert len(injected) == 1 and injected[0].snat is not None
    assert injected[0].snat.port == nat_port

    # takeover: the path now runs through fwb only
    netns.ns(cli, "ip link set c0 down")
    netns.ns(srv, "ip link set s0 down")
    netns.ns(cli, "ip link set c1 up")
    netns.ns(srv, "ip link set s1 up")
    netns.ns(cli, "ip route replace 198.18.2.0/24 via 198.18.1.1 dev c1")

    def ask(i: int, tmo: float) -> str:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(f"{i} {tmo}\n".encode())
        client.stdin.flush()
        return client.stdout.readline().decode().strip()

    for n in range(3):
        answer = ask(0, 5.0)
        assert answer == f"ping0 {before[0]}", (n, answer)
    assert ask(1, 1.5).startswith("stalled"), "the control connection must not survive"

    async def check() -> list[FlowRecord]:
        with entered(fws["b"]):
            dst = ConntrackRequests()
        try:
            return [FlowRecord.unpack(e.record) for e in await dst.dump_all()]
        finally:
            dst.close()

    after = [r for r in asyncio.run(check()) if r.snat is not None]
    assert [r.snat.port for r in after if r.snat] == [nat_port]
    assert after[0].tcp is not None and after[0].tcp.state == TCP_ESTABLISHED
    client.kill()
