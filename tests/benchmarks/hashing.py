"""Owner-map benchmark: lbsync's map against modulo, rendezvous, Maglev and jump hash.

Run from the repository root: ``python -m tests.benchmarks.hashing [--quick]``.

For N nodes and B buckets, four single changes from an all-weight-1 farm: ``join`` (node N+1,
weight 1), ``leave`` and ``drain`` of the middle node (id ceil(N/2)) and ``reweight`` (middle
node 1 -> 2). For every method, in the same run:

- ``moved/min``: buckets whose owner changed, over the theoretical minimum: the fewest owner
  changes any exactly balanced map (largest-remainder apportionment) needs, starting from a
  balanced map of the old view (computed here with exact fractions, independently of hashing/);
- ``max/ideal``: the most loaded node's buckets over its ideal share ``B * w_i / W``, the worse
  of the maps before and after the change.

Methods, each mapping bucket ids to node ids (weights as virtual slots where the method has no
native weights): ``lbsync`` (hashing.ownermap.assign, previous map given), ``modulo``
(xt_cluster style: ``slots[b mod S]`` over nodes sorted by id, weight = slots), ``rendezvous``
(highest random weight, logarithmic weighting), ``maglev`` (lookup table of the smallest prime
M > 100 * N, weighted turns, bucket -> table[h(b) mod M]) and ``jump`` (Lamping-Veach jump
consistent hash over the slot list). Drain is a removal for every method but lbsync.

Timing: the lbsync map plus all successors for N = 32, B = 4096 (median of 20 runs, 5 with
``--quick``), with its ratio to the modulo map of the same N and B timed in the same run.
The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from hashing.ownermap import Member, OwnerMap, View, assign

NodeSet = tuple[tuple[int, int], ...]          # (node id, weight), eligible only, by id
Mapper = Callable[[NodeSet, int], tuple[int, ...]]
_M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64 finaliser: a fixed, well-spread 64-bit hash (no Python hash())."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def slots(nodes: NodeSet) -> list[int]:
    return [n for n, w in nodes for _ in range(w)]


def modulo_map(nodes: NodeSet, buckets: int) -> tuple[int, ...]:
    s = slots(nodes)
    return tuple(s[b % len(s)] for b in range(buckets))


def rendezvous_map(nodes: NodeSet, buckets: int) -> tuple[int, ...]:
    out = []
    for b in range(buckets):
        best, best_score = 0, -math.inf
        for n, w in nodes:
            u = (mix64((n << 40) ^ b) + 1) / 18446744073709551617.0   # in (0, 1)
            score = -w / math.log(u)
            if score > best_score:
                best, best_score = n, score
        out.append(best)
    return tuple(out)


def jump(key: int, n: int) -> int:
    b, j = -1, 0
    while j < n:
        b = j
        key = (key * 2862933555777941757 + 1) & _M64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def jump_map(nodes: NodeSet, buckets: int) -> tuple[int, ...]:
    s = slots(nodes)
    return tuple(s[jump(mix64(b), len(s))] for b in range(buckets))


def next_prime(n: int) -> int:
    def prime(k: int) -> bool:
        return k > 1 and all(k % d for d in range(2, math.isqrt(k) + 1))
    while not prime(n):
        n += 1
    return n


def maglev_table(nodes: NodeSet, size: int) -> list[int]:
    perms = []
    for n, _ in nodes:
        offset = mix64(n) % size
        skip = mix64(n ^ 0x5BD1E995) % (size - 1) + 1
        perms.append((offset, skip))
    table = [0] * size
    nxt = [0] * len(nodes)
    filled = 0
    while True:
        for i, (n, w) in enumerate(nodes):
            for _ in range(w):                   # weighted turns
                offset, skip = perms[i]
                c = (offset + nxt[i] * skip) % size
                while table[c]:
                    nxt[i] += 1
                    c = (offset + nxt[i] * skip) % size
                table[c] = n
                nxt[i] += 1
                filled += 1
                if filled == size:
                    return table


def maglev_map_for(n_max: int) -> Mapper:
    size = next_prime(100 * n_max + 1)

    def mapper(nodes: NodeSet, buckets: int) -> tuple[int, ...]:
        t = maglev_table(nodes, size)
        return tuple(t[mix64(b ^ 0xA5A5) % size] for b in range(buckets))
    return mapper


# -- scenarios ------------------------------------------------------------------------------


def scenario_views(n: int) -> dict[str, tuple[View, View]]:
    base = View.of(Member(i) for i in range(1, n + 1))
    mid = (n + 1) // 2
    return {
        "join": (base, base.with_member(Member(n + 1))),
        "leave": (base, base.without(mid)),
        "drain": (base, base.with_member(Member(mid, drained=True))),
        "reweight": (base, base.with_member(Member(mid, 2))),
    }


def nodeset(view: View) -> NodeSet:
    return tuple((m.node_id, m.weight) for m in view.eligible)


def lr_counts(view: View, buckets: int) -> tuple[dict[int, int], dict[int, Fraction]]:
    """Independent largest-remainder check data: floors and quotas (exact)."""
    total = sum(m.weight for m in view.eligible)
    q = {m.node_id: Fraction(buckets * m.weight, total) for m in view.eligible}
    return {i: math.floor(x) for i, x in q.items()}, q


def least_moves(prev: Sequence[int], view: View, buckets: int) -> int:
    floors, q = lr_counts(view, buckets)
    held = Counter(prev)
    frac = {i: x - floors[i] for i, x in q.items()}
    seats = buckets - sum(floors.values())
    kept = sum(min(held[i], floors[i]) for i in q)
    if seats:
        cutoff = sorted(frac.values(), reverse=True)[seats - 1]
        forced = [i for i in q if frac[i] > cutoff]
        tied = [i for i in q if frac[i] == cutoff]
        kept += sum(held[i] > floors[i] for i in forced)
        kept += min(seats - len(forced), sum(held[i] > floors[i] for i in tied))
    return buckets - kept


def exact_apportionment(owners: Sequence[int], view: View, buckets: int) -> bool:
    floors, q = lr_counts(view, buckets)
    counts = Counter(owners)
    if set(counts) - set(q) or sum(counts.values()) != buckets:
        return False
    up = [q[i] - floors[i] for i in q if counts[i] == floors[i] + 1]
    down = [q[i] - floors[i] for i in q if counts[i] == floors[i]]
    if len(up) + len(down) != len(q):
        return False
    return not (up and down) or min(up) >= max(down)


def max_over_ideal(owners: Sequence[int], view: View, buckets: int) -> float:
    _, q = lr_counts(view, buckets)
    counts = Counter(owners)
    return max(float(counts[i] / x) for i, x in q.items())


@dataclass(frozen=True, slots=True)
class Row:
    """One scenario: method -> (moved/min, max/ideal)."""

    kind: str
    n: int
    b: int
    minimum: int
    figures: dict[str, tuple[float, float]]
    lbsync_ok: bool


def run_tables(ns: Sequence[int], bs: Sequence[int]) -> tuple[list[Row], bool]:
    methods: dict[str, Mapper] = {
        "modulo": modulo_map,
        "rendezvous": rendezvous_map,
        "maglev": maglev_map_for(max(ns) + 1),
        "jump": jump_map,
    }
    rows: list[Row] = []
    lbsync_ok = True
    for n in ns:
        for b in bs:
            for kind, (old_v, new_v) in scenario_views(n).items():
                old_m = assign(old_v, b, None)
                new_m = assign(new_v, b, old_m)
                minimum = least_moves(old_m.owners, new_v, b)
                exact = exact_apportionment(old_m.owners, old_v, b) and \
                    exact_apportionment(new_m.owners, new_v, b)
                figures: dict[str, tuple[float, float]] = {}
                results = {"lbsync": (old_m.owners, new_m.owners)}
                for name, mapper in methods.items():
                    results[name] = (mapper(nodeset(old_v), b), mapper(nodeset(new_v), b))
                for name, (before, after) in results.items():
                    moved = sum(x != y for x, y in zip(before, after, strict=True))
                    ratio = moved / minimum if minimum else (1.0 if moved == 0 else math.inf)
                    load = max(max_over_ideal(before, old_v, b), max_over_ideal(after, new_v, b))
                    figures[name] = (ratio, load)
                ok = exact and figures["lbsync"][0] == 1.0
                lbsync_ok &= ok
                rows.append(Row(kind, n, b, minimum, figures, ok))
    return rows, lbsync_ok


METHODS = ("lbsync", "modulo", "rendezvous", "maglev", "jump")


def print_table(rows: list[Row]) -> None:
    head = f"{'change':8} {'N':>3} {'B':>5} {'min':>5} | " + " | ".join(
        f"{m:>16}" for m in METHODS)
    print("moved/min  max/ideal  per method")
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = []
        for m in METHODS:
            ratio, load = r.figures[m]
            cells.append(f"{ratio:7.2f} {load:8.3f}")
        print(f"{r.kind:8} {r.n:>3} {r.b:>5} {r.minimum:>5} | " + " | ".join(cells))


def summarise(rows: list[Row]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind in ("join", "leave", "drain", "reweight", "all"):
        sel = [r for r in rows if kind == "all" or r.kind == kind]
        out[kind] = {}
        for m in METHODS:
            ratios = [r.figures[m][0] for r in sel]
            loads = [r.figures[m][1] for r in sel]
            out[kind][m] = {
                "moved_over_min_mean": round(statistics.fmean(ratios), 3),
                "moved_over_min_max": round(max(ratios), 3),
                "max_over_ideal_max": round(max(loads), 3),
            }
    return out


def print_summary(summary: dict[str, dict[str, dict[str, float]]], title: str) -> None:
    print()
    print(f"summary {title}: moved/min mean (worst), worst max/ideal")
    print(f"{'change':8} | " + " | ".join(f"{m:>22}" for m in METHODS))
    for kind, per in summary.items():
        cells = [f"{v['moved_over_min_mean']:5.2f} ({v['moved_over_min_max']:5.2f}) "
                 f"{v['max_over_ideal_max']:6.3f}" for v in per.values()]
        print(f"{kind:8} | " + " | ".join(f"{c:>22}" for c in cells))


def time_median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timing(runs: int) -> dict[str, float]:
    n, b = 32, 4096
    old_v = View.of(Member(i) for i in range(1, n))
    view = old_v.with_member(Member(n))
    prev = assign(old_v, b, None)

    def lbsync() -> tuple[OwnerMap, tuple[int, ...]]:
        m = assign(view, b, prev)
        return m, m.successors()

    nodes = nodeset(view)
    lb = time_median(lbsync, runs)
    mod = time_median(lambda: modulo_map(nodes, b), runs)
    succ_only = time_median(lambda: prev.successors(), runs)
    return {"map_plus_successors_ms": round(lb * 1e3, 3), "modulo_map_ms": round(mod * 1e3, 3),
            "ratio_to_modulo": round(lb / mod, 1), "successors_only_ms": round(succ_only * 1e3, 3),
            "runs": runs}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small sweep (CI: proves it runs)")
    args = p.parse_args(argv)
    ns: tuple[int, ...]
    bs: tuple[int, ...]
    if args.quick:
        ns, bs, runs = (2, 3, 8, 32), (64, 1024), 5
    else:
        ns, bs, runs = (2, 3, 4, 5, 8, 12, 16, 24, 32), (64, 256, 1024, 4096), 20
    t0 = time.perf_counter()
    rows, lbsync_ok = run_tables(ns, bs)
    print_table(rows)
    summary = summarise(rows)
    print_summary(summary, f"over N in {list(ns)} and B in {list(bs)}")
    big = summarise([r for r in rows if r.b == max(bs)])
    print_summary(big, f"at B = {max(bs)} only")
    t = timing(runs)
    print()
    print(f"lbsync map + all successors, N=32 B=4096: median {t['map_plus_successors_ms']:.2f} ms"
          f" of {runs} (target <= 50 ms); modulo map {t['modulo_map_ms']:.3f} ms; ratio "
          f"{t['ratio_to_modulo']:.1f}x; successors alone {t['successors_only_ms']:.2f} ms")
    print(f"lbsync moved/min = 1.00 and exact apportionment in every scenario: {lbsync_ok}")
    result = {
        "benchmark": "hashing", "quick": args.quick, "n": list(ns), "b": list(bs),
        "scenarios": len(rows), "lbsync_minimal_and_exact": lbsync_ok,
        "timing": {**t, "target_ms": 50.0, "meets_target": t["map_plus_successors_ms"] <= 50.0},
        "summary": summary, f"summary_b{max(bs)}": big,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result, sort_keys=True))
    return 0 if lbsync_ok else 1


if __name__ == "__main__":
    sys.exit(main())
