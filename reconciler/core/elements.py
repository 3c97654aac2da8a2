"""Set and map elements from the kernel's change events, in the diff's normalised form, and
the elements the last pass rendered, to compare them with.

Pure. A hand change to one map element (`nft delete element inet mtd tcp4 { 192.0.2.3 . 1 }`)
is repaired by putting that element back, not by replacing a table of a million: the event
carries the element's key and data in the kernel's register layout, and the set's type (from
the rendered skeleton) says how to read them. Anything not read with certainty raises
`Undecodable`; the caller then replaces the table, as it did before.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.core import diff

# Key and data types mtd decodes, with their size in bytes (linux: nft datatypes).
SIZES = {"ipv4_addr": 4, "ipv6_addr": 16, "inet_service": 2, "inet_proto": 1}
_ADDRESS = {"ipv4_addr": socket.AF_INET, "ipv6_addr": socket.AF_INET6}
INTERVAL_END = 1  # NFT_SET_ELEM_INTERVAL_END
Key = tuple[str, Any]  # (text as the diff writes it, JSON as libnftables takes it)


class Undecodable(ValueError):
    """An element whose meaning is not certain: replace the table (and say why)."""


@dataclass(frozen=True)
class SetType:
    """What a set's elements look like: the key's parts, a map's data, interval or not."""

    key: tuple[str, ...]
    data: str | None = None
    interval: bool = False

    @classmethod
    def of(cls, kind: str, obj: Mapping[str, Any]) -> SetType | None:
        """From a rendered `add set`/`add map`; None when its types are not all known
        (`typeof`, verdict maps, types mtd does not decode)."""
        key = obj.get("type")
        parts = tuple(key) if isinstance(key, list) else (key,)
        data = obj.get("map") if kind == "map" else None
        if not all(isinstance(p, str) and p in SIZES for p in parts):
            return None
        if kind == "map" and data not in SIZES:
            return None
        flags = obj.get("flags") or []
        return cls(parts, data, "interval" in (flags if isinstance(flags, list) else [flags]))


def types(skeleton: Iterable[Mapping[str, Any]]) -> dict[str, SetType | None]:
    """Every set and map the skeleton adds, by name (None: not decodable)."""
    out: dict[str, SetType | None] = {}
    for cmd in skeleton:
        for kind, obj in cmd.get("add", {}).items():
            if kind in ("set", "map"):
                out[obj["name"]] = SetType.of(kind, obj)
    return out


def _parts(t: SetType, raw: bytes) -> list[bytes]:
    """A key split into its parts: a concatenation's each padded to 4 bytes (one 32-bit
    register per 4 bytes); a single part exactly its size."""
    if len(t.key) == 1:
        if len(raw) != SIZES[t.key[0]]:
            raise Undecodable(f"a {t.key[0]} key of {len(raw)} bytes")
        return [raw]
    out, pos = [], 0
    for part in t.key:
        size = SIZES[part]
        out.append(raw[pos : pos + size])
        pos += (size + 3) & ~3
    if pos != len(raw):
        raise Undecodable(f"a {' . '.join(t.key)} key of {len(raw)} bytes, expected {pos}")
    return out


def _scalar(kind: str, raw: bytes) -> Any:
    family = _ADDRESS.get(kind)
    if family is not None:
        return socket.inet_ntop(family, raw)
    return int.from_bytes(raw, "big")  # inet_service, inet_proto: network byte order


def _interval(kind: str, lo: bytes, hi: bytes) -> Key:
    """One part of an interval element: a single value, an address prefix, or a range."""
    if lo == hi and kind not in _ADDRESS:
        value = _scalar(kind, lo)
        return str(value), value
    a, b = int.from_bytes(lo, "big"), int.from_bytes(hi, "big")
    if b < a:
        raise Undecodable("an interval that ends before it starts")
    size = b - a + 1
    if kind in _ADDRESS and size & (size - 1) == 0 and a % size == 0:
        bits = 8 * len(lo) - (size.bit_length() - 1)
        addr = _scalar(kind, lo)
        return diff.elem_text({"prefix": {"addr": addr, "len": bits}}), {
            "prefix": {"addr": addr, "len": bits}
        }
    first, last = _scalar(kind, lo), _scalar(kind, hi)
    return f"{first}-{last}", {"range": [first, last]}


