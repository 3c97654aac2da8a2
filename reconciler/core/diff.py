"""Normalise desired and live tables into one keyed form, and diff them.

Pure. Both sides become a `Table`: objects by kind and name, rules by chain and position,
elements by key. Keyed data keeps the diff linear: the skeleton (a few dozen objects and
rules) goes through deepdiff for readable attribute changes; elements, which can number in
the millions, are compared as dicts.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from reconciler.core.ruletext import _short, describe, rule_text
from reconciler.core.watch import RUNTIME_SETS

# Every named object a template may add (`render.OBJECTS`): one the diff left out could be
# changed by hand unseen (a limit's rate, say).
OBJECT_KINDS = (
    "table", "chain", "set", "map", "counter", "quota", "limit", "flowtable", "ct helper",
    "ct timeout", "ct expectation", "secmark", "synproxy",
)  # fmt: skip
# Dropped from every object: kernel bookkeeping.
_VOLATILE = ("handle", "family", "table")
# What packets move, by kind: telemetry, never drift (a quota's `bytes` is its limit).
_STATE = {"counter": ("packets", "bytes"), "quota": ("used",)}
_FAMILIES = (socket.AF_INET, socket.AF_INET6)


@dataclass
class Table:
    """One table in canonical, keyed form. `exists` is False for a missing live table."""

    exists: bool = True
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # "chain x" -> attrs
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # chain -> rules
    elements: dict[str, dict[str, str | None]] = field(default_factory=dict)  # set -> key -> val


Op = Literal["+", "-", "~"]  # added, removed, changed in place


@dataclass(frozen=True, slots=True)  # slots: a rotation has a million of them
class Change:
    """One line of a diff: op is +, - or ~; `text` is nft-like syntax for people."""

    op: Op
    kind: str
    name: str
    text: str

    def as_dict(self) -> dict[str, str]:
        return {"op": self.op, "kind": self.kind, "name": self.name, "text": self.text}


MISSING = Table(exists=False)


def elem_text(value: Any) -> str:
    """One canonical text for an element key or value, whichever JSON form it came in.

    Called for every element of both tables (millions): the common shapes come first.
    """
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _addr_text(value)
    if isinstance(value, dict):
        if "concat" in value:
            return " . ".join([elem_text(v) for v in value["concat"]])
        if "prefix" in value:
            p = value["prefix"]
            return _prefix_text(p["addr"], p["len"])
        if "range" in value:
            lo, hi = value["range"]
            return f"{elem_text(lo)}-{elem_text(hi)}"
        if "elem" in value:
            return elem_text(value["elem"].get("val"))
        return json.dumps(value, sort_keys=True)
    return str(value)


@lru_cache(maxsize=1 << 16)  # each source comes back once per port and direction
def _addr_text(text: str) -> str:
    """An address in the form the kernel lists it (inet_ntop); other text unchanged.

    The C conversions are ten times faster than `ipaddress` and give the listing's own form.
    """
    for family in _FAMILIES:
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, text))
        except OSError:
            continue
    return text


@lru_cache(maxsize=1 << 16)
def _prefix_text(addr: str, length: int) -> str:
    """Cached: each prefix comes back once per port and direction."""
    net = ipaddress.ip_network(f"{addr}/{length}", strict=False)
    return f"{_addr_text(str(net.network_address))}/{net.prefixlen}"


def _elements(obj: Mapping[str, Any], name: str = "") -> dict[str, str | None]:
    """Keyed elements; none for the dynamic watch sets, whose members and expiry are
    runtime state (`mtd watch`, the tripwire), never drift."""
    if name in RUNTIME_SETS:
        return {}
    is_map = "map" in obj
    out: dict[str, str | None] = {}
    items = obj.get("elem") or []
    if hasattr(items, "rows"):  # render.Elements: (key, port, port), no element objects
        key, text = None, ""
        for k, port, to in items.rows():
            if k is not key:  # a source's rows come together: its text once
                key, text = k, elem_text(k)
            out[f"{text} . {port}"] = str(to)
        return out
    for item in items:
        if is_map:
            key, value = item
            out[elem_text(key)] = elem_text(value)
        else:
            out[elem_text(item)] = None
    return out


def keyed(obj: Mapping[str, Any]) -> dict[str, str | None]:
    """The elements of one rendered set or map (`{"map": ..., "elem": [...]}`), keyed."""
    return _elements(obj)


def _attrs(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    state = _STATE.get(kind, ())
    return {k: v for k, v in obj.items() if k not in _VOLATILE and k != "elem" and k not in state}


def from_listing(listing: Iterable[Mapping[str, Any]]) -> Table:
    """A table from `nft -j list table` output (a list of one-key objects)."""
    t = Table()
    for item in listing:
        for kind, obj in item.items():
            _add(t, kind, obj)
    return t


def live(listing: Iterable[Mapping[str, Any]] | None) -> Table:
    """The live table from its listing; `MISSING` when it does not exist."""
    return MISSING if listing is None else from_listing(listing)


def from_commands(commands: Iterable[Mapping[str, Any]]) -> Table:
    """A table from `add` commands, as rendered. Rule expressions stay as written."""
    t = Table()
    for cmd in commands:
        for kind, obj in cmd.get("add", {}).items():
            _add(t, kind, obj)
    return t


def _add(t: Table, kind: str, obj: Mapping[str, Any]) -> None:
    if kind in OBJECT_KINDS:
        name = obj["name"]
        t.objects[f"{kind} {name}"] = _attrs(kind, obj)
        if kind in ("set", "map"):
            t.elements.setdefault(name, {}).update(_elements(obj, name))
    elif kind == "rule":
        rule = {"expr": _unordered_sets(obj.get("expr", []))}
        if obj.get("comment"):
            rule["comment"] = obj["comment"]
        t.rules.setdefault(obj["chain"], []).append(rule)
    elif kind == "element":
        t.elements.setdefault(obj["name"], {}).update(_elements(obj, obj["name"]))


def _unordered_sets(expr: Any) -> Any:
    """Anonymous sets in rules (`{ 0x0, fin, fin | syn }`) in one order: the kernel does not
    list their elements in a stable order."""
    if isinstance(expr, list):
        return [_unordered_sets(x) for x in expr]
    if isinstance(expr, dict):
        out = {k: _unordered_sets(v) for k, v in expr.items()}
        if isinstance(out.get("set"), list):
            out["set"] = sorted(out["set"], key=lambda x: json.dumps(x, sort_keys=True))
        return out
    return expr


def skeleton_commands(commands: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The commands without their elements: small, and constant across rotations."""
    out = []
    for cmd in commands:
        (verb, body), *_ = cmd.items()
        (kind, obj), *_ = body.items()
        if _is_element(cmd):
            continue
        if "elem" in obj:
            obj = {k: v for k, v in obj.items() if k != "elem"}
        out.append({verb: {kind: obj}})
    return out


