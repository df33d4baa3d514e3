"""The Python bucket function against the real kernel: nft stamps, conntrack shows, we compare.

Two namespaces joined by a veth: ``c`` (client) sends UDP, TCP and ICMP/ICMPv6 echo from many
source addresses (AnyIP local routes) and ports to ``s``, whose nft ruleset stamps
``ct mark set jhash <key> mod B seed S`` on new flows. Which (B, seed) a flow gets is chosen by
its destination port (outside key forms, where the key is the source), by a destination port
range (inside key form, where the key is the destination) or by a source range (ICMP, address-
only key). ``conntrack -L -o extended`` in ``s`` then shows every flow's mark, which must equal
:func:`hashing.jhash.bucket_of`. One combination uses B = 2**32 - 1, where the mark is the raw
jhash minus one: that checks :func:`hashing.jhash.jhash` on all 32 bits.

Run as a script (``python -m tests.kernel.test_jhash_kernel``, root) to print golden vectors
observed in the kernel for tests/unit/test_jhash.py.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from hashing.jhash import bucket_of, nft_jhash_expr
from tests.netns import NetnsSet, unique_prefix

pytestmark = pytest.mark.kernel

# (buckets, seed): small prime, powers of two, the raw-hash modulus; seeds cover 0 and all-ones.
COMBOS: tuple[tuple[int, int], ...] = (
    (7, 0x0), (64, 0x1234), (256, 0x6C627379), (1024, 0xDEADBEEF), (4096, 0xFFFFFFFF),
    (0xFFFFFFFF, 0x9E3779B9),
)
PER_COMBO = 24          # flows per (combo, key form, family)
OUT_DPORT = 5000        # outside form: dport OUT_DPORT + i selects combo i
IN_DPORT = 20000        # inside form: dports IN_DPORT + 1000 * i + k, k < PER_COMBO
V4 = {"c": "198.18.0.1", "s": "198.18.0.2", "pool": "198.18.128.0/17"}
V6 = {"c": "2001:db8:0:1::1", "s": "2001:db8:0:1::2", "pool": "2001:db8:1::/64"}

SENDER = r"""
import json, socket, struct, sys, time
IP_FREEBIND, IPV6_FREEBIND = 15, 78

def freebind(s, fam):
    if fam == socket.AF_INET:
        s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF

flows = json.load(sys.stdin)
keep = []
for f in flows:
    fam = socket.AF_INET6 if ":" in f["src"] else socket.AF_INET
    if f["proto"] == "icmp":
        if fam == socket.AF_INET:
            s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            hdr = struct.pack("!BBHHH", 8, 0, 0, f["id"], 1) + b"lbsync"
            pkt = hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:]
        else:
            s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            pkt = struct.pack("!BBHHH", 128, 0, 0, f["id"], 1) + b"lbsync"  # kernel sums v6
        freebind(s, fam)
        s.bind((f["src"], 0))
        s.sendto(pkt, (f["dst"], 0))
        s.close()
        continue
    kind = socket.SOCK_DGRAM if f["proto"] == "udp" else socket.SOCK_STREAM
    s = socket.socket(fam, kind)
    freebind(s, fam)
    s.bind((f["src"], f["sport"]))
    if kind == socket.SOCK_DGRAM:
        s.sendto(b"lbsync", (f["dst"], f["dport"]))
        s.close()
    else:
        s.setblocking(False)
        s.connect_ex((f["dst"], f["dport"]))   # SYN; the listener's backlog completes it
        keep.append(s)
time.sleep(0.3)
for s in keep:
    s.close()
print(json.dumps({"sent": len(flows)}))
"""


# TCP needs a listener: the kernel kills an unassured entry whose SYN is answered by a RST.
LISTENER = r"""
import socket, sys, time
socks = []
for port in map(int, sys.argv[1:]):
    for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(1024)
        socks.append(s)
