"""pyroute2 as the oracle: the same captured kernel bytes decoded by both, field by field.

The capture: 98 ctnetlink messages read on Linux 6.18 from the ``fw`` namespace of
tests/kernel/test_conntrack_roundtrip.py (events of every flow kind it opens: TCP, UDP, ICMP,
ICMPv6, SNAT, DNAT, both, IPv6, mark, zone 5, label 1, FTP helper + expectation + related data
connection; the DESTROY events of a flush; dump replies of the table and of the expectation
table), each message prefixed with its length (4 bytes big-endian), zlib-compressed, base64.

pyroute2 mis-decodes found here (we compare against what the bytes mean, not against them):
- ``CTA_HELP`` is declared ``asciiz`` but is a nested attribute: pyroute2 returns the nested
  header as text (``'\\x08\\x00\\x01\\x00ftp'``);
- ``CTA_LABELS`` becomes one host-order integer (``'QQ'``), not the kernel's bit array;
- expectation messages (subsystem 2) have no pyroute2 class at all.
"""

from __future__ import annotations

import base64
import ipaddress
import zlib
from typing import Any

import pytest

from lbsync.kernel import ctnetlink as C
from lbsync.kernel.flowrecord import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    FlowRecord,
    FlowTuple,
)

pyroute2_nfct = pytest.importorskip("pyroute2.netlink.nfnetlink.nfctsocket")

CAPTURE = (
    "eNrdnE1oHVUUgO/cee9lrFE0vihSrUoqigYptiBI1DZi6SLustK6q7q1UNCVvrooaYvpoouUEKqLoKWUrLIIKtkUg5"
    "SKUCMUaaXYGmIFC65cPJvec3860/l5mbn/8yYkL5nMuTnfPT/3nJubIIQuXkTkClAL8QuT910o6LTJe0S+sTIU4Ijc"
    "XRnC+AmEO03+cIvcO3wAXkP01G6QwQkZzGWCjAw8CzIgG6FBFLy+9YeIfE2UmIrQAKjwyQ7U6IySsUAuIDeaRG4LfQ"
    "2pji3UoJ+1yB24IvJGrhdQzIM84DnGecaSPDjFsyXFM+IvzzTlac10kjxhAc9Ibx4pf/uuy3n2FPHgIMOzh8nM7WY8"
    "H14Y/pvznHLtb5p5Zl37m2ae03b9LTyQ1m39D6bb1ncqxM84kwFZ4Dl4q/sG5zlj19+M85y162/GeRY0+NvqqkJ+O7"
    "PIed4tzwPPggyTHQIlKdfwY2d/17iuCi7kEZeO9dVHLh3r7LVrCn54copz7a/AtZ/JgCzlmbr9m6r/tdGjVO/kpWut"
    "0szovNbTzDPteu290OY871WoJd5iMl+9zHiuziy/z3mWXK+9mnm+db32auZZ1uBv3W7K3+D5CTLWKGUK0dPBA0sJXt"
    "wmY9F7cZLJxEhnMu6hJsj37hkL54wVFI8leisYE/hnf7l1ROMaLfhRDfl15M8680/76v9frnH+vSX543vZ+N/Lxpp/"
    "nPH/+vbaeY29uBH7W+Kf9dX/LfHr6PXn5iRq3oe5bu2/mG4jz29ePwkZeBZkQBZ4to+tXE/l8205+iEP9DuWo1+mXl"
    "Pxn7t634z1ls2fGZ6bjOfIvu7PPeY7U9/UiCfPPufO5fj3WIH/bOc/K+AxMzEOMdSkozX5EGMFflQkixKyoO+z3/y/"
    "0GP+hb7IQ33z5vfKlRz/n6zoL0KXV6kuA2jiTUQpOlSX++hDkxX9pmjMw4kxge+n6+1LPewh+FAf8OXZ7/JlhT2PSy"
    "+xWETD5ftneBZkQBb0Oz/+2lWm3zPS9fwgatKf+8Ghj1AOG/KATbpWrwGbdB3ekw2nfRKXYmP+EaJHjoJMeFdmg1wg"
    "A69FMhsbcnMYES5ijNGIcK3+N/0vZyEfRRy2KKNgwzhtN+/ZXtycLWD+KJlLfjyVZCvnk/AsyIAs+OQ/f37/Nc91R2"
    "VzyS70oMQc6dmP1DwHx13vr2rmOaFxf9UfnpSPNgp4Xsnn8W8dkOApWAfq35ur2bb+e3Nq/P7ttVvjsfS7KjUef38P"
    "7NDvjJyvcOh3Rs4nOeQxcr6v/9bwbUmeVgHPc5xnZ5361JStBjZh6/P6pLKd+7k+K+MLfVafeWd/l/VpRfv72Euq2N"
    "P73ticfaz1D5bs46Yfshk/hvohZ/Fjo7+raB+f+zsVO9Wmb7WZ7wz1rc7ynY0+3Ga+M9SHO8t3NvYVbNrH0L6CM/vY"
    "2CepaB96NgZznqV9LnlCwfPxQ4RnMMEjp6/p/BUulNCXnnVJ6luffj48XYJvcVHBf8ys+/J+5MeZsFCca3lSV5zq3f"
    "MbMR6nevuqcFk2Tut5Jk2//+itK0rlFbrO6sqbds/M6p9/vftA4QlX65adfUjddYTpfYVS+tIz+1X1NXNmP9e/ef+P"
    "qclm1r743G5+Ef0K0yfON/dTrfgZp0+rnnEC0SiQ51KPW7FvG3OxOGZccufq6Fx8Vn0uWK2Xngt3NZM4fx3PDauhEj"
    "YnPqrqm+o9jujVYj1Zz6Psm41Gyjf9ztHZeWA5+555kPHLCvY1UWuKvfuYi9WeqvbNcvldA2XjkdVEKvFooocXe4+x"
    "nqyn9zMezfX62TWT9f7K8cj/54dcvlXvVcW5lJiL9a6UC8tyJc+rkOvGjZzYrE+/mI1V1j9mYpX/rZacLfXt72TXDr"
    "bfo5xj5+cl+PTV1Vk7sDo7Y4f1dQU7qPcrOfNP+xe1+c/7vzp3AAr3MnI=")


