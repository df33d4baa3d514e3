"""Failover drill, side by side: lbsync active-active against keepalived + conntrackd.

Run from the repository root as root: ``python -m tests.benchmarks.failover [--quick]
[--plot FILE.png]``. The same drill on every variant, in one run:

- **lbsync**: the 3-node active-active lab (:mod:`lbsync.lab.farm`, 64 buckets, the lab's NAT
  rules), ``lbsyncd`` on every node (:mod:`lbsync.lab.daemons`), membership profile ``default``
  (and ``fast`` in a full run);
- **incumbent**: the 2-node active-backup lab (:mod:`lbsync.lab.incumbent`): keepalived moves the
  VIPs, conntrackd FTFW replicates, the primary-backup notify script commits on the new master;
  ``advert_int`` 1 s (VRRPv2, keepalived's default) and 0.1 s (VRRPv3).

Drill: 500 TCP + 200 UDP flows (``--quick``: 100 + 40), all ingress SNAT to the inside VIP
(traffic mode ``snat``), 10 requests/s per flow; wait until the standby side holds every flow
(lbsync: every store and pre-injection caught up; incumbent: node 2's external cache), then t0 =
crash of the node forwarding the flows, links down in the same step (lbsync: node 1's daemon
SIGKILLed, ``daemons.kill_daemon(links_down=True)``; incumbent: the master's keepalived VRRP child,
keepalived and conntrackd SIGKILLed, ``IncumbentLab.kill_node``), then the traffic runs on for a
settle time longer than TCP's retransmission backoff needs. Every daemon runs SCHED_RR 50:
lbsync's ``[daemon]`` default, and conntrackd (default RR 99) and any realtime keepalived thread
put there with ``chrt`` (:meth:`IncumbentLab.equalise_scheduling`).

Figures per variant (times relative to t0; from the traffic tool's per-flow timelines, whose
resolution is the request interval, 0.1 s, and its gap threshold, 2 intervals):

- survived: flows open, answering at the end, with the NAT peer they started with; resets; NAT
  peer changes;
- per flow, the silence around the kill: the longest recorded gap that ends after t0 and starts
  before t0 + 1 s (0 for a flow that never fell silent for longer than the gap threshold);
  percentiles over the flows that saw one (``gap_*``) and over all flows (``gap_all_*``);
- share of all flows that saw a gap (active-backup: all; active-active: the dead node's share,
  which the benchmark computes from the flows' conntrack marks and the initial bucket map);
- forwarding resumed: first reply after t0 of any interrupted flow (``resume_first_s``) and the
  per-flow resume percentiles (end of its gap - t0);
- control plane: lbsync's last claim of the dead node's buckets (takeover records); the
  incumbent's VIP seen on node 2 (polled every 10 ms) and its primary script done (commit);
- health of the run: requests lost over the whole run (UDP: never received by the server;
  TCP: never answered), lbsync survivors' fences during the drill (a fenced node empties its
  ``@owned``), takeovers of the victim's buckets decided before the kill (false declarations),
  and flows already silent when the kill came (``disturbed``: a stall of the machine under
  way; their gaps are not charged to the kill). A run with disturbed flows or fences measured
  the machine's load as much as the failover.

Ratios lbsync / incumbent (p99 gap, resume p99) are printed for each incumbent variant.
Targets for lbsync: 100 % survival, p99 gap shorter than the incumbent's at advert_int 0.1.
``--quick`` (< 60 s): fewer flows, lbsync default and the incumbent at 0.1 only. Every figure is
a line; the last line of stdout is one JSON object with all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from lbsync.control import ControlError
from lbsync.lab import daemons
from lbsync.lab.farm import Lab, LabError
from lbsync.lab.incumbent import IncumbentLab
from lbsync.lab.traffic import TrafficRun, alive_over_time, percentiles
from tests.netns import unique_prefix

BUCKETS = 64
VICTIM = 1
RATE = 10.0
WINDOW_AFTER = 1.0        # a gap starting up to 1 s after t0 still belongs to the kill
PRE_SLACK = 0.5           # ... and one starting up to 0.5 s before it (5 request intervals)
PLOT_BEFORE = 1.0
SETTLE_BEFORE = 1.5       # quiet time between the last interim report and the kill
PLOT_STEP = 0.05
FULL = (500, 200)
QUICK = (100, 40)
PROBES = (50, 90, 99, 100)


# ------------------------------------------------------------------------------- figures


REPORTS: str | None = None   # --reports DIR: keep every final traffic report there


def keep(rep: dict[str, Any], variant: str, t0: float) -> None:
    """With ``--reports``: the final traffic report (and, for lbsync, the daemons' logs)."""
    if REPORTS:
        os.makedirs(REPORTS, exist_ok=True)
        name = variant.replace(" ", "-")
        with open(os.path.join(REPORTS, f"{name}.json"), "w") as f:
            json.dump({"t0_kill": t0, "report": rep}, f)


def drill_figures(rep: dict[str, Any], t0: float, victim_flows: set[int] | None
                  ) -> dict[str, Any]:
    """Outcome and gap figures of one drill from the final traffic report (see the module
    docstring); ``victim_flows``: ids of the flows the dead node forwarded (None: all)."""
    kill = t0 - rep["t0_monotonic"]
    flows = rep["per_flow"]
    survived = [f for f in flows if f["alive"] and f["state"] == "open"
                and not f["peer_changes"]]
    silence: dict[int, float] = {}
    resume: dict[int, float] = {}
    disturbed = 0
    for f in flows:
        # a gap the kill caused starts at the flow's last reply before the kill (at most a
        # couple of request intervals earlier) or after it; an older one was a stall of the
        # machine (or the client) already under way: the flow counts as disturbed
        disturbed += any(a < kill - PRE_SLACK and b > kill - SETTLE_BEFORE for a, b in f["gaps"])
        around = [(a, b) for a, b in f["gaps"]
                  if b > kill and kill - PRE_SLACK <= a < kill + WINDOW_AFTER]
        if around:
            silence[f["id"]] = max(b - a for a, b in around)
            resume[f["id"]] = max(b for _a, b in around) - kill
        if f["state"] == "open" and not f["alive"]:  # never came back before the end
            silence[f["id"]] = max(silence.get(f["id"], 0.0),
                                   rep["sending"][1] - (f["last_reply"] or kill))
    victims = set(victim_flows) if victim_flows is not None else {f["id"] for f in flows}
    n = len(flows)
    out: dict[str, Any] = {
        "flows": n, "tcp": rep["tcp"], "udp": rep["udp"], "connected": rep["connected"],
        "survived": len(survived), "survived_pct": round(100.0 * len(survived) / max(1, n), 2),
        "resets": rep["resets"], "errors": rep["errors"],
        "nat_peer_changes": rep["nat_peer_changes"],
        "server_duplicates": rep["server_duplicates"],
        "rate_per_flow": rep["achieved_rate_per_flow"], "gap_threshold_s": rep["gap_threshold"],
        "flows_with_gap": len(silence),
        "share_with_gap_pct": round(100.0 * len(silence) / max(1, n), 2),
        "dead_node_share_pct": round(100.0 * len(victims) / max(1, n), 2),
        "gaps_outside_dead_node": len(set(silence) - victims),
        "resume_first_s": round(min(resume.values()), 4) if resume else None,
        "flows_disturbed_before_kill": disturbed,
    }
    # requests lost over the whole run (the kill's outage and anything else): UDP requests
    # the server never received, TCP requests never answered by the end
    for proto in ("tcp", "udp"):
        sent = sum(f["sent"] for f in flows if f["proto"] == proto)
        got = sum(f["server_received"] if proto == "udp" else f["replies"]
                  for f in flows if f["proto"] == proto)
        out[f"{proto}_requests_lost_pct"] = round(100.0 * (sent - got) / max(1, sent), 2)
    for k, v in percentiles(list(silence.values()), PROBES).items():
        out[f"gap_{k}_s"] = v
    all_flows = [silence.get(f["id"], 0.0) for f in flows]
    for k, v in percentiles(all_flows, PROBES).items():
        out[f"gap_all_{k}_s"] = v
    for proto in ("tcp", "udp"):
        xs = [s for f in flows if f["proto"] == proto and (s := silence.get(f["id"]))]
        for k, v in percentiles(xs, (50, 99, 100)).items():
            out[f"{proto}_gap_{k}_s"] = v
    for k, v in percentiles(list(resume.values()), (50, 99, 100)).items():
        out[f"resume_{k}_s"] = v
    return out


def alive_curve(rep: dict[str, Any], t0: float) -> list[tuple[float, float]]:
    """(seconds since the kill, % of flows answering), from PLOT_BEFORE before the kill."""
    kill = t0 - rep["t0_monotonic"]
    n = max(1, rep["flows"])
    return [(round(t - kill, 3), round(100.0 * a / n, 2))
            for t, a in alive_over_time(rep, PLOT_STEP) if t - kill >= -PLOT_BEFORE]


# ---------------------------------------------------------------------------------- drills


def start_traffic(lab: Lab, tcp: int, udp: int) -> TrafficRun:
    run = TrafficRun.start(lab, tcp=tcp, udp=udp, rate=RATE, mode="snat", lookup=True,
                           drain=2.0, max_rate=RATE * (tcp + udp))
    ready = run.wait_ready(timeout=90)
    if ready["connected"] != tcp + udp:
        run.kill()
        raise LabError(f"traffic: only {ready['connected']} of {tcp + udp} flows connected")
    return run


def configure(lab: Lab, **membership: Any) -> None:
    """Append a ``[membership]`` table to the lab's cluster file (before the daemons start)."""
    lines = ["", "[membership]"]
    lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}"
              for k, v in membership.items()]
    with open(lab.config_path, "a") as f:
        f.write("\n".join(lines) + "\n")


