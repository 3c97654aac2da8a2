"""A rotation as a patch: the one transaction that turns the table one rendering made into
the table another makes, when the two differ only in elements and in rules changed in place.

Pure. A new epoch changes the mapping (map elements) and, with buckets, the jhash seed of a
few dispatch rules; the rest of the table (hundreds of chains at 64 buckets) stays as it is.
Replacing the whole table makes the kernel tear down and build again every chain, rule and
set; the patch rewrites only what changed:

- a set or map whose rendered elements differ: `flush`, then its elements `add`ed again;
- a chain with a rule changed in place (same chain, same position, another expression):
  `flush chain`, then its rules `add`ed again, in order (no rule handle is needed, so no
  listing either);
- the dynamic watch sets (runtime state): their rendered entries `add`ed, which keeps those
  the kernel holds as they are (their timeouts run on), as a replacement would put them back.

Anything else (an object added, removed or changed, a rule added or removed, a named
object a patch would keep where a replacement resets it: a quota, a set that packets or
timeouts fill) returns None: the caller replaces the table. The batch is one libnftables
transaction: the ruleset is the old table or the new one, never a mix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.core import diff
from reconciler.core.watch import RUNTIME_SETS

# Objects a patch leaves in place: a counter keeps counting (the daemon stops carrying its
# packets over a replacement), but a quota's use or a limit's state must not survive where
# a replacement would reset it, so those kinds are not patched.
_KEPT = ("table", "chain", "set", "map", "counter")


@dataclass(frozen=True)
class Patch:
    """The batch, and what it rewrites (for the log line)."""

    commands: list[dict[str, Any]]
    sets: list[str]  # sets and maps whose elements were rewritten
    chains: list[str]  # chains whose rules were rewritten

    def line(self) -> str:
        """`patched: 64 maps and sets, 5 chains`."""
        return f"patched in place: {len(self.sets)} sets and maps, {len(self.chains)} chains"


def plan(
    table: str, old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
) -> Patch | None:
    """The batch that turns a table made of `old` (rendered commands) into one made of `new`;
    None when they differ in more than elements and rules changed in place."""
    old_sk, new_sk = _skeleton(old), _skeleton(new)
    if len(old_sk) != len(new_sk):
        return None
    chains: list[str] = []
    kinds: dict[str, str] = {}  # set or map name -> kind
    for a, b in zip(old_sk, new_sk, strict=True):
        kind = _kind(b)
        if kind == "rule":  # most commands: compared whole first (C speed)
            if diff.writes_a_set(_rule(b).get("expr")):
                return None  # packets fill that set: a replacement empties it, a patch not
            if a == b:
                continue
            if _kind(a) != "rule" or _sans_expr(_rule(a)) != _sans_expr(_rule(b)):
                return None
            if _rule(b)["chain"] not in chains:
                chains.append(_rule(b)["chain"])
            continue
        if kind not in _KEPT or _kind(a) != kind:
            return None
        if kind in ("set", "map"):
            if _fills_itself(b) or _bare(a) != _bare(b):
                return None
            kinds[_obj(b)["name"]] = kind
        elif a != b:
            return None
    before, after = _elements(old), _elements(new)
    out: list[dict[str, Any]] = []
    changed = []
    for name, kind in kinds.items():
        lists = after.get(name, [])
        ref = {"family": "inet", "table": table, "name": name}
        if name in RUNTIME_SETS:  # keep the kernel's entries; put back any it lacks
            out += [{"add": {"element": {**ref, "elem": e}}} for e in lists]
            continue
        if _same(before.get(name, []), lists):
            continue
        changed.append(name)
        out.append({"flush": {kind: ref}})
        out += [{"add": {"element": {**ref, "elem": e}}} for e in lists]
    rules: dict[str, list[Mapping[str, Any]]] = {chain: [] for chain in chains}
    for c in new_sk:
        if _kind(c) == "rule" and _rule(c)["chain"] in rules:
            rules[_rule(c)["chain"]].append(c)
    for chain, added in rules.items():
        out.append({"flush": {"chain": {"family": "inet", "table": table, "name": chain}}})
        out += [dict(c) for c in added]
    return Patch(out, changed, chains)


def _skeleton(commands: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The commands but `add element` (no copy: a set's own `elem` is skipped by `_bare`)."""
    return [c for c in commands if _kind(c) != "element"]


def _bare(cmd: Mapping[str, Any]) -> Any:
    """A command as compared: a set or map without its elements."""
    obj = _obj(cmd)
    return {k: v for k, v in obj.items() if k != "elem"} if "elem" in obj else obj


def _kind(cmd: Mapping[str, Any]) -> str:
    body = cmd.get("add")
    if len(cmd) != 1 or not isinstance(body, dict):
        return ""
    for kind in body:
        return str(kind)
    return ""


def _sans_expr(rule: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rule.items() if k != "expr"}


def _obj(cmd: Mapping[str, Any]) -> Mapping[str, Any]:
    ((_, body),) = cmd.items()
    ((_, obj),) = body.items()
    return obj  # type: ignore[no-any-return]


def _rule(cmd: Mapping[str, Any]) -> Mapping[str, Any]:
    return cmd["add"]["rule"]  # type: ignore[no-any-return]


def _fills_itself(cmd: Mapping[str, Any]) -> bool:
    """A set other than the dynamic watch sets whose content moves without a transaction."""
    obj = _obj(cmd)
    return obj.get("name") not in RUNTIME_SETS and diff._changes_by_itself(obj)


def _elements(commands: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Each set's element lists as rendered (references: a map's `Elements` is not copied)."""
    out: dict[str, list[Any]] = {}
    for cmd in commands:
        for kind, obj in cmd.get("add", {}).items():
            if kind in ("set", "map", "element") and obj.get("elem"):
                out.setdefault(obj["name"], []).append(obj["elem"])
    return out


def _same(a: list[Any], b: list[Any]) -> bool:
    """Whether two renderings of one set's elements are the same, without writing a
    million elements out: `Elements` compare by their rows."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        same = getattr(x, "same", None)
        if same is not None:
            if not same(y):
                return False
        elif hasattr(y, "same") or x != y:
            return False
    return True