def captured() -> list[bytes]:
    blob = zlib.decompress(base64.b64decode("".join(CAPTURE)))
    out, pos = [], 0
    while pos < len(blob):
        n = int.from_bytes(blob[pos:pos + 4], "big")
        out.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


MESSAGES = captured()
CT_MESSAGES = [m for m in MESSAGES if m[5] == C.NFNL_SUBSYS_CTNETLINK]
EXP_MESSAGES = [m for m in MESSAGES if m[5] == C.NFNL_SUBSYS_CTNETLINK_EXP]


def ours(msg: bytes) -> tuple[C.CtEvent, FlowRecord]:
    dump = bool(int.from_bytes(msg[6:8], "little") & C.NLM_F_MULTI)
    d = C.decode(msg, dump=dump)
    assert len(d.events) == 1
    return d.events[0], FlowRecord.unpack(d.events[0].record)


def oracle_tuple(t: Any, family: int, l4proto: int) -> tuple[int, FlowTuple]:
    ip = t.get_attr("CTA_TUPLE_IP")
    v = "V4" if family == 2 else "V6"
    src = ipaddress.ip_address(ip.get_attr(f"CTA_IP_{v}_SRC")).packed
    dst = ipaddress.ip_address(ip.get_attr(f"CTA_IP_{v}_DST")).packed
    p = t.get_attr("CTA_TUPLE_PROTO")
    num = p.get_attr("CTA_PROTO_NUM")
    if num in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        pre = "CTA_PROTO_ICMP_" if num == IPPROTO_ICMP else "CTA_PROTO_ICMPV6_"
        return num, FlowTuple(src, dst, p.get_attr(pre + "ID"),
                              (p.get_attr(pre + "TYPE") << 8) | p.get_attr(pre + "CODE"))
    return num, FlowTuple(src, dst, p.get_attr("CTA_PROTO_SRC_PORT") or 0,
                          p.get_attr("CTA_PROTO_DST_PORT") or 0)


def test_capture_covers_every_kind() -> None:
    recs = [ours(m)[1] for m in CT_MESSAGES]
    kinds = {ours(m)[0].kind for m in CT_MESSAGES}
    assert kinds == {C.KIND_NEW, C.KIND_UPDATE, C.KIND_DESTROY, C.KIND_DUMP}
    assert {r.l4proto for r in recs} == {1, 6, 17, 58}
    assert {r.family for r in recs} == {2, 10}
    assert any(r.helper == "ftp" for r in recs)
    assert any(r.labels for r in recs)
    assert any(r.zone == 5 for r in recs)
    assert any(r.master is not None for r in recs)
    assert any(r.snat and r.dnat for r in recs)
    assert len(EXP_MESSAGES) == 2