def fences(lab: Lab, nodes: Sequence[int]) -> int:
    """Fences so far (stall or lost majority) of ``nodes``, from their status."""
    return sum(int(daemons.status(lab, i, timeout=30)["membership"]["fences"]) for i in nodes)


def run_lbsync(tcp: int, udp: int, settle: float, profile: str) -> dict[str, Any]:
    lab = Lab.create(unique_prefix("f"), 3, buckets=BUCKETS)
    case: dict[str, Any] = {"variant": f"lbsync {profile}", "nodes": 3}
    try:
        configure(lab, profile=profile)
        daemons.start_daemons(lab)
        daemons.wait_ready(lab, timeout=30)
        survivors = [i for i in lab.node_ids if i != VICTIM]
        with start_traffic(lab, tcp, udp) as run:
            def caught_up() -> bool:
                for i in lab.node_ids:
                    st = daemons.status(lab, i)
                    if st["store_entries"] < tcp + udp or st["pending_inject"]:
                        return False
                return True

            daemons.wait_for(caught_up, 60, what="stores and pre-injection caught up")
            # the conntrack lookup of an interim report stalls the client for a moment: take
            # it well before the kill, so that its stall cannot pass for the kill's gap
            before = run.snapshot()
            time.sleep(SETTLE_BEFORE)
            # what the victim forwards now (normally the initial map's share; less if a peer
            # declared it dead earlier and it rejoined)
            inherited = set(daemons.status(lab, VICTIM, timeout=30)["forwarding"])
            victim_flows = {f["id"] for f in before["per_flow"]
                            if f["mark"] is not None and f["mark"] in inherited}
            fences_before = fences(lab, survivors)
            t0 = daemons.kill_daemon(lab, VICTIM, links_down=True)
            try:
                daemons.wait_for(lambda: set().union(*(lab.owned(i) for i in survivors))
                                 >= inherited, 20, interval=0.05,
                                 what="survivors own the victim's buckets")
            except LabError:
                case["takeover_incomplete"] = True
            time.sleep(settle)
            rep = run.stop()
        # a survivor that fences (its loop stalled past T_stall, or it lost its majority)
        # empties its @owned: every flow it forwards falls silent, not only the dead node's
        case["survivor_fences"] = fences(lab, survivors) - fences_before
        records = [r for i in survivors
                   for r in daemons.status(lab, i, timeout=30)["takeovers"]
                   if r["dead_node"] == VICTIM]
        # a claim of the victim's buckets before the kill is a false declaration (a starved
        # daemon's silence read as death): counted, and not the kill's takeover
        case["takeovers_before_kill"] = sum(r["claimed_monotonic"] < t0 for r in records)
        after = [r["claimed_monotonic"] for r in records if r["claimed_monotonic"] >= t0]
        case["control_s"] = round(max(after) - t0, 4) if after else None
        case["control"] = "last bucket of the dead node claimed"
        keep(rep, case["variant"], t0)
        case.update(drill_figures(rep, t0, victim_flows))
        case["curve"] = alive_curve(rep, t0)
        return case
    except BaseException:
        daemons.dump_logs(lab, tail=20)
        raise
    finally:
        if REPORTS:
            for i in lab.node_ids:
                with contextlib.suppress(OSError):
                    shutil.copy(daemons.log_path(lab, i),
                                os.path.join(REPORTS, f"lbsync-{profile}-n{i}.log"))
        lab.destroy()
        daemons.remove_runtime_files(lab.prefix)