# What the buckets' jhash seed is learnt as (`without_seed`): not 0, which the kernel may
# list as no seed at all.
SEED_STAND_IN = 0x6D746421


def without_seed(
    skeleton: list[dict[str, Any]], seed: int
) -> tuple[list[dict[str, Any]], int] | None:
    """The skeleton with `seed` swapped for `SEED_STAND_IN` in every rule statement
    `vmap` keyed by a jhash (the buckets' dispatch), and how many were swapped; None when
    none is, or when the stand-in could be taken for a template's own value.

    The seed changes with every epoch, and with it the skeleton: learnt with a stand-in,
    the kernel's canonical form (a scratch namespace) is the same from one epoch to the
    next, and `with_seed` puts the epoch's seed back into it."""
    if seed == SEED_STAND_IN:
        return None
    out, swapped = [], 0
    for cmd in skeleton:
        rule = cmd.get("add", {}).get("rule")
        if isinstance(rule, dict) and isinstance(rule.get("expr"), list):
            expr, n = _reseeded(rule["expr"], seed, SEED_STAND_IN)
            if n < 0:
                return None
            if n:
                cmd, swapped = {"add": {"rule": {**rule, "expr": expr}}}, swapped + n
        out.append(cmd)
    return (out, swapped) if swapped else None