def key(t: SetType, raw: bytes, end: bytes | None, flags: int) -> Key:
    """The element's key as the diff writes it, and as JSON."""
    if flags & INTERVAL_END or (t.interval and len(t.key) == 1):
        # rbtree intervals: a start and an end element, the end one past the range, and
        # nft adds its own: reading them needs the whole set, not one event.
        raise Undecodable("elements of an interval set come as start and end elements")
    if t.interval:
        if end is None:
            raise Undecodable("an interval element without its end")
        pieces = [
            _interval(kind, lo, hi)
            for kind, lo, hi in zip(t.key, _parts(t, raw), _parts(t, end), strict=True)
        ]
    else:
        if end is not None:
            raise Undecodable("an interval end in a set without intervals")
        pieces = []
        for kind, part in zip(t.key, _parts(t, raw), strict=True):
            value = _scalar(kind, part)
            pieces.append((str(value), value))
    if len(pieces) == 1:
        return pieces[0]
    return " . ".join(p[0] for p in pieces), {"concat": [p[1] for p in pieces]}


def value(t: SetType, raw: bytes | None) -> Key | None:
    """A map element's data (None in a set)."""
    if t.data is None:
        if raw is not None:
            raise Undecodable("data in an element of a set")
        return None
    if raw is None or len(raw) != SIZES[t.data]:
        raise Undecodable(f"{t.data} data of {0 if raw is None else len(raw)} bytes")
    v = _scalar(t.data, raw)
    return str(v), v


def json_value(t: SetType, text: str) -> Any:
    """The JSON of a desired value given as the diff's text."""
    return text if t.data in _ADDRESS else int(text)


class Desired:
    """The elements the last pass rendered, by set and key, looked up in O(1).

    It keeps the rendered element containers themselves (a map's `render.Elements` holds one
    row per source and protocol, with the shuffle's own dict of moves), not a second copy of
    a million elements: the first lookup indexes each map's rows by source text (one entry
    per row, pointing at the same dicts) and a key `S . P` is found through its source.
    """

    def __init__(self, containers: Mapping[str, list[tuple[bool, Any]]]) -> None:
        self._containers = dict(containers)  # name -> [(is_map, elem list or Elements)]
        self._index: dict[str, tuple[dict[str, Any], dict[str, str | None]]] = {}
        self._ports: dict[tuple[str, str], Mapping[int, int]] = {}

    @classmethod
    def from_commands(cls, commands: Iterable[Mapping[str, Any]]) -> Desired:
        """References to the element lists of the rendered `add` commands (no copy)."""
        out: dict[str, list[tuple[bool, Any]]] = {}
        kinds: dict[str, bool] = {}
        for cmd in commands:
            for kind, obj in cmd.get("add", {}).items():
                if kind in ("set", "map"):
                    kinds[obj["name"]] = kind == "map"
                    out.setdefault(obj["name"], [])
                if kind in ("set", "map", "element") and obj.get("elem"):
                    name = obj["name"]
                    out.setdefault(name, []).append((kinds.get(name, False), obj["elem"]))
        return cls(out)

    def __contains__(self, name: str) -> bool:
        return name in self._containers

    def get(self, name: str, key_text: str) -> tuple[bool, str | None]:
        """(present, value text) of the desired element `key_text` of set `name`."""
        rows, plain = self._indexed(name)
        if key_text in plain:
            return True, plain[key_text]
        source, sep, port = key_text.rpartition(" . ")
        row = rows.get(source) if sep and port.isdigit() else None
        if row is None:
            return False, None
        to = self._row_ports(name, source, row).get(int(port))
        return (False, None) if to is None else (True, str(to))

    def _row_ports(self, name: str, source: str, row: tuple[Any, Mapping[int, int]]) -> Any:
        """One source's map (`Elements.ports`), built at its first lookup: a map flushed by
        hand asks for every element, each source's once per port."""
        key = (name, source)
        found = self._ports.get(key)
        if found is None:
            elems, moves = row
            found = self._ports[key] = elems.ports(moves)
        return found

    def _indexed(self, name: str) -> tuple[dict[str, Any], dict[str, str | None]]:
        found = self._index.get(name)
        if found is not None:
            return found
        rows: dict[str, tuple[Any, Mapping[int, int]]] = {}
        plain: dict[str, str | None] = {}
        for is_map, elems in self._containers.get(name, []):
            if hasattr(elems, "moves_by_key"):
                for text, moves in elems.moves_by_key():
                    if text in rows:  # a source in two rows: merge (never rendered so)
                        moves = {**rows[text][1], **moves}
                    rows[text] = (elems, moves)
            else:
                plain.update(diff.keyed({"map" if is_map else "set": None, "elem": elems}))
        self._index[name] = rows, plain
        self._containers[name] = []  # indexed: the rows' JSON text can go
        return rows, plain