def run_incumbent(tcp: int, udp: int, settle: float, advert_int: float) -> dict[str, Any]:
    lab = IncumbentLab.create_incumbent(unique_prefix("i"), advert_int=advert_int)
    case: dict[str, Any] = {"variant": f"incumbent advert_int {advert_int:g}", "nodes": 2,
                            "advert_int": advert_int,
                            "vrrp_version": 2 if advert_int == int(advert_int) else 3}
    try:
        lab.start(equalise=True)
        with start_traffic(lab, tcp, udp) as run:
            daemons.wait_for(lambda: lab.external_cache_size(2) >= tcp + udp, 60,
                             what="node 2's external cache holds every flow")
            run.snapshot()     # the same interim report as the lbsync drill, same timing
            time.sleep(SETTLE_BEFORE)
            t0 = lab.kill_node(1)
            t0_wall = time.time()
            t_vip = lab.wait_takeover(2, timeout=30)
            daemons.wait_for(lambda: "done primary" in lab.notify_log(2), 30,
                             what="node 2's primary script")
            time.sleep(settle)
            rep = run.stop()
        case["control_s"] = round(t_vip - t0, 4)
        case["control"] = "VIP seen on node 2"
        case["commit_done_s"] = _script_done_after(lab.notify_log(2), t0_wall)
        case["notify_failures"] = lab.notify_log(2).count("failed")
        case["scheduling_equalised"] = True
        keep(rep, case["variant"], t0)
        case.update(drill_figures(rep, t0, None))
        case["curve"] = alive_curve(rep, t0)
        return case
    except BaseException:
        for i in lab.node_ids:
            for name in ("notify.log", "keepalived.log"):
                with contextlib.suppress(OSError):
                    tail = (lab.run_dir(i) / name).read_text().splitlines()[-15:]
                    print(f"--- n{i}/{name}\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        lab.destroy()


def _script_done_after(log: str, t0_wall: float) -> float | None:
    """Seconds from the crash to the primary script's ``done primary`` (its wall-clock
    timestamps; the crash's wall-clock instant taken right after t0)."""
    for line in log.splitlines():
        stamp, _, text = line.partition(" ")
        if text.strip() == "done primary":
            with contextlib.suppress(ValueError):
                if float(stamp) > t0_wall - 1.0:
                    return round(float(stamp) - t0_wall, 4)
    return None


# ---------------------------------------------------------------------------------- output


COLUMNS = (("survived_pct", "surv%", "{:.1f}"), ("resets", "rst", "{:d}"),
           ("nat_peer_changes", "natchg", "{:d}"), ("share_with_gap_pct", "gap%", "{:.1f}"),
           ("dead_node_share_pct", "dead%", "{:.1f}"), ("gap_p50_s", "gap p50", "{:.3f}"),
           ("gap_p99_s", "gap p99", "{:.3f}"), ("gap_max_s", "gap max", "{:.3f}"),
           ("gap_all_p99_s", "all p99", "{:.3f}"), ("resume_first_s", "resume1", "{:.3f}"),
           ("resume_p99_s", "res p99", "{:.3f}"), ("control_s", "control", "{:.3f}"),
           ("survivor_fences", "fences", "{:d}"),
           ("flows_disturbed_before_kill", "disturb", "{:d}"),
           ("udp_requests_lost_pct", "udplost%", "{:.1f}"))


def row(case: dict[str, Any]) -> str:
    cells = []
    for key, head, fmt in COLUMNS:
        v = case.get(key)
        cells.append(f"{'-' if v is None else fmt.format(v):>{max(7, len(head))}}")
    return f"{case['variant']:26} " + " ".join(cells)


def header() -> str:
    return f"{'variant':26} " + " ".join(f"{h:>{max(7, len(h))}}" for _k, h, _f in COLUMNS)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def plot(cases: Sequence[dict[str, Any]], path: str, title: str) -> bool:
    """Flows answering over time around the kill, one line per variant (PNG); False if
    matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for c in cases:
        xs = [t for t, _ in c["curve"]]
        ys = [a for _, a in c["curve"]]
        ax.step(xs, ys, where="post", label=c["variant"])
    ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since the crash of the forwarding node")
    ax.set_ylabel("flows answering (% of all)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="100 TCP + 40 UDP, lbsync default and the incumbent at 0.1 only")
    ap.add_argument("--plot", default=None, metavar="FILE.png",
                    help="write the flows-alive-over-time plot here (needs matplotlib)")
    ap.add_argument("--variants", default=None, metavar="V,V",
                    help="run only these (lbsync-default, lbsync-fast, incumbent-1, "
                    "incumbent-0.1); ratios need an lbsync variant first")
    ap.add_argument("--reports", default=None, metavar="DIR",
                    help="keep each variant's final traffic report (JSON) in DIR")
    args = ap.parse_args(argv)
    global REPORTS
    REPORTS = args.reports
    if os.geteuid() != 0:
        print(json.dumps({"error": "needs root"}))
        return 1
    started = time.monotonic()
    tcp, udp = QUICK if args.quick else FULL
    figures: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m tests.benchmarks.failover" + (" --quick" if args.quick else ""),
        "quick": args.quick, "tcp": tcp, "udp": udp, "rate_per_flow": RATE, "mode": "snat",
        "scheduling": "SCHED_RR 50 for every daemon (lbsync's default; conntrackd set by chrt)",
        "load_before": os.getloadavg()[0], "cases": []}
    plan: list[tuple[str, Any]] = [("lbsync", "default"), ("incumbent", 0.1)]
    if not args.quick:
        plan += [("incumbent", 1.0), ("lbsync", "fast")]
    if args.variants:
        known = {"lbsync-default": ("lbsync", "default"), "lbsync-fast": ("lbsync", "fast"),
                 "incumbent-1": ("incumbent", 1.0), "incumbent-0.1": ("incumbent", 0.1)}
        try:
            plan = [known[v] for v in args.variants.split(",")]
        except KeyError as exc:
            ap.error(f"unknown variant {exc} (known: {', '.join(known)})")
    print(f"{tcp} TCP + {udp} UDP flows, ingress SNAT, {RATE:g} requests/s per flow; "
          "gap percentiles over the flows that saw one, 'all p99' over every flow", flush=True)
    print(header(), flush=True)
    for kind, arg in plan:
        try:
            if kind == "lbsync":
                c = run_lbsync(tcp, udp, 4.0, arg)
            else:
                c = run_incumbent(tcp, udp, 12.0 if arg >= 1.0 else 4.0, arg)
        except (LabError, ControlError) as exc:   # one broken case does not end the run
            c = {"variant": f"{kind} {arg}", "error": str(exc), "curve": []}
            figures["cases"].append(c)
            print(f"{c['variant']:26} failed: {exc}", flush=True)
            continue
        figures["cases"].append(c)
        print(row(c), flush=True)
    ok = [c for c in figures["cases"] if "error" not in c]
    lb: dict[str, Any] = next((c for c in ok if c["variant"].startswith("lbsync")), {})
    figures["ratios"] = {}
    for mine in (c for c in ok if c["variant"].startswith("lbsync")):
        for c in (c for c in ok if c["variant"].startswith("incumbent")):
            r = {k: ratio(mine.get(f"{k}_s"), c.get(f"{k}_s"))
                 for k in ("gap_p99", "gap_all_p99", "resume_p99", "resume_first", "control")}
            r["share_with_gap"] = ratio(mine.get("share_with_gap_pct"),
                                        c.get("share_with_gap_pct"))
            figures["ratios"][f"{mine['variant']} / {c['variant']}"] = r
            print(f"{mine['variant']} / {c['variant']}: gap p99 x{r['gap_p99']}, all-flows p99 "
                  f"x{r['gap_all_p99']}, resume p99 x{r['resume_p99']}, control "
                  f"x{r['control']}, share of flows with a gap x{r['share_with_gap']}",
                  flush=True)
    inc01: dict[str, Any] = next(
        (c for c in ok if c.get("advert_int") == 0.1), {})
    figures["targets"] = {
        "lbsync_survived_100pct": lb.get("survived_pct") == 100.0,
        "lbsync_gap_p99_below_incumbent_0.1": (lb.get("gap_p99_s") or 0.0)
        < (inc01.get("gap_p99_s") or float("inf")),
    }
    print(f"targets: lbsync 100 % survival {figures['targets']['lbsync_survived_100pct']}; "
          f"p99 gap below the incumbent's at advert_int 0.1 "
          f"{figures['targets']['lbsync_gap_p99_below_incumbent_0.1']}", flush=True)
    if args.plot:
        title = (f"{tcp} TCP + {udp} UDP flows, SNAT; crash of the forwarding node at 0 "
                 f"({figures['date']})")
        if plot(figures["cases"], args.plot, title):
            print(f"plot written to {args.plot}", flush=True)
            figures["plot"] = args.plot
        else:
            print("plot skipped: matplotlib is not installed", flush=True)
    figures["load_after"] = os.getloadavg()[0]
    figures["wall_s"] = round(time.monotonic() - started, 1)
    for c in figures["cases"]:   # the curves are for the plot; keep the JSON line short
        c.pop("curve", None)
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