def with_seed(
    listing: list[dict[str, Any]], seed: int, swapped: int
) -> list[dict[str, Any]] | None:
    """A canonical listing learnt `without_seed`, with the epoch's seed back in place; None
    unless exactly the `swapped` stand-ins are found again (then learn it as it is)."""
    out, found = [], 0
    for item in listing:
        rule = item.get("rule")
        if isinstance(rule, dict) and isinstance(rule.get("expr"), list):
            expr, n = _reseeded(rule["expr"], SEED_STAND_IN, seed)
            if n < 0:
                return None
            if n:
                item, found = {"rule": {**rule, "expr": expr}}, found + n
        out.append(item)
    return out if found == swapped else None


def _reseeded(expr: list[Any], old: int, new: int) -> tuple[list[Any], int]:
    """`expr` with each jhash-keyed vmap's seed `old` set to `new`, and how many; -1 when a
    statement already holds `new` (a stand-in that would be ambiguous)."""
    out, n = list(expr), 0
    for i, stmt in enumerate(expr):
        vmap = stmt.get("vmap") if isinstance(stmt, dict) else None
        key = vmap.get("key") if isinstance(vmap, dict) else None
        jhash = key.get("jhash") if isinstance(key, dict) else None
        if not isinstance(jhash, dict):
            continue
        if jhash.get("seed") == new:
            return expr, -1
        if jhash.get("seed") == old:
            jhash = {**jhash, "seed": new}
            out[i] = {**stmt, "vmap": {**vmap, "key": {**key, "jhash": jhash}}}
            n += 1
    return out, n


def skeleton_positions(commands: Iterable[Mapping[str, Any]]) -> list[int]:
    """Where each command of `skeleton_commands(commands)` sits in `commands`."""
    return [i for i, cmd in enumerate(commands) if not _is_element(cmd)]


def _is_element(cmd: Mapping[str, Any]) -> bool:
    (_, body), *_ = cmd.items()
    return "element" in body


def desired(canonical_skeleton: Table, commands: Iterable[Mapping[str, Any]]) -> Table:
    """The desired table: the kernel's canonical skeleton plus the rendered elements."""
    rendered = rendered_elements(commands)
    return Table(
        objects=canonical_skeleton.objects,
        rules=canonical_skeleton.rules,
        elements={name: rendered.get(name, {}) for name in canonical_skeleton.elements},
    )


def rendered_elements(commands: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str | None]]:
    """The keyed elements of rendered `add` commands, by set (rules are not looked at)."""
    out: dict[str, dict[str, str | None]] = {}
    for cmd in commands:
        for kind, obj in cmd.get("add", {}).items():
            if kind in ("set", "map", "element"):
                out.setdefault(obj["name"], {}).update(_elements(obj, obj["name"]))
    return out


def compare(
    canonical: Sequence[Mapping[str, Any]],
    commands: Iterable[Mapping[str, Any]],
    listing: Sequence[Mapping[str, Any]] | None,
) -> list[Change]:
    """What applying `commands` changes in the live table `listing` (None: no table), given
    the kernel's own listing of their skeleton (`canonical`): `diff` of the two, keyed.

    A table as mtd left it lists its skeleton exactly as `canonical` does, object for object
    and in the same order, once elements, what packets move and handles are set aside: a plain
    equality (C speed) stands for the keyed comparison of every object and rule, the most
    of a small pass's time, and only elements are compared. Any other listing (drift, an
    anonymous set listed in another order) takes the keyed diff, which names each change."""
    if listing is not None and same_skeleton(canonical, listing):
        want = rendered_elements(commands)
        have = {n: _elements(o, n) for n, o in _sets(listing)}
        changes: list[Change] = []
        for name in sorted(have):
            changes += _element_changes(name, want.get(name, {}), have[name])
        return changes
    return diff(desired(from_listing(canonical), commands), live(listing))