@pytest.mark.parametrize("i", range(len(CT_MESSAGES)))
def test_same_fields_as_pyroute2(i: int) -> None:
    msg = CT_MESSAGES[i]
    ev, rec = ours(msg)
    m = pyroute2_nfct.nfct_msg(msg)
    m.decode()
    assert m["nfgen_family"] == rec.family
    l4, orig = oracle_tuple(m.get_attr("CTA_TUPLE_ORIG"), rec.family, rec.l4proto)
    l4r, reply = oracle_tuple(m.get_attr("CTA_TUPLE_REPLY"), rec.family, rec.l4proto)
    assert (l4, orig) == (rec.l4proto, rec.orig)
    assert (l4r, reply) == (rec.l4proto, rec.reply)
    assert m.get_attr("CTA_STATUS") == rec.status == ev.status
    assert m.get_attr("CTA_TIMEOUT") == rec.timeout
    assert (m.get_attr("CTA_MARK") or 0) == rec.mark == ev.bucket
    assert (m.get_attr("CTA_ZONE") or 0) == rec.zone
    pi = m.get_attr("CTA_PROTOINFO")
    tcp = pi.get_attr("CTA_PROTOINFO_TCP") if pi is not None else None
    if tcp is None:
        assert rec.tcp is None and ev.tcp_state == -1
    else:
        assert rec.tcp is not None
        assert tcp.get_attr("CTA_PROTOINFO_TCP_STATE") == rec.tcp.state == ev.tcp_state
        # DESTROY events carry the state only: absent window scale and flags decode as 0
        assert (tcp.get_attr("CTA_PROTOINFO_TCP_WSCALE_ORIGINAL") or 0) == rec.tcp.wscale_orig
        assert (tcp.get_attr("CTA_PROTOINFO_TCP_WSCALE_REPLY") or 0) == rec.tcp.wscale_reply
        fl_o = tcp.get_attr("CTA_PROTOINFO_TCP_FLAGS_ORIGINAL") or (0, 0)
        fl_r = tcp.get_attr("CTA_PROTOINFO_TCP_FLAGS_REPLY") or (0, 0)
        assert (fl_o[0], fl_r[0]) == (rec.tcp.flags_orig, rec.tcp.flags_reply)
    helper = m.get_attr("CTA_HELP")
    if helper is None:
        assert rec.helper is None
    else:  # pyroute2 mis-decode: the nested CTA_HELP_NAME header comes out as text
        assert rec.helper is not None and helper == "\x08\x00\x01\x00" + rec.helper
    labels = m.get_attr("CTA_LABELS")
    if labels is None:
        assert rec.labels is None
    else:  # pyroute2: one host-order integer
        assert rec.labels is not None and labels == int.from_bytes(rec.labels, "little")
    master = m.get_attr("CTA_TUPLE_MASTER")
    if master is None:
        assert rec.master is None
    else:
        ml4, mt = oracle_tuple(master, rec.family, IPPROTO_TCP)
        assert rec.master is not None and (rec.master.l4proto, rec.master.tuple) == (ml4, mt)
    assert ev.key == rec.key and ev.l4proto == rec.l4proto
    mtype = int.from_bytes(msg[4:6], "little")
    flags = int.from_bytes(msg[6:8], "little")
    if flags & C.NLM_F_MULTI:
        assert ev.kind == C.KIND_DUMP
    elif mtype == C.CT_DELETE:
        assert ev.kind == C.KIND_DESTROY
    else:
        assert ev.kind == (C.KIND_NEW if flags & C.NLM_F_CREATE else C.KIND_UPDATE)


def test_expectation_messages() -> None:
    decoded = [C.decode(m).expectations for m in EXP_MESSAGES]
    assert [len(d) for d in decoded] == [1, 1]
    new, gone = decoded[0][0], decoded[1][0]
    assert (new.kind, gone.kind) == (C.KIND_NEW, C.KIND_DESTROY)
    e = new.expect
    assert e.helper == "ftp" and e.master.l4proto == IPPROTO_TCP
    assert e.master.tuple.dport == 21 and e.tuple.tuple.dport == 5001
    assert e.tuple.tuple.dst == ipaddress.ip_address("198.18.2.2").packed
    assert e.mask.tuple.dport == 0xFFFF and e.mask.tuple.sport == 0
    assert gone.expect.tuple == e.tuple
    # and the expectation re-encodes to the attributes it was decoded from
    again = C.decode(C.encode_exp_create(e, 7)).expectations[0].expect
    assert again == e
