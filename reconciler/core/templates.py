"""What each shipped template supports, in one table that validation reads; and what a
template kept in the state repository may write, in one table that rendering checks.

Pure. A template not listed (a user's own) declares no limit: mtd cannot know what it
handles, and the kernel still refuses what it cannot load. A listed template's limits turn
into one line per problem, naming the key, instead of a ruleset that silently skips sources.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

ALL_FAMILIES = frozenset({4, 6})
ALL_PROTOCOLS = frozenset({"tcp", "udp"})
ALL_FEATURES = frozenset({"addresses", "prefixes", "per_source", "trusted", "tripwire"})


@dataclass(frozen=True)
class Support:
    """Families (4, 6), protocols and features it renders: source kinds (`addresses`,
    `prefixes`, `per_source` entries), `trusted` and the `tripwire`."""

    families: frozenset[int] = ALL_FAMILIES
    protocols: frozenset[str] = ALL_PROTOCOLS
    features: frozenset[str] = ALL_FEATURES
    instead: str = ""  # what to use when a limit is hit
    # It writes each move as a swap of two ports (both directions of one pair), which cannot
    # express a permutation: the shuffle then draws targets from free ports only, and the
    # set of service ports in the range shows through (classic).
    swaps: bool = False

    def families_text(self) -> str:
        return " and ".join(f"IPv{f}" for f in sorted(self.families))

    def protocols_text(self) -> str:
        return "/".join(p.upper() for p in sorted(self.protocols))


TEMPLATES: dict[str, Support] = {
    "maps": Support(),
    # The proof of concept's shape: one rule per moved port, IPv4 TCP only.
    "classic": Support(
        families=frozenset({4}),
        protocols=frozenset({"tcp"}),
        features=frozenset({"addresses", "prefixes"}),
        instead="use template: maps",
        swaps=True,
    ),
}


def support(name: str) -> Support:
    return TEMPLATES.get(name, _UNDECLARED)


_UNDECLARED = Support()


# --- What a template kept in the state repository may write (docs/security.md) -------------
#
# An allow-list, derived from what the shipped templates write: a repository template may
# build the same kind of ruleset (other rules, other sets) and nothing else. Whatever
# reaches beyond the owned table's own verdicts (conntrack helpers, expectations and
# timeouts, queues, marks other software reads, a NAT to another address, a base chain that
# drops) is absent. To allow more, add it here: this table is the whole of the rule.

MAX_SET_SIZE = 65536  # a set's or map's `size`: the kernel memory it may pin (dyn4, dyn6)
MAX_COMMANDS = 100_000  # `maps` at 1024 buckets writes about 33,000
# JSON values of the rendered text, counted before it is parsed: `maps` at 1024 buckets
# writes about 1.4 million (its element lists are placeholders). Python's objects for them
# are the memory a render takes, whatever the 128 MiB of text could hold.
MAX_VALUES = 3_000_000


@dataclass(frozen=True)
class Allowed:
    """What a command of a repository template may say. `objects`: the keys each object
    may have; `statements` and `expressions`: the keys each may have (None: a value of
    its own form, checked in `_statement` or `_expression`)."""

    objects: dict[str, frozenset[str]]
    chain_types: frozenset[str]
    hooks: frozenset[str]
    priorities: frozenset[int]
    policies: frozenset[str]
    set_flags: frozenset[str]
    statements: dict[str, frozenset[str] | None]
    expressions: dict[str, frozenset[str] | None]
    match_ops: frozenset[str]
    meta_keys: frozenset[str]  # what a `meta` expression may read
    ct_keys: frozenset[str]  # what a `ct` expression may read
    socket_keys: frozenset[str]
    set_ops: frozenset[str]  # what a rule may do to a set of its table
    mangle_payload: frozenset[tuple[str, str]]  # (protocol, field) a rule may rewrite
    max_set_size: int = MAX_SET_SIZE
    max_total_size: int = 4 * MAX_SET_SIZE  # of every set and map together (dyn4 + dyn6: 2)
    max_commands: int = MAX_COMMANDS  # objects in the kernel (rules, chains, sets, ...)
    max_elements: int = 4 * MAX_SET_SIZE  # a template's own elements, in all its sets
    max_values: int = MAX_VALUES  # JSON values of the rendered text (`render._bounded_values`)
    # A raw payload's bits ({base, offset, len}): the shipped templates read at most 64; past
    # 128 libnftables fails an assertion or corrupts its heap.
    max_payload_bits: int = 64
    max_payload_offset: int = 4096


def _keys(*names: str) -> frozenset[str]:
    return frozenset(names)


_HEAD = ("family", "table", "name")
REPOSITORY = Allowed(
    objects={
        "table": _keys("family", "name"),
        "chain": _keys(*_HEAD, "type", "hook", "prio", "policy"),
        "set": _keys(*_HEAD, "type", "flags", "elem", "size", "timeout"),
        "map": _keys(*_HEAD, "type", "map", "flags", "elem", "size"),
        "counter": _keys(*_HEAD),
        "rule": _keys("family", "table", "chain", "expr"),
    },
    chain_types=_keys("filter", "nat"),
    hooks=_keys("prerouting", "output"),
    priorities=frozenset({-300, -150, -100, -90}),
    policies=_keys("accept"),
    set_flags=_keys("interval", "timeout"),
    statements={
        "match": _keys("op", "left", "right"),
        "accept": None,
        "drop": None,
        "return": None,
        "counter": None,  # a named counter of the table, or an anonymous one
        "notrack": None,
        "mangle": _keys("key", "value"),  # see `mangle_payload`, and the mark bits
        "dnat": _keys("family", "addr", "port"),  # to the packet's own address only
        "redirect": _keys("port"),
        "set": _keys("op", "elem", "set"),  # add to a set of the table with a `size`
        "vmap": _keys("key", "data"),
        # to a chain of the same table: what a one-entry verdict map already allows
        "jump": _keys("target"),
    },
    expressions={
        "payload": None,  # {protocol, field} or {base, offset, len}
        "meta": _keys("key"),
        "ct": _keys("key", "dir"),
        "fib": _keys("result", "flags"),
        "socket": _keys("key"),
        "exthdr": _keys("name"),
        "concat": None,
        "set": None,
        "map": _keys("key", "data"),
        "prefix": _keys("addr", "len"),
        "&": None,
        "|": None,
        "jhash": _keys("mod", "seed", "expr"),
        "elem": _keys("val", "timeout"),
        "jump": _keys("target"),  # in a verdict map's data: a chain of the same table
        "accept": None,
        "drop": None,
    },
    match_ops=_keys("==", "!=", "in"),
    meta_keys=_keys("mark", "iif", "oif", "l4proto", "nfproto"),
    ct_keys=_keys("state", "status", "direction", "proto-dst"),
    socket_keys=_keys("wildcard"),
    set_ops=_keys("add"),
    mangle_payload=frozenset(
        (proto, field) for proto in ("tcp", "udp") for field in ("sport", "dport")
    ),
)


@dataclass
class _Sizes:
    """What the commands so far pin: each set's declared size (None: none), by name, and
    the elements the template wrote itself."""

    declared: dict[str, int | None] = field(default_factory=dict)
    elements: int = 0


class NotAllowed(Exception):
    """One thing a repository template used that `REPOSITORY` does not list."""


def check_repository(
    commands: list[Any],
    mark: int | str,
    opaque: Callable[[Any], bool] = lambda value: False,
    allowed: Allowed = REPOSITORY,
) -> str | None:
    """The first command (`nftables[i]: ...`) that uses what `allowed` does not list, or
    None. `commands` passed `render._commands` (one add of one object of the owned table);
    `mark`: the host's mark bits (or the placeholder rendering writes for them), the only
    ones a rule may set; `opaque(value)`: an element
    list mtd wrote itself (not walked: it is mtd's data, and large)."""
    if len(commands) > allowed.max_commands:
        return f"{len(commands)} commands: expected at most {allowed.max_commands}"
    sizes = _Sizes()
    for i, cmd in enumerate(commands):
        ((kind, obj),) = cmd["add"].items()
        try:
            _object(kind, obj, allowed, mark, opaque, sizes)
        except NotAllowed as exc:
            return f"nftables[{i}]: add {kind}: {exc}"
    return None


def _object(
    kind: str, obj: dict[str, Any], allowed: Allowed, mark: int | str, opaque: Any, sizes: _Sizes
) -> None:
    if kind not in allowed.objects:
        raise NotAllowed(f"expected one of {', '.join(allowed.objects)}")
    extra = sorted(set(obj) - allowed.objects[kind])
    if extra:
        raise NotAllowed(
            f"key {extra[0]!r}: expected only {', '.join(sorted(allowed.objects[kind]))}"
        )
    if kind == "chain" and ("hook" in obj or "type" in obj or "prio" in obj or "policy" in obj):
        _base_chain(obj, allowed)
    elif kind in ("set", "map"):
        size = obj.get("size")
        if size is not None and not (_int(size) and 0 < size <= allowed.max_set_size):
            raise NotAllowed(f"size {_short(size)}: expected at most {allowed.max_set_size}")
        total = sum(n for n in sizes.declared.values() if n) + (size or 0)
        if total > allowed.max_total_size:
            raise NotAllowed(
                f"size {size} makes {total} for every set and map together: expected at most "
                f"{allowed.max_total_size}"
            )
        flags = obj.get("flags", [])
        flags = [flags] if isinstance(flags, str) else flags
        if not isinstance(flags, list) or not all(_in(f, allowed.set_flags) for f in flags):
            raise NotAllowed(f"flags {_short(flags)}: expected only {_list(allowed.set_flags)}")
        if "elem" in obj and not opaque(obj["elem"]):
            _expression(obj["elem"], allowed, opaque, sizes, elements=True)
            _count_elements(obj["elem"], allowed, sizes)
        sizes.declared[str(obj.get("name"))] = size
    elif kind == "rule":
        expr = obj.get("expr")
        if not isinstance(expr, list):
            raise NotAllowed("expr: expected a list of statements")
        for stmt in expr:
            _statement(stmt, allowed, mark, opaque, sizes)


def _count_elements(elem: Any, allowed: Allowed, sizes: _Sizes) -> None:
    """Elements written by the template itself (not mtd's own lists) pin kernel memory
    like a set's size does, in a named set or in a rule's anonymous one (`{"set": [...]}`,
    a verdict map's data): bounded together, whatever the 128 MiB of text could hold."""
    sizes.elements += len(elem) if isinstance(elem, list) else 1
    if sizes.elements > allowed.max_elements:
        raise NotAllowed(
            f"{sizes.elements} elements written by the template: expected at most "
            f"{allowed.max_elements}"
        )


def _base_chain(obj: dict[str, Any], allowed: Allowed) -> None:
    for key, values in (
        ("type", allowed.chain_types),
        ("hook", allowed.hooks),
        ("prio", allowed.priorities),
        ("policy", allowed.policies),
    ):
        value = obj.get(key, "accept" if key == "policy" else None)  # accept: the default
        if not _in(value, values):
            what = {"prio": "priority"}.get(key, key)
            raise NotAllowed(f"{what} {_short(value)}: expected one of {_list(values)}")


def _statement(stmt: Any, allowed: Allowed, mark: int | str, opaque: Any, sizes: _Sizes) -> None:
    kind, body = _one(stmt, "statement")
    if kind not in allowed.statements:
        raise NotAllowed(f"statement {kind!r}: expected one of {', '.join(allowed.statements)}")
    keys = allowed.statements[kind]
    if keys is not None and (not isinstance(body, dict) or not set(body) <= keys):
        raise NotAllowed(f"statement {kind} {_short(body)}: expected keys {_list(keys)}")
    if kind in ("accept", "drop", "return", "notrack"):
        if body is not None:
            raise NotAllowed(f"statement {kind} {_short(body)}: expected null")
    elif kind == "jump":
        if not _verdict(stmt):
            raise NotAllowed(f'statement jump {_short(body)}: expected {{"target": CHAIN}}')
    elif kind == "counter":
        if not (body is None or isinstance(body, str)):
            raise NotAllowed(f"statement counter {_short(body)}: expected a counter's name or null")
    elif kind == "match":
        if not _in(body.get("op"), allowed.match_ops):
            raise NotAllowed(
                f"match op {_short(body.get('op'))}: expected {_list(allowed.match_ops)}"
            )
        _expression(body.get("left"), allowed, opaque, sizes)
        _expression(body.get("right"), allowed, opaque, sizes)
    elif kind == "mangle":
        _mangle(body, allowed, mark, opaque, sizes)
    elif kind == "dnat":
        if body.get("family") not in ("ip", "ip6") or body.get("addr") != {
            "payload": {"protocol": body.get("family"), "field": "daddr"}
        }:
            raise NotAllowed(
                f"dnat to {_short(body.get('addr'))}: expected the packet's own address "
                '({"payload": {"protocol": "ip" or "ip6", "field": "daddr"}})'
            )
        _expression(body.get("port"), allowed, opaque, sizes)
    elif kind == "set":
        name = body.get("set")
        target = name[1:] if isinstance(name, str) and name.startswith("@") else None
        if not _in(body.get("op"), allowed.set_ops) or sizes.declared.get(str(target)) is None:
            raise NotAllowed(
                f"statement set {_short(body.get('op'))} {_short(name)}: expected "
                f"{_list(allowed.set_ops)} to a set added before it with a size"
            )
        _expression(body.get("elem"), allowed, opaque, sizes, elements=True, constant=False)
    elif kind == "vmap":
        _map_data(body.get("data"), "vmap")
        _expression(body.get("key"), allowed, opaque, sizes)
        data = body.get("data")
        if isinstance(data, dict) and isinstance(data["set"], list):
            _count_elements(data["set"], allowed, sizes)
            for item in data["set"]:
                if not (isinstance(item, list) and len(item) == 2 and _verdict(item[1])):
                    raise NotAllowed(
                        f"vmap element {_short(item)}: expected [KEY, VERDICT], a verdict "
                        'accept, drop or {"jump": {"target": CHAIN}}'
                    )
                _expression(item[0], allowed, opaque, sizes, elements=True)
    else:  # redirect
        for value in body.values():
            _expression(value, allowed, opaque, sizes)


_CONSTANT = frozenset({"concat", "prefix", "elem", "|", "&"})  # what an element may be built of


def _verdict(value: Any) -> bool:
    """A verdict map's data, and only there: elsewhere (a set's element, a map's) a verdict
    made libnftables fail an assertion, ending the process that loads it."""
    if value in ({"accept": None}, {"drop": None}):
        return True
    jump = value.get("jump") if isinstance(value, dict) and len(value) == 1 else None
    return isinstance(jump, dict) and list(jump) == ["target"] and isinstance(jump["target"], str)


def _mangle(
    body: dict[str, Any], allowed: Allowed, mark: int | str, opaque: Any, sizes: _Sizes
) -> None:
    key, value = body.get("key"), body.get("value")
    payload = key.get("payload") if isinstance(key, dict) and len(key) == 1 else None
    if (
        isinstance(payload, dict)
        and set(payload) == {"protocol", "field"}
        and _in((payload["protocol"], payload["field"]), allowed.mangle_payload)
    ):
        _expression(value, allowed, opaque, sizes)
        return
    meta = {"meta": {"key": "mark"}}
    if key == meta and value == {"|": [meta, mark]}:  # the host's mark bits, added
        return
    raise NotAllowed(
        f"mangle {_short(key)} to {_short(value)}: expected a port of "
        f"{_list(f'{p} {f}' for p, f in allowed.mangle_payload)}, or the meta mark "
        "with the host's mark bits added ({{ mark }})"
    )


def _expression(
    value: Any,
    allowed: Allowed,
    opaque: Any,
    sizes: _Sizes,
    elements: bool = False,
    constant: bool | None = None,
) -> None:
    """Iteratively: nesting is bounded (`render.MAX_JSON_DEPTH`), but lists may be long.
    An anonymous set's elements count with the template's own (`_count_elements`).
    `elements`: `value` is a set's element or list of them, the only place an `elem` may be
    (elsewhere, as a match's right side, libnftables fails an assertion). `constant` (by
    default when `elements`): no packet expression in it, as in a set's or map's elements (a
    map element whose data read the packet made libnftables segfault)."""
    stack = [(value, elements, elements if constant is None else constant)]
    while stack:
        node, in_set, const = stack.pop()
        if node is None or isinstance(node, str | bool | int | float) or opaque(node):
            continue
        if isinstance(node, list):
            stack.extend((item, in_set, const) for item in node)
            continue
        kind, body = _one(node, "expression")
        if kind == "elem" and not in_set:
            raise NotAllowed(f"elem {_short(body)}: expected only as an element of a set")
        if kind in ("accept", "drop", "jump"):
            raise NotAllowed(
                f"verdict {_short(node)}: expected only as the data of a verdict map's element"
            )
        if const and kind not in _CONSTANT:
            raise NotAllowed(
                f"expression {kind!r} in an element: expected a constant (a value, a prefix, "
                "a concatenation, | or & of them)"
            )
        if kind not in allowed.expressions:
            raise NotAllowed(
                f"expression {kind!r}: expected one of {', '.join(allowed.expressions)}"
            )
        keys = allowed.expressions[kind]
        if keys is not None and (not isinstance(body, dict) or not set(body) <= keys):
            raise NotAllowed(f"expression {kind} {_short(body)}: expected keys {_list(keys)}")
        for what, values in (
            ("meta", allowed.meta_keys),
            ("ct", allowed.ct_keys),
            ("socket", allowed.socket_keys),
        ):
            if kind == what and not _in(body.get("key"), values):
                raise NotAllowed(f"{what} key {_short(body.get('key'))}: expected {_list(values)}")
        if kind == "payload" and not (
            isinstance(body, dict)
            and (set(body) == {"protocol", "field"} or set(body) == {"base", "offset", "len"})
        ):
            raise NotAllowed(
                f"payload {_short(body)}: expected protocol and field, or base, offset and len"
            )
        if (
            kind == "payload"
            and "len" in body
            and not (
                _int(body["len"])
                and 0 < body["len"] <= allowed.max_payload_bits
                and _int(body["offset"])
                and 0 <= body["offset"] <= allowed.max_payload_offset
            )
        ):
            raise NotAllowed(
                f"payload {_short(body)}: expected len from 1 to {allowed.max_payload_bits} "
                f"bits, offset from 0 to {allowed.max_payload_offset}"
            )
        if kind == "map":
            _map_data(body.get("data"), "map")
        if kind == "set" and isinstance(body, list) and not opaque(body):
            _count_elements(body, allowed, sizes)
        if isinstance(body, dict):
            stack.extend((v, False, const) for v in body.values())
        elif isinstance(body, list):
            stack.extend((item, kind == "set", const or kind == "set") for item in body)
        elif body is not None and not isinstance(body, str | int):
            raise NotAllowed(f"expression {kind} {_short(body)}")


def _map_data(data: Any, what: str) -> None:
    """A lookup's data as the shipped templates write it: a map of the table (`@NAME`), or
    for a verdict map an anonymous set. Other shapes crashed libnftables (a bare list of
    `vmap` data: an assertion; a `map` with anonymous data on a match's left: a segfault),
    which in mtd's own process would end the daemon."""
    if isinstance(data, str) and data.startswith("@"):
        return
    anonymous = isinstance(data, dict) and list(data) == ["set"]
    if what == "vmap" and anonymous and isinstance(data["set"], list | str):
        return
    also = ' or an anonymous set ({"set": [...]})' if what == "vmap" else ""
    raise NotAllowed(f'{what} data {_short(data)}: expected a map\'s name ("@NAME"){also}')


def _one(node: Any, what: str) -> tuple[str, Any]:
    if not isinstance(node, dict) or len(node) != 1:
        raise NotAllowed(f"{what} {_short(node)}: expected an object of one key")
    ((kind, body),) = node.items()
    return kind, body


def _in(value: Any, values: frozenset[Any]) -> bool:
    """`value in values`, for a value of any JSON type (a list is not hashable)."""
    if isinstance(value, tuple):
        plain = all(isinstance(v, str) for v in value)
    else:
        plain = isinstance(value, str | int) and not isinstance(value, bool)
    return plain and value in values


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list(values: Iterable[Any]) -> str:
    return ", ".join(sorted(map(str, values)))


def _short(value: Any) -> str:
    """A value as JSON, cut to a readable length (it may be anything a template wrote)."""
    text = json.dumps(value, default=lambda o: type(o).__name__)
    return text if len(text) <= 80 else text[:77] + "..."
