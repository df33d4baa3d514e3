"""``lbsync lab up|status|exec|down|traffic``: the namespace lab from the command line.

User errors (bad arguments, a lab that already exists, a missing node) are one line and exit
code 2; ``down`` of a lab that is not there says so and exits 1.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from typing import Any

from lbsync.cli import UsageError
from lbsync.lab import farm, traffic
from lbsync.lab.farm import Lab, LabError


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {v}")
    return v


def _prefix(text: str) -> str:
    if not farm.PREFIX_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"must match {farm.PREFIX_RE.pattern} (lowercase, <= 12 chars), not {text!r}")
    return text


def register(sub: Any) -> None:
    p = sub.add_parser("lab", help="build, inspect and drive a network-namespace lab farm")
    lsub = p.add_subparsers(dest="lab_command", metavar="ACTION", parser_class=type(p))
    lsub.required = True

    def named(q: argparse.ArgumentParser) -> None:
        q.add_argument("--name", type=_prefix, default=farm.DEFAULT_PREFIX, metavar="PREFIX",
                       help="lab name: namespace prefix (default %(default)s)")

    up = lsub.add_parser("up", help="build a lab farm")
    named(up)
    up.add_argument("--nodes", type=_positive_int, default=farm.DEFAULT_NODES, metavar="N",
                    help=f"firewall nodes, 1..{farm.MAX_NODES} (default %(default)s)")
    up.add_argument("--ipv6", action="store_true", help="add IPv6 addresses, VIPs and NAT")
    up.add_argument("--buckets", type=_positive_int, default=farm.DEFAULT_BUCKETS,
                    metavar="B", help="bucket count (default %(default)s)")
    up.add_argument("--daemons", action="store_true",
                    help="start lbsyncd in every node namespace (generated key ring)")
    up.add_argument("--keepalived", action="store_true",
                    help="with --daemons: also run keepalived per node as lbsync's second "
                         "failure signal ([keepalived] enabled, advert_int 0.1)")
    up.add_argument("--mode", choices=("active", "vrrp"), default="active",
                    help="active: the lbsync farm (default); vrrp: the incumbent, 2 nodes, "
                         "keepalived + conntrackd FTFW")
    up.add_argument("--advert-int", type=float, default=1.0, metavar="S",
                    help="--mode vrrp: VRRP advert_int in seconds (default %(default)s)")
    up.add_argument("--json", action="store_true", help="print lab.json")
    up.set_defaults(func=_up)

    st = lsub.add_parser("status", help="show a lab (or every lab)")
    st.add_argument("--name", type=_prefix, default=None, metavar="PREFIX",
                    help="one lab (default: every lab)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    ex = lsub.add_parser("exec", help="run a command in a lab namespace: lab exec 1 -- ip a")
    named(ex)
    ex.add_argument("node", metavar="NODE",
                    help="node id (1, n1), cli, srv, hubo/hubi/hubr/hubm")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD",
                    help="the command and its arguments")
    ex.set_defaults(func=_exec)

    dn = lsub.add_parser("down", help="tear a lab down")
    named(dn)
    dn.set_defaults(func=_down)

    tr = lsub.add_parser("traffic", help="run TCP and UDP flows through a lab and report")
    named(tr)
    traffic.add_client_arguments(tr)
    tr.set_defaults(func=_traffic)


def _load(prefix: str) -> Lab:
    try:
        return Lab.load(prefix)
    except LabError as exc:
        raise UsageError(str(exc)) from None


def _up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    if args.mode == "vrrp":
        return _up_vrrp(args)
    if args.keepalived and not args.daemons:
        raise UsageError("lab up --keepalived needs --daemons (keepalived signals lbsyncd)")
    try:
        lab = Lab.create(args.name, args.nodes, ipv6=args.ipv6, buckets=args.buckets)
    except LabError as exc:
        raise UsageError(str(exc)) from None
    if args.daemons:
        from lbsync.lab import daemons

        try:
            daemons.up(lab, keepalived=args.keepalived, timeout=30)
        except BaseException as exc:
            lab.destroy()
            if isinstance(exc, LabError):
                sys.stderr.write(f"lbsync: error: daemons did not start: {exc}\n")
                return 1
            raise
    if args.json:
        print(json.dumps(lab.state(), indent=1))
        return 0
    a = lab.addr(4)
    print(f"lab {lab.prefix}: {lab.nodes} nodes, {lab.buckets} buckets, "
          f"{'IPv4+IPv6' if lab.ipv6 else 'IPv4'}, built in {time.monotonic() - t0:.2f} s")
    print(f"  client {lab.client_ns} {a.client}, server {lab.server_ns} {a.server}, "
          f"VIPs {a.outside_vip} / {a.inside_vip}")
    for i in lab.node_ids:
        print(f"  node {i}: {lab.node_ns(i)}, owns {len(lab.split[i])} buckets"
              + (", lbsyncd running" if args.daemons else "")
              + (" with keepalived" if args.keepalived else ""))
    print(f"  config {lab.config_path}; try: lbsync lab traffic --name {lab.prefix} "
          f"--tcp 10 --udp 10 --duration 3")
    return 0


def _up_vrrp(args: argparse.Namespace) -> int:
    if args.daemons or args.keepalived or args.ipv6 or args.nodes not in (2, farm.DEFAULT_NODES) \
            or args.buckets != farm.DEFAULT_BUCKETS:
        raise UsageError("lab up --mode vrrp: the incumbent lab is 2 IPv4 nodes "
                         "(no --daemons, --keepalived, --ipv6, --nodes or --buckets)")
    if not args.advert_int > 0:
        raise UsageError(f"--advert-int must be > 0, not {args.advert_int}")
    from lbsync.lab import incumbent

    try:
        lab = incumbent.up(args.name, advert_int=args.advert_int)
    except LabError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(lab.state(), indent=1))
        return 0
    print(f"lab {lab.prefix} (incumbent: keepalived advert_int {args.advert_int} + conntrackd "
          f"FTFW): node {lab.master()} holds the VIPs; try: lbsync lab traffic --name "
          f"{lab.prefix} --mode snat --tcp 10 --udp 10 --duration 3")
    return 0


def _status(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else farm.list_labs()
    if args.name and not farm.exists(args.name):
        raise UsageError(f"no lab named {args.name!r}")
    out: list[dict[str, Any]] = []
    for name in names:
        try:
            out.append(Lab.load(name).status())
        except LabError as exc:
            out.append({"prefix": name, "error": str(exc),
                        "namespaces": {n: True for n in farm.lab_namespaces(name)}})
    if args.json:
        print(json.dumps(out if not args.name else out[0], indent=1))
        return 0
    if not out:
        print("no labs")
        return 0
    for st in out:
        if "error" in st:
            print(f"lab {st['prefix']}: {st['error']} ({len(st['namespaces'])} namespaces left; "
                  f"lbsync lab down --name {st['prefix']})")
            continue
        state = "complete" if st["complete"] else "INCOMPLETE"
        print(f"lab {st['prefix']}: {state}, {st['buckets']} buckets, "
              f"{'IPv4+IPv6' if st['ipv6'] else 'IPv4'}, {st['processes']} processes")
        for n in st["nodes"]:
            if not n["present"]:
                print(f"  node {n['id']}: namespace {n['namespace']} missing")
                continue
            owned = n["owned"] if n.get("owned") is not None else "no"
            print(f"  node {n['id']}: {n['namespace']}, owns {owned} buckets, "
                  f"{n['conntrack']} conntrack entries")
    return 0


def _exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("lab exec: no command given (lab exec NODE -- CMD ...)")
    lab = _load(args.name)
    try:
        ns = lab.resolve_ns(args.node)
    except LabError as exc:
        raise UsageError(str(exc)) from None
    try:
        return subprocess.call(farm.ns_argv(ns, cmd))
    except FileNotFoundError as exc:
        raise UsageError(f"cannot run ip: {exc.strerror}") from None


def _down(args: argparse.Namespace) -> int:
    from lbsync.lab import daemons

    if not farm.destroy(args.name):
        sys.stderr.write(f"lbsync: no lab named {args.name!r}: nothing to tear down\n")
        return 1
    daemons.remove_runtime_files(args.name)  # keepalived notify FIFOs of --keepalived
    print(f"lab {args.name}: torn down")
    return 0


def _traffic(args: argparse.Namespace) -> int:
    if args.tcp == 0 and args.udp == 0:
        raise UsageError("lab traffic: nothing to do (give --tcp N and/or --udp N)")
    lab = _load(args.name)
    try:
        traffic.plan_flows(lab, tcp=0, udp=0, mode=args.mode,
                           families=tuple(int(c) for c in args.family),
                           egress_ports=args.egress_ports)
        run = traffic.TrafficRun.start(
            lab, tcp=args.tcp, udp=args.udp, rate=args.rate, duration=args.duration,
            mode=args.mode, families=args.family, egress_ports=args.egress_ports,
            max_rate=args.max_rate, gap=args.gap, connect_timeout=args.connect_timeout,
            drain=args.drain, lookup=not args.no_lookup)
    except LabError as exc:
        raise UsageError(str(exc)) from None
    # Ctrl-C (or SIGTERM) ends the run: the client writes its final report.
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run.wait_ready()
        while run.proc.poll() is None and not stopping:
            time.sleep(0.05)
        rep = run.stop(timeout=120)
    except LabError as exc:
        run.kill()
        sys.stderr.write(f"lbsync: error: {exc}\n")
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if args.json:
        print(json.dumps(rep))
    else:
        sys.stdout.write(traffic.summary(rep))
    return 0