def digest(name: str, commands: Iterable[Mapping[str, Any]]) -> str | None:
    """What a table made of `commands` holds that the diff compares: the commands, but the
    elements of the dynamic watch sets (runtime state, whose timeouts change every second),
    hashed. Equal digests, equal tables: what `Backend.unchanged` is asked about. None when
    such a table can change without a transaction (`_changes_by_itself`): only a listing
    tells then."""
    from reconciler.core.bulk import dumps

    kept = []
    for cmd in commands:
        (verb, body), *_ = cmd.items()
        (kind, obj), *_ = body.items() if isinstance(body, dict) else ((None, None),)
        if not isinstance(obj, dict):
            return None
        runtime = obj.get("name") in RUNTIME_SETS
        if kind in ("set", "map", "element") and not runtime and _changes_by_itself(obj):
            return None
        if (kind == "table" and obj.get("flags")) or (kind == "chain" and _device_bound(obj)):
            return None  # removed with no transaction: by the socket's close, the device's
        if kind == "rule" and writes_a_set(obj.get("expr")):
            return None
        if kind == "set" and runtime:
            cmd = {verb: {kind: {k: v for k, v in obj.items() if k != "elem"}}}
        kept.append(cmd)
    text = dumps({"table": name, "nftables": kept})
    return hashlib.sha256(text.encode()).hexdigest()


def _changes_by_itself(obj: Mapping[str, Any]) -> bool:
    """A set or map whose elements time out (or that packets may fill): its content moves
    with no transaction, so no generation says it did."""
    flags = obj.get("flags")
    flags = [flags] if isinstance(flags, str) else flags if isinstance(flags, list) else []
    if "timeout" in obj or "timeout" in flags or "dynamic" in flags:
        return True
    elems = obj.get("elem")
    return isinstance(elems, list) and any(
        isinstance(e, dict) and isinstance(e.get("elem"), dict) for e in elems
    )


def _device_bound(obj: Mapping[str, Any]) -> bool:
    return "dev" in obj or "devices" in obj


def writes_a_set(expr: Any) -> bool:
    """Whether a rule changes a set in the packet path (`add @s`, `update @m`, a meter)
    other than the dynamic watch sets, whose content the diff ignores. Statements stand
    only at the top of a rule's expression list, so that is where to look."""
    for stmt in expr if isinstance(expr, list) else ():
        if not isinstance(stmt, dict):
            continue
        if "meter" in stmt:
            return True
        for key in ("set", "map"):
            body = stmt.get(key)
            if isinstance(body, dict) and "op" in body:
                target = body.get(key)
                if not (isinstance(target, str) and target.lstrip("@") in RUNTIME_SETS):
                    return True
    return False


def same_skeleton(
    canonical: Sequence[Mapping[str, Any]], listing: Sequence[Mapping[str, Any]]
) -> bool:
    """Whether a live listing holds exactly the canonical skeleton, elements aside."""
    return _bare(listing) == _bare(canonical)


