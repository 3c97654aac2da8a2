"""Repair the owned table from what the change events said, without reading it back.

Pure. Listing a table with a million elements costs the kernel about a minute, even tersely
(libnftables fetches the elements anyway); events name the chains, rules and sets someone
else touched, which is enough to put chains and rules back in one small transaction whose
cost does not depend on the number of mappings. Element events carry the element itself:
`elements` compares each touched key with what the last pass rendered and deletes and adds
just those. Anything else (the table itself, a map of mtd's, an object, an element not
decoded with certainty) needs the whole table: the caller then replaces it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

from reconciler.core import diff
from reconciler.core import elements as el
from reconciler.core.watch import RUNTIME_SETS

Event = tuple[Literal["+", "-"], str, str]  # (op, kind, name) as the monitor reports them
CHAIN_KINDS = frozenset({"chain", "rule"})


def runtime(kind: str, name: str) -> bool:
    """An element event of a dynamic watch set (`mtd watch add --local`, an `nft add
    element` by hand): runtime state, never drift."""
    return kind == "element" and name in RUNTIME_SETS


class Raw(Protocol):
    """An element of an element event (`adapters.monitor.RawElement`)."""

    op: str
    set: str
    key: bytes
    key_end: bytes | None
    data: bytes | None
    flags: int
    verdict: bool


def anonymous(name: str) -> bool:
    """A rule's anonymous set (`__set%d`): it goes with its rule, repaired with the chain."""
    return name.startswith("__")


def foreign_sets(skeleton: Sequence[Mapping[str, Any]], events: Iterable[Event]) -> set[str]:
    """Sets the events added or deleted that mtd does not define: the repair deletes them
    (`plan`), so their elements need no repair of their own."""
    wanted = {
        obj["name"] for c in skeleton for k, obj in c.get("add", {}).items() if k in ("set", "map")
    }
    return {n for op, k, n in events if k == "set" and n not in wanted and not anonymous(n)}


def elements(
    table: str,
    skeleton: Sequence[Mapping[str, Any]],
    desired: el.Desired,
    raw: Iterable[Raw],
    skip: Collection[str] = (),
) -> tuple[list[dict[str, Any]], list[diff.Change]] | str:
    """One batch that puts the touched elements back as rendered: each key's last event
    says what is live; what should not be there is deleted, what should is added (a changed
    value: deleted, then added). Or why not, in words (then replace the table)."""
    kinds = el.types(skeleton)
    live: dict[tuple[str, str], tuple[bool, Any, str | None]] = {}  # last event per key
    for e in raw:
        if e.set in RUNTIME_SETS or e.set in skip or anonymous(e.set):
            continue
        if e.set not in kinds or e.set not in desired:
            return f"an element of set {e.set}, which mtd does not define"
        t = kinds[e.set]
        if t is None:
            return f"set {e.set}: a type mtd does not decode"
        if e.verdict:
            return f"set {e.set}: verdict data"
        try:
            text, key = el.key(t, e.key, e.key_end, e.flags)
            value = el.value(t, e.data) if e.op == "+" else None
        except el.Undecodable as exc:
            return f"set {e.set}: {exc}"
        live[(e.set, text)] = (e.op == "+", key, value[0] if value else None)
    deletes: dict[str, list[Any]] = {}
    adds: dict[str, list[Any]] = {}
    changes: list[diff.Change] = []
    for (name, text), (present, key, have) in live.items():
        t = kinds[name]
        assert t is not None
        wanted, want = desired.get(name, text)
        if present == wanted and (not present or have == want):
            continue  # back as it was (deleted and re-added, say)
        if present:
            deletes.setdefault(name, []).append(key)
        if wanted:
            item = key if t.data is None or want is None else [key, el.json_value(t, want)]
            adds.setdefault(name, []).append(item)
        op = "~" if present and wanted else "+" if wanted else "-"
        shown = text if not wanted or want is None else f"{text} : {want}"
        changes.append(diff.Change(op, "element", name, f"element {name} {{ {shown} }}"))

    def ref(name: str, elem: list[Any]) -> dict[str, Any]:
        return {"family": "inet", "table": table, "name": name, "elem": elem}

    batch = [{"delete": {"element": ref(n, e)}} for n, e in deletes.items()]
    batch += [{"add": {"element": ref(n, e)}} for n, e in adds.items()]
    return batch, changes


def plan(
    table: str,
    skeleton: Sequence[Mapping[str, Any]],
    events: Iterable[Event],
    *,
    with_elements: bool = False,
) -> list[dict[str, Any]] | None:
    """One batch that restores every chain the events touched, or None (replace all).
    With `with_elements`, element events are left to `elements` (a batch of their own).

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
    anon = False  # elements of a rule's anonymous set: fine when its chain is repaired
    for op, kind, name in events:
        if runtime(kind, name):
            continue  # a dynamic watch entry: runtime state, nothing to repair
        if kind in CHAIN_KINDS and name:
            chains[name] = None
        elif kind in ("set", "element") and anonymous(name):
            anon = anon or kind == "element"
        elif kind == "element" and with_elements and name:
            continue
        elif kind == "set" and name and name not in sets_wanted:
            extra_sets[name] = op
        else:
            return None
    if anon and not chains:
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
