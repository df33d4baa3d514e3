"""The nft adapter: the only module of lbsync that runs ``nft``.

Everything here runs ``nft`` in the current network namespace or, with ``netns=NAME``, through
``ip netns exec NAME nft ...`` (the lab and the kernel tests). The text it builds is small and
pure (``*_text`` functions, unit-tested); the functions that run ``nft`` only glue them to the
kernel.

Rules this module keeps:
- ``apply_ruleset`` replaces every chain and named map of ``table inet lbsync`` in ONE ``nft -f``
  transaction and never touches the elements of ``@owned``: ownership is the daemon's. It flushes
  the chains that exist in the kernel, deletes those the new text no longer declares (or declares
  with another hook or priority), flushes or deletes named maps, and loads the text, which
  redeclares ``set owned`` without elements (a no-op on an existing set). Named sets are runtime
  state (``@owned``, a fencing set): never flushed or deleted by an apply.
- ``owned_transaction`` changes ``@owned`` in ONE transaction that tolerates buckets already
  present (``add element`` of an existing element is accepted) and buckets already absent (nft
  1.0.6 has no ``destroy element``, and deleting a missing element fails the whole transaction, so
  each bucket to remove is first added, then deleted, in the same transaction).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILY = "inet"
TABLE = "lbsync"
OWNED_SET = "owned"
NETNS_DIR = Path("/run/netns")
NETNS_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

# nft's named priorities for the inet family (nft(8), "CHAIN PRIORITIES").
PRIORITY_NAMES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
                  "srcnat": 100}


class NftError(RuntimeError):
    """``nft`` failed (or could not be run); ``str()`` is one line with nft's own message."""


class NetnsNotFound(NftError):
    """The named network namespace does not exist."""


@dataclass(frozen=True, slots=True)
class ChainSpec:
    """A chain as declared: base chains have ``type``, ``hook`` and a numeric ``priority``."""

    name: str
    type: str | None = None
    hook: str | None = None
    priority: int | None = None


# --------------------------------------------------------------------------------------------
# Running nft


def nft_argv(args: Sequence[str], netns: str | None = None) -> list[str]:
    """The argv that runs ``nft ARGS`` in the current namespace or in ``netns``."""
    if netns is None:
        return ["nft", *args]
    if not NETNS_RE.match(netns):
        raise ValueError(f"not a network namespace name: {netns!r}")
    return ["ip", "netns", "exec", netns, "nft", *args]