def _bare(listing: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A listing without what `compare` sets aside (`from_listing` drops it too): set
    elements, what packets move (`_STATE`), and handles (the kernel lists the table's even
    without handle output, and it grows with every replacement). Objects only."""
    out: list[Mapping[str, Any]] = []
    for item in listing:
        if len(item) == 1:
            ((kind, obj),) = item.items()
            if isinstance(obj, dict):
                drop = ("handle", "elem", *_STATE.get(kind, ()))
                if any(k in obj for k in drop):
                    item = {kind: {k: v for k, v in obj.items() if k not in drop}}
        out.append(item)
    return out


def _sets(listing: Iterable[Mapping[str, Any]]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for item in listing:
        for kind, obj in item.items():
            if kind in ("set", "map"):
                yield obj["name"], obj


def diff(want: Table, have: Table) -> list[Change]:
    """What applying `want` changes in `have`: by object, rule and element."""
    changes: list[Change] = []
    for key in sorted(want.objects.keys() - have.objects.keys(), key=_kind_order):
        changes.append(_object_change("+", key, want.objects[key]))
    for key in sorted(have.objects.keys() - want.objects.keys(), key=_kind_order):
        changes.append(_object_change("-", key, have.objects[key]))
    for key in sorted(want.objects.keys() & have.objects.keys()):
        if want.objects[key] != have.objects[key]:
            what = _attribute_changes(have.objects[key], want.objects[key])
            changes.append(Change("~", *key.split(" ", 1), f"{key}: {what}"))
    for chain in sorted(want.rules.keys() | have.rules.keys()):
        changes += _rule_changes(chain, have.rules.get(chain, []), want.rules.get(chain, []))
    for name in sorted(want.elements.keys() | have.elements.keys()):
        changes += _element_changes(name, want.elements.get(name, {}), have.elements.get(name, {}))
    return changes


def _rule_changes(chain: str, old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[Change]:
    """Rules aligned by content (a sequence diff), so that one rule deleted or inserted is one
    line, not a shift of every rule after it. Names are `chain#position` in the live table
    for `-`, in the desired one for `+`."""
    if old == new:
        return []
    if not old or not new:  # a chain added or removed whole: nothing to align
        return [
            Change("-", "rule", f"{chain}#{i}", rule_text(chain, r)) for i, r in enumerate(old)
        ] + [Change("+", "rule", f"{chain}#{j}", rule_text(chain, r)) for j, r in enumerate(new)]
    from difflib import SequenceMatcher  # only for a chain changed in place

    a = [json.dumps(r, sort_keys=True) for r in old]
    b = [json.dumps(r, sort_keys=True) for r in new]
    out = []
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        out += [
            Change("-", "rule", f"{chain}#{i}", rule_text(chain, old[i])) for i in range(i1, i2)
        ]
        out += [
            Change("+", "rule", f"{chain}#{j}", rule_text(chain, new[j])) for j in range(j1, j2)
        ]
    return out


def _element_changes(
    name: str, want: dict[str, str | None], have: dict[str, str | None]
) -> list[Change]:
    if want == have:
        return []
    out = []
    for key in sorted(have.keys() - want.keys()):
        out.append(Change("-", "element", name, f"element {name} {{ {_elem(key, have[key])} }}"))
    for key in sorted(want.keys() - have.keys()):
        out.append(Change("+", "element", name, f"element {name} {{ {_elem(key, want[key])} }}"))
    for key in sorted(k for k in want.keys() & have.keys() if want[k] != have[k]):
        out.append(
            Change("~", "element", name, f"element {name} {{ {key} : {have[key]} -> {want[key]} }}")
        )
    return out


def _elem(key: str, value: str | None) -> str:
    return key if value is None else f"{key} : {value}"


def summary(changes: Iterable[Change]) -> dict[str, int]:
    """Counts for the one-line result: {"+element": 10, "~chain": 1, ...}."""
    out: dict[str, int] = {}
    for c in changes:
        out[c.op + c.kind] = out.get(c.op + c.kind, 0) + 1
    return out


def _kind_order(key: str) -> tuple[int, str]:
    kind, name = key.split(" ", 1)
    return OBJECT_KINDS.index(kind) if kind in OBJECT_KINDS else len(OBJECT_KINDS), name


def _object_change(op: Op, key: str, attrs: Mapping[str, Any]) -> Change:
    kind, name = key.split(" ", 1)
    return Change(op, kind, name, describe(kind, name, attrs))


def _attribute_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """`policy: accept -> drop; flags: ...`, from deepdiff's report on one object."""
    from deepdiff import DeepDiff  # rarely needed; its import is a fifth of mtd's start-up

    dd = DeepDiff(dict(old), dict(new), verbose_level=2)
    out = []
    for section, items in dd.items():
        for path, detail in items.items():
            what = path.removeprefix("root").replace("['", ".").replace("']", "").lstrip(".")
            if isinstance(detail, dict) and "old_value" in detail:
                what += f": {_short(detail['old_value'])} -> {_short(detail['new_value'])}"
            else:
                what += f" ({section.replace('_', ' ')})"
            out.append(what)
    return "; ".join(sorted(out)) or "changed"


def table_text(name: str, t: Table) -> str:
    """A whole table in nft-like syntax, one line per object, rule and element, in a stable
    order: what the golden tests compare, so a change of shape reads as a line diff."""
    lines = [f"table inet {name}"]
    for key in sorted(t.objects, key=_kind_order):
        kind, obj = key.split(" ", 1)
        if kind != "table":
            lines.append(f"  {describe(kind, obj, t.objects[key])}")
    for chain, rules in sorted(t.rules.items()):
        lines += [f"  {rule_text(chain, r)}" for r in rules]
    for set_name, elems in sorted(t.elements.items()):
        lines += [f"  element {set_name} {{ {_elem(k, v)} }}" for k, v in sorted(elems.items())]
    return "\n".join(lines) + "\n"


# What a preview may print. The mapping (which port hides behind which) is the one thing mtd
# hides: map elements are counted per map, and the buckets' jhash seed is masked, unless the
# operator asks for them (`--show-mapping`); without a secret yet they are placeholders.
SECRET = "secret"
DRAWN = "drawn at apply"
_SEED = re.compile(r"\bseed 0x[0-9a-f]+")
# The number in a name that a template repeats per bucket (`b12_nat4`, `@b12_tcp`): lines
# that differ only by it are printed once, with how many there are.
_NUMBERED = re.compile(r"(?<=[A-Za-z])\d+(?=_)")
MAX_SET_LINES = 10  # elements of one set printed before "... and N more"
MAX_SAME_RULES = 3  # rules with one and the same change printed before they are grouped


def is_mapping(c: Change) -> bool:
    """A map element's change (`key : value`): part of the mapping. Set elements (sources,
    services, trusted prefixes) are not."""
    return c.kind == "element" and " : " in c.text


def masked(text: str, hidden: str = SECRET) -> str:
    """A text with the buckets' jhash seed (secret-derived) replaced by `<hidden>`."""
    return _SEED.sub(f"seed <{hidden}>", text)


def brief(
    changes: Sequence[Change], *, show_mapping: bool = False, drawn: bool = False
) -> list[str]:
    """The lines a person reads: objects and rules by what changed, map elements as counts
    per map (the ports only with `show_mapping`), a set's elements up to `MAX_SET_LINES`.
    `drawn`: no secret yet, the mapping is a placeholder whatever `show_mapping` says."""
    if show_mapping and not drawn:
        return [f"{c.op} {c.text}" for c in changes]
    hidden = DRAWN if drawn else SECRET
    out: list[str] = []
    plain: list[str] = []
    rules: dict[str, list[str]] = {}  # one change text -> the rules it happened to
    maps: dict[str, dict[str, int]] = {}  # map name -> {op: count}
    sets: dict[str, list[str]] = {}
    i = 0
    while i < len(changes):
        c = changes[i]
        if c.kind == "rule":
            j, pairs = _rule_pairs(changes, i)
            if pairs:
                for name, old, new in pairs:
                    rules.setdefault(_rule_delta(old, new, hidden), []).append(name)
                i = j
                continue
            plain.append(f"{c.op} {masked(c.text, hidden)}")
        elif is_mapping(c):
            counts = maps.setdefault(c.name, {})
            counts[c.op] = counts.get(c.op, 0) + 1
        elif c.kind == "element":
            sets.setdefault(c.name, []).append(f"{c.op} {c.text}")
        else:
            plain.append(f"{c.op} {masked(c.text, hidden)}")
        i += 1
    out += [_compact(line) for line in _grouped(plain)]
    for what, names in rules.items():
        if len(names) <= MAX_SAME_RULES:
            out += [f"~ rule {n}: {what}" for n in names]
        else:
            chains = sorted({_NUMBERED.sub("*", n.split("#", 1)[0]) for n in names})
            out.append(f"~ {len(names)} rules in {', '.join(chains)}: {what}")
    for name, lines in sets.items():
        out += lines[:MAX_SET_LINES]
        if len(lines) > MAX_SET_LINES:
            out.append(f"  ... and {len(lines) - MAX_SET_LINES} more elements of {name}")
    out += _map_lines(maps, hidden)
    if maps:
        out.append(
            "(the mapping is drawn at apply: placeholders, no secret used)"
            if drawn
            else "(mapping not shown: --show-mapping prints the ports)"
        )
    return out


def map_counts(changes: Iterable[Change]) -> dict[str, dict[str, int]]:
    """{map: {"+": n, "-": n, "~": n}} of the map element changes (what a log may carry)."""
    out: dict[str, dict[str, int]] = {}
    for c in changes:
        if is_mapping(c):
            counts = out.setdefault(c.name, {})
            counts[c.op] = counts.get(c.op, 0) + 1
    return out


def _map_lines(maps: Mapping[str, Mapping[str, int]], hidden: str) -> list[str]:
    """One line per map, or per family of maps that differ only by numbers (a rotation's 64
    buckets: `b*_tcp`) when more than 3 of them changed alike."""
    groups: dict[str, list[str]] = {}
    for name in sorted(maps, key=_natural):
        groups.setdefault(_NUMBERED.sub("*", name), []).append(name)
    out = []
    for pattern, names in groups.items():
        rows = [names] if len(names) > 3 else [[n] for n in names]
        for row in rows:
            total: dict[str, int] = {}
            for n in row:
                for op, k in maps[n].items():
                    total[op] = total.get(op, 0) + k
            counts = ", ".join(f"{op}{total[op]}" for op in "+-~" if total.get(op))
            label = row[0] if len(row) == 1 else f"{pattern} ({len(row)} maps)"
            out.append(f"~ map {label}: {counts} elements ({hidden})")
    return out


def _grouped(lines: Sequence[str]) -> list[str]:
    """Lines in order, those that differ only by a bucket's number once (`b*_`, `(x64)`)."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        groups.setdefault(_NUMBERED.sub("*", line), []).append(line)
    out = []
    for pattern, members in groups.items():
        out += members if len(members) <= 3 else [f"{pattern} (x{len(members)})"]
    return out


_LITERAL = re.compile(r"\{ ([^{}]*) \}")
MAX_LITERAL_ITEMS = 6


def _compact(line: str) -> str:
    """A long anonymous set or verdict map (`{ 0 : jump b0_nat4, ... }`, one item per bucket)
    as its first and last items and how many there are."""

    def short(m: re.Match[str]) -> str:
        items = m.group(1).split(", ")
        if len(items) <= MAX_LITERAL_ITEMS:
            return m.group(0)
        with contextlib.suppress(TypeError):  # 0, 1, 2 ... 63, not 0, 1, 10 ... 9
            items.sort(key=_natural)
        return f"{{ {items[0]}, {items[1]}, ..., {items[-1]} ({len(items)} items) }}"

    return _LITERAL.sub(short, line)


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _rule_pairs(changes: Sequence[Change], i: int) -> tuple[int, list[tuple[str, str, str]]]:
    """At a run of `-rule` changes of one chain followed by as many `+rule` of it (a rule
    changed in place): where the run ends, and (name, old text, new text) per rule."""
    j = i
    while j < len(changes) and changes[j].op == "-" and changes[j].kind == "rule":
        j += 1
    k = j
    while k < len(changes) and changes[k].op == "+" and changes[k].kind == "rule":
        k += 1
    old, new = changes[i:j], changes[j:k]
    chain = changes[i].name.split("#", 1)[0]
    if not old or len(old) != len(new) or any(c.name.split("#", 1)[0] != chain for c in old + new):
        return i, []
    return k, [(n.name, o.text, n.text) for o, n in zip(old, new, strict=True)]


def _rule_delta(old: str, new: str, hidden: str) -> str:
    """What changed in a rule: the words between the common start and end, both sides."""
    a, b = masked(old, hidden).split(" "), masked(new, hidden).split(" ")
    if a == b:
        return f"jhash seed changed ({hidden})"
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    start, end = max(0, start - 1), max(0, end - 1)  # a word of context each side
    was = " ".join(a[start : len(a) - end]) or "(nothing)"
    now = " ".join(b[start : len(b) - end]) or "(nothing)"
    return f"{_cut(was)} -> {_cut(now)}"


def _cut(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
