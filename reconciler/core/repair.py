"""Repair the owned table from what the change events said, without reading it back.

Pure. Listing a table with a million elements costs the kernel about a minute, even tersely
(libnftables fetches the elements anyway); events name the chains, rules and sets someone
else touched, which is enough to put chains and rules back in one small transaction whose
cost does not depend on the number of mappings. Anything else (the table itself, a map of
mtd's, its elements, an object) needs the whole table: `plan` then returns None and the
caller replaces it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from reconciler.core.watch import RUNTIME_SETS

Event = tuple[str, str, str]  # (op "+" or "-", kind, name) as the monitor reports them
CHAIN_KINDS = frozenset({"chain", "rule"})


def runtime(kind: str, name: str) -> bool:
    """An element event of a dynamic watch set (`mtd watch add --local`, an `nft add
    element` by hand): runtime state, never drift."""
    return kind == "element" and name in RUNTIME_SETS


def plan(
    table: str, skeleton: Sequence[Mapping[str, Any]], events: Iterable[Event]
) -> list[dict[str, Any]] | None:
    """One batch that restores every chain the events touched, or None (replace all).

    Each touched chain is created if missing, flushed and deleted, then the desired ones are
    re-created with their rules: valid whatever state the chain was left in (policy changed,
    rules added or removed, deleted, or a chain that should not exist). Sets someone else
    added are deleted; anonymous sets (`__set%d`) go with the rules that own them.
    """
    chains_wanted: dict[str, dict[str, Any]] = {}
    rules: dict[str, list[dict[str, Any]]] = {}
    sets_wanted: set[str] = set()
    for cmd in skeleton:
        for kind, obj in cmd.get("add", {}).items():
            if kind == "chain":
                chains_wanted[obj["name"]] = dict(cmd)
            elif kind == "rule":
                rules.setdefault(obj["chain"], []).append(dict(cmd))
            elif kind in ("set", "map"):
                sets_wanted.add(obj["name"])
    chains: dict[str, None] = {}  # ordered, unique
    extra_sets: dict[str, str] = {}  # name -> last op
    for op, kind, name in events:
        if runtime(kind, name):
            continue  # a dynamic watch entry: runtime state, nothing to repair
        if kind in CHAIN_KINDS and name:
            chains[name] = None
        elif kind == "set" and name.startswith("__"):
            continue
        elif kind == "set" and name and name not in sets_wanted:
            extra_sets[name] = op
        else:
            return None
    batch: list[dict[str, Any]] = []
    refs = [{"family": "inet", "table": table, "name": c} for c in chains]
    batch += [{"add": {"chain": dict(r)}} for r in refs]
    batch += [{"flush": {"chain": dict(r)}} for r in refs]
    batch += [{"delete": {"chain": dict(r)}} for r in refs]
    for name, op in extra_sets.items():
        if op == "+":
            batch.append({"delete": {"set": {"family": "inet", "table": table, "name": name}}})
    for name in chains:
        if name in chains_wanted:
            batch.append(chains_wanted[name])
            batch += rules.get(name, [])
    return batch