def run_nft(args: Sequence[str], *, netns: str | None = None, input: str | None = None,
            timeout: float = 30.0) -> str:
    """Run nft; return its stdout; raise :class:`NftError` with nft's first error line."""
    if netns is not None and not (NETNS_DIR / netns).exists():
        raise NetnsNotFound(f"no network namespace {netns!r}")
    argv = nft_argv(args, netns)
    try:
        cp = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise NftError(f"cannot run {argv[0]}: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise NftError(f"nft {' '.join(args)}: timed out after {timeout} s") from None
    if cp.returncode != 0:
        raise NftError(f"nft {' '.join(args)}: {_first_error(cp.stderr)}")
    return cp.stdout


def _first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "Error:" in line:
            return line
    return lines[0] if lines else "failed"


def _table_missing(exc: NftError) -> bool:
    return "No such file or directory" in str(exc)


# --------------------------------------------------------------------------------------------
# Reading the kernel


def list_table(netns: str | None = None, *, terse: bool = False) -> str | None:
    """``nft list table inet lbsync`` (``terse``: without set elements); None if absent."""
    args = ["-t"] if terse else []
    try:
        return run_nft([*args, "list", "table", FAMILY, TABLE], netns=netns)
    except NftError as exc:
        if _table_missing(exc):
            return None
        raise


def _list_json(netns: str | None) -> list[dict[str, Any]]:
    try:
        out = run_nft(["-j", "list", "table", FAMILY, TABLE], netns=netns)
    except NftError as exc:
        if _table_missing(exc):
            return []
        raise
    try:
        items: list[dict[str, Any]] = json.loads(out)["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise NftError(f"nft -j list table: unexpected output ({exc})") from None
    return items


def kernel_objects(netns: str | None = None
                   ) -> tuple[list[ChainSpec], list[tuple[str, str]]]:
    """The chains and the named sets/maps (kind, name; other than ``owned``) of the table."""
    chains: list[ChainSpec] = []
    sets: list[tuple[str, str]] = []
    for item in _list_json(netns):
        if "chain" in item:
            c = item["chain"]
            prio = c.get("prio")
            chains.append(ChainSpec(name=c["name"], type=c.get("type"), hook=c.get("hook"),
                                    priority=int(prio) if prio is not None else None))
        for kind in ("set", "map"):
            if kind in item and item[kind]["name"] != OWNED_SET:
                sets.append((kind, item[kind]["name"]))
    return chains, sets


def parse_elements(listing_json: str) -> set[int]:
    """The integer elements of ``nft -j list set ...`` output."""
    try:
        items = json.loads(listing_json)["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise NftError(f"nft -j list set: unexpected output ({exc})") from None
    out: set[int] = set()
    for item in items:
        s = item.get("set")
        if s is None:
            continue
        for e in s.get("elem", []):
            if isinstance(e, dict) and "elem" in e:  # an element with options (timeout ...)
                e = e["elem"]["val"]
            if isinstance(e, bool) or not isinstance(e, int):
                raise NftError(f"@{OWNED_SET}: unexpected element {e!r}")
            out.add(e)
    return out


def list_owned(netns: str | None = None) -> set[int]:
    """The buckets currently in ``@owned``."""
    out = run_nft(["-j", "list", "set", FAMILY, TABLE, OWNED_SET], netns=netns)
    return parse_elements(out)


# --------------------------------------------------------------------------------------------
# Writing: pure text builders


_CHAIN_RE = re.compile(r"^\s*chain\s+([A-Za-z0-9_]+)\s*\{\s*$")
_BASE_RE = re.compile(r"^\s*type\s+(\w+)\s+hook\s+(\w+)\s+priority\s+([\w+\- ]+?)\s*;")
_SETMAP_RE = re.compile(r"^\s*(set|map)\s+([A-Za-z0-9_]+)\s*\{\s*$")


def _priority(text: str) -> int | None:
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    m = re.fullmatch(r"(\w+)\s*([+-])\s*(\d+)", text)
    if m and m.group(1) in PRIORITY_NAMES:
        off = int(m.group(3))
        return PRIORITY_NAMES[m.group(1)] + (off if m.group(2) == "+" else -off)
    return PRIORITY_NAMES.get(text)


def declared_objects(text: str) -> tuple[list[ChainSpec], list[tuple[str, str]]]:
    """Chains (with their base spec) and named sets/maps declared by a ruleset text.

    The text is lbsync's own rendering (one ``chain NAME {`` per line, the base-chain spec on
    the next line), not arbitrary nft syntax.
    """
    chains: list[ChainSpec] = []
    sets: list[tuple[str, str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _CHAIN_RE.match(line)
        if m:
            spec = ChainSpec(name=m.group(1))
            if i + 1 < len(lines):
                b = _BASE_RE.match(lines[i + 1])
                if b:
                    spec = ChainSpec(name=m.group(1), type=b.group(1), hook=b.group(2),
                                     priority=_priority(b.group(3)))
            chains.append(spec)
            continue
        s = _SETMAP_RE.match(line)
        if s:
            sets.append((s.group(1), s.group(2)))
    return chains, sets


def apply_text(text: str, kernel_chains: Sequence[ChainSpec],
               kernel_sets: Sequence[tuple[str, str]]) -> str:
    """The one transaction that replaces the kernel's chains and maps by ``text``'s.

    Order matters: every existing chain is flushed first (dropping its jumps), so chains that
    go away can then be deleted; the new text is loaded last. ``@owned`` is never flushed or
    deleted, and the text redeclares it without elements.
    """
    new_chains, new_sets = declared_objects(text)
    wanted = {c.name: c for c in new_chains}
    t = f"{FAMILY} {TABLE}"
    out = [f"add table {t}"]
    out += [f"flush chain {t} {c.name}" for c in kernel_chains]
    for c in kernel_chains:
        w = wanted.get(c.name)
        if w is None or (w.type, w.hook, w.priority) != (c.type, c.hook, c.priority):
            out.append(f"delete chain {t} {c.name}")
    for kind, name in kernel_sets:
        # A named map is part of the ruleset: flushed (the text redeclares its elements) or,
        # when the text no longer declares it, deleted. A named set holds runtime state
        # (@owned, a fencing set): never flushed, never deleted here.
        if kind != "map":
            continue
        verb = "flush" if (kind, name) in new_sets else "delete"
        out.append(f"{verb} map {t} {name}")
    # Declare and flush every chain of the text too, so the transaction replaces them even if
    # one appeared in the kernel after it was read (another apply): rules are never appended
    # to a chain that already has some.
    for c in new_chains:
        if c.type is not None and c.hook is not None and c.priority is not None:
            out.append(f"add chain {t} {c.name} {{ type {c.type} hook {c.hook} "
                       f"priority {c.priority}; policy accept; }}")
        else:
            out.append(f"add chain {t} {c.name}")
        out.append(f"flush chain {t} {c.name}")
    return "\n".join(out) + "\n" + text


def _elements(buckets: Iterable[int]) -> str:
    return ", ".join(str(b) for b in sorted(buckets))


def owned_transaction_text(add: Iterable[int], remove: Iterable[int]) -> str:
    """One transaction adding ``add`` to and removing ``remove`` from ``@owned``.

    Tolerant: adding a present bucket is accepted by nft; a bucket to remove is added first and
    then deleted, so removing an absent bucket does not fail the transaction.
    """
    a, r = set(add), set(remove)
    for b in a | r:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 0xFFFFFFFF:
            raise ValueError(f"not a bucket number: {b!r}")
    both = a & r
    if both:
        raise ValueError(f"buckets both added and removed: {_elements(both)}")
    s = f"{FAMILY} {TABLE} {OWNED_SET}"
    out = []
    if a:
        out.append(f"add element {s} {{ {_elements(a)} }}")
    if r:
        out.append(f"add element {s} {{ {_elements(r)} }}")
        out.append(f"delete element {s} {{ {_elements(r)} }}")
    return "\n".join(out) + ("\n" if out else "")


# --------------------------------------------------------------------------------------------
# Writing: the kernel


def apply_ruleset(text: str, netns: str | None = None) -> None:
    """Install ``text`` (a rendered ``table inet lbsync``), replacing chains and maps
    atomically and leaving the elements of ``@owned`` as they are."""
    chains, sets = kernel_objects(netns)
    run_nft(["-f", "-"], netns=netns, input=apply_text(text, chains, sets))


def owned_transaction(add: Iterable[int], remove: Iterable[int],
                      netns: str | None = None) -> None:
    """Add and remove buckets of ``@owned`` in one transaction (:func:`owned_transaction_text`)."""
    text = owned_transaction_text(add, remove)
    if text:
        run_nft(["-f", "-"], netns=netns, input=text)


def delete_table(netns: str | None = None) -> bool:
    """Remove ``table inet lbsync`` (tests, lab teardown); False if it was absent."""
    try:
        run_nft(["delete", "table", FAMILY, TABLE], netns=netns)
    except NftError as exc:
        if _table_missing(exc):
            return False
        raise
    return True


def canonical_listing(text: str, timeout: float = 30.0) -> str:
    """How the kernel lists ``text``: loaded into a throwaway network namespace
    (``unshare --net``; nothing else changes) and listed tersely. Needs root."""
    script = f"nft -f - && nft -t list table {FAMILY} {TABLE}"
    try:
        cp = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], input=text,
                            capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise NftError(f"cannot run unshare: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise NftError(f"canonical listing timed out after {timeout} s") from None
    if cp.returncode != 0:
        raise NftError(f"loading the rendered ruleset: {_first_error(cp.stderr)}")
    return cp.stdout


def listing_blocks(listing: str) -> dict[str, str]:
    """The top-level blocks of a ``nft list table`` listing, keyed ``"chain NAME"`` /
    ``"set NAME"`` / ``"map NAME"``, in listing order."""
    blocks: dict[str, str] = {}
    key: str | None = None
    body: list[str] = []
    for line in listing.splitlines():
        m = re.match(r"^\t(chain|set|map|flowtable|counter|quota|limit|ct \w+) (\S+) \{$", line)
        if m and key is None:
            key, body = f"{m.group(1)} {m.group(2)}", [line]
        elif key is not None:
            body.append(line)
            if line == "\t}":
                blocks[key] = "\n".join(body) + "\n"
                key = None
    return blocks


def aligned_listing(listing: str, order: Sequence[str]) -> str:
    """``listing`` with its blocks in ``order`` (others after, in listing order).

    The kernel lists chains in creation order, so a chain recreated by an apply moves to the
    end; comparing listings block by block in one order makes that no difference.
    """
    blocks = listing_blocks(listing)
    keys = [k for k in order if k in blocks] + [k for k in blocks if k not in order]
    return f"table {FAMILY} {TABLE} {{\n" + "\n".join(blocks[k] for k in keys) + "}\n"


def check_ruleset(text: str, netns: str | None = None) -> None:
    """``nft -c -f -``: raise :class:`NftError` unless the kernel would accept ``text``."""
    run_nft(["-c", "-f", "-"], netns=netns, input=text)