print("ready", flush=True)
time.sleep(120)
"""


@dataclass(frozen=True, slots=True)
class Flow:
    """One probe: the key the kernel hashes is (key_addr, key_port) under ``combo``."""

    proto: str              # "udp", "tcp" or "icmp"
    src: str
    sport: int
    dst: str
    dport: int
    icmp_id: int
    combo: int
    key_addr: str
    key_port: int | None

    @property
    def expected(self) -> int:
        b, seed = COMBOS[self.combo]
        return bucket_of(self.key_addr, self.key_port, buckets=b, seed=seed)


def _pool_addr(family: int, combo: int, k: int) -> str:
    """Distinct AnyIP source addresses, spread so every key differs in several bytes."""
    if family == 4:
        return str(ipaddress.IPv4Address("198.18.128.0") + (combo << 8) + 3 * k + 1)
    return str(ipaddress.IPv6Address("2001:db8:1::") + (combo << 40) + (k * 0x10001 + 1))


def plan_flows() -> list[Flow]:
    flows: list[Flow] = []
    icmp_id = 1
    for family, addrs in ((4, V4), (6, V6)):
        for ci in range(len(COMBOS)):
            for k in range(PER_COMBO):
                src = _pool_addr(family, ci, k)
                sport = 1024 + 2111 * k + 37 * ci          # spread over the port space
                for proto in ("udp", "tcp"):
                    # outside form: key = source endpoint, dport selects the combo
                    sp = sport if proto == "udp" else sport + 1
                    flows.append(Flow(proto, src, sp, addrs["s"], OUT_DPORT + ci, 0, ci,
                                      src, sp))
                # inside form: key = destination endpoint
                dport = IN_DPORT + 1000 * ci + k
                flows.append(Flow("udp", addrs["c"], 40000 + k + 100 * ci, addrs["s"], dport,
                                  0, ci, addrs["s"], dport))
                # address-only key (ICMP): the source range selects the combo
                flows.append(Flow("icmp", src, 0, addrs["s"], 0, icmp_id, ci, src, None))
                icmp_id += 1
    return flows


def ruleset() -> str:
    rules = []
    for family, kw in ((4, "ip"), (6, "ip6")):
        proto = "ipv4" if family == 4 else "ipv6"
        icmp = "icmp" if family == 4 else "ipv6-icmp"
        for ci, (b, seed) in enumerate(COMBOS):
            out = nft_jhash_expr(family, "outside", True, b, seed)
            ins = nft_jhash_expr(family, "inside", True, b, seed)
            adr = nft_jhash_expr(family, "outside", False, b, seed)
            lo, hi = _pool_addr(family, ci, 0), _pool_addr(family, ci, PER_COMBO - 1)
            rules += [
                f"meta nfproto {proto} meta l4proto {{ tcp, udp }} th dport {OUT_DPORT + ci} "
                f"ct mark set {out}",
                f"meta nfproto {proto} meta l4proto udp th dport "
                f"{IN_DPORT + 1000 * ci}-{IN_DPORT + 1000 * ci + 999} ct mark set {ins}",
                f"meta l4proto {icmp} {kw} saddr {lo}-{hi} ct mark set {adr}",
            ]
    body = "\n    ".join(f"ct state new {r}" for r in rules)
    return textwrap.dedent(f"""
        table inet lbhash {{
          chain pre {{
            type filter hook prerouting priority mangle; policy accept;
            {body}
          }}
        }}
    """)


_LINE = re.compile(
    r"^ipv(?P<v>[46])\s+\d+\s+(?P<proto>\w+)\s+\d+\s+(?:\d+\s+)?(?:[A-Z_]+\s+)?"
    r"src=(?P<src>\S+) dst=(?P<dst>\S+) (?P<rest>.*)$")


def observed_marks(text: str) -> dict[tuple[str, str, int, str, int], int]:
    """(proto, src, sport or icmp id, dst, dport) of the original direction -> ct mark."""
    out: dict[tuple[str, str, int, str, int], int] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        proto = {"icmp": "icmp", "icmpv6": "icmp"}.get(m["proto"], m["proto"])
        rest = m["rest"]
        mark = re.search(r"\bmark=(\d+)", rest)
        if mark is None:
            continue
        if proto == "icmp":
            ident = re.search(r"\bid=(\d+)", rest)
            if ident is None:
                continue
            key = (proto, str(ipaddress.ip_address(m["src"])), int(ident[1]),
                   str(ipaddress.ip_address(m["dst"])), 0)
        else:
            ports = re.search(r"\bsport=(\d+) dport=(\d+)", rest)
            if ports is None:
                continue
            key = (proto, str(ipaddress.ip_address(m["src"])), int(ports[1]),
                   str(ipaddress.ip_address(m["dst"])), int(ports[2]))
        out[key] = int(mark[1])
    return out


def flow_id(f: Flow) -> tuple[str, str, int, str, int]:
    if f.proto == "icmp":
        return ("icmp", f.src, f.icmp_id, f.dst, 0)
    return (f.proto, f.src, f.sport, f.dst, f.dport)


def run_probe(netns: NetnsSet) -> tuple[list[Flow], dict[tuple[str, str, int, str, int], int]]:
    """Build the namespace pair, send every probe, return the flows and the kernel's marks."""
    c, s = netns.add("c"), netns.add("s")
    netns.veth(c, "hc0", s, "hs0")
    for ns, me, peer_if in ((c, "c", "hc0"), (s, "s", "hs0")):
        batch = [
            f"address add {V4[me]}/24 dev {peer_if}",
            f"address add {V6[me]}/64 dev {peer_if} nodad",
        ]
        netns.ns(ns, ["ip", "-batch", "-"], input="\n".join(batch) + "\n")
    # The client owns both pools (AnyIP); the server routes them back through the veth.
    netns.ns(c, ["ip", "-batch", "-"], input=(
        f"route add local {V4['pool']} dev lo\n"
        f"route add local {V6['pool']} dev lo\n"))
    netns.ns(s, ["ip", "-batch", "-"], input=(
        f"route add {V4['pool']} via {V4['c']}\n"
        f"route add {V6['pool']} via {V6['c']}\n"))
    # Static neighbours: a burst must not wait in (and overflow) an unresolved-neighbour queue.
    macs = {me: netns.ns(ns, ["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()
            for ns, me, dev in ((c, "c", "hc0"), (s, "s", "hs0"))}
    for ns, peer, dev in ((c, "s", "hc0"), (s, "c", "hs0")):
        netns.ns(ns, ["ip", "-batch", "-"], input=(
            f"neigh replace {V4[peer]} lladdr {macs[peer]} dev {dev} nud permanent\n"
            f"neigh replace {V6[peer]} lladdr {macs[peer]} dev {dev} nud permanent\n"))
    netns.ns(s, ["nft", "-f", "-"], input=ruleset())
    ports = [str(OUT_DPORT + ci) for ci in range(len(COMBOS))]
    listener = netns.popen(s, [sys.executable, "-c", LISTENER, *ports],
                           stdout=subprocess.PIPE)
    assert listener.stdout is not None and listener.stdout.readline().strip() == b"ready"
    flows = plan_flows()
    payload = json.dumps([{"proto": f.proto, "src": f.src, "sport": f.sport, "dst": f.dst,
                           "dport": f.dport, "id": f.icmp_id} for f in flows])
    cp = netns.ns(c, [sys.executable, "-c", SENDER], input=payload, timeout=60)
    assert json.loads(cp.stdout.strip().splitlines()[-1]) == {"sent": len(flows)}
    listed = netns.ns(s, ["conntrack", "-L", "-o", "extended"]).stdout
    return flows, observed_marks(listed)


def test_bucket_of_matches_kernel_jhash_marks(netns: NetnsSet) -> None:
    flows, marks = run_probe(netns)
    missing = [f for f in flows if flow_id(f) not in marks]
    assert not missing, f"{len(missing)} flows not in conntrack, e.g. {missing[:3]}"
    wrong = [(f, marks[flow_id(f)], f.expected) for f in flows
             if marks[flow_id(f)] != f.expected]
    assert not wrong, f"{len(wrong)} of {len(flows)} marks differ, e.g. {wrong[:3]}"
    # Every key form, family and combination was exercised (the plan is not degenerate) ...
    forms = {(f.proto, ":" in f.src, f.key_port is None, f.key_addr == f.dst, f.combo)
             for f in flows}
    assert len(forms) == 2 * len(COMBOS) * 4
    # ... and the buckets are spread, not all equal (a constant mark would not test much).
    for ci, (b, _) in enumerate(COMBOS):
        seen = {marks[flow_id(f)] for f in flows if f.combo == ci}
        assert len(seen) >= min(b, 20), (b, sorted(seen))


def main() -> None:
    """Print golden vectors observed in the kernel: (addr, port, buckets, seed, mark)."""
    ns = NetnsSet(unique_prefix("g"))
    try:
        flows, marks = run_probe(ns)
    finally:
        ns.cleanup()
    seen: dict[tuple[str, bool, bool, int], int] = {}
    for f in flows:
        form = (f.proto, ":" in f.src, f.key_addr == f.dst, f.combo)
        if seen.get(form, 0) >= 2 or flow_id(f) not in marks:
            continue
        seen[form] = seen.get(form, 0) + 1
        b, seed = COMBOS[f.combo]
        side = "inside" if f.key_addr == f.dst else "outside"
        print(f"    ({f.key_addr!r}, {f.key_port!r}, {b:#x}, {seed:#010x}, "
              f"{marks[flow_id(f)]}),  # {f.proto} {side}")


if __name__ == "__main__":
    main()
