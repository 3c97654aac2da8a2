"""Reading one YAML document of the desired state, bounded before it is believed: nesting
depth, the expanded size of its aliases, the digits of a number, and a key written twice in
one mapping (YAML would silently keep the last one). Its size is `state.load_yaml`'s. And
how documents merge, in order (`merge`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from reconciler.errors import StateError

if TYPE_CHECKING:  # imported when a document is parsed: most of a start-up
    import yaml


@cache
def _yaml() -> Any:
    """PyYAML, imported when a document is parsed (not for documents parsed before and
    kept by the caller, see `parse`)."""
    import yaml

    return yaml


@cache
def _loader() -> Any:
    """libyaml is many times faster on large states; fall back to the pure loader."""
    yaml = _yaml()
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


MAX_DEPTH = 64


MAX_EXPANDED_EVENTS = 4_000_000  # YAML events once every alias is expanded


MAX_NUMBER_CHARS = 1_000  # digits of a plain number (no port, count or epoch comes close)


_NUMBER = re.compile(r"[-+]?[0-9_]+(?::[0-9_]+)*")  # YAML 1.1 decimal and base 60 integers


def load(name: str, text: str) -> dict[str, Any]:
    """`load_yaml` once the document's size is known to be within bounds."""
    yaml = _yaml()
    try:
        _check_events(name, text)
        data = yaml.load(text, Loader=_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "maximum nesting depth" in problem:  # a libyaml with its own limit (1000), read
            # ahead of the events `_check_events` counts: the same line as below MAX_DEPTH
            where = f"{name}:{mark.line + 1}" if mark else name
            raise StateError(
                f"{where}: nested more than {MAX_DEPTH} levels deep: expected a flatter document"
            ) from None
        raise StateError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise StateError(f"{name}: expected a mapping of keys at the top level, got {_kind(data)}")
    return data


class _Frame:
    """A mapping or sequence being read in `_check_events`."""

    __slots__ = ("anchor", "key_next", "keys", "size")

    def __init__(self, anchor: str | None, mapping: bool) -> None:
        self.anchor = anchor
        self.keys: set[str] | None = set() if mapping else None
        self.key_next = mapping
        self.size = 1


def _check_events(name: str, text: str) -> None:
    """One pass over libyaml's events (iterative in C, unlike composing): nesting depth,
    the size of the document with its aliases expanded (an alias bomb is small on disk and
    exponential once read), and duplicate keys."""
    stack: list[_Frame] = []
    anchors: dict[str, int] = {}
    total = 0
    yaml = _yaml()
    for ev in yaml.parse(text, Loader=_loader()):
        if isinstance(ev, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            if stack:
                _key(name, stack[-1], ev, None)
            if len(stack) >= MAX_DEPTH:
                raise StateError(
                    f"{name}:{ev.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep: "
                    "expected a flatter document"
                )
            stack.append(_Frame(ev.anchor, isinstance(ev, yaml.MappingStartEvent)))
            continue
        if isinstance(ev, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            done = stack.pop()
            if done.anchor is not None:
                anchors[done.anchor] = done.size
            size = done.size
        elif isinstance(ev, yaml.AliasEvent):
            size = anchors.get(ev.anchor or "", 1)
            if stack:
                _key(name, stack[-1], ev, None)
        elif isinstance(ev, yaml.ScalarEvent):
            size = 1
            if ev.anchor is not None:
                anchors[ev.anchor] = 1
            if len(ev.value) > MAX_NUMBER_CHARS and ev.implicit[0] and _NUMBER.fullmatch(ev.value):
                # Python refuses to read a decimal integer of over 4,300 digits: a
                # ValueError naming no file, from deep inside the YAML loader.
                raise StateError(
                    f"{name}:{ev.start_mark.line + 1}: a number of {len(ev.value)} characters: "
                    f"expected at most {MAX_NUMBER_CHARS}"
                )
            if stack:
                _key(name, stack[-1], ev, ev.value)
        else:
            continue
        total += size
        if stack:
            stack[-1].size += size
        if total > MAX_EXPANDED_EVENTS:
            raise StateError(
                f"{name}:{ev.start_mark.line + 1}: more than {MAX_EXPANDED_EVENTS} values once "
                "aliases are expanded: expected fewer aliases (an alias bomb?)"
            )


def _key(name: str, frame: _Frame, ev: yaml.Event, value: str | None) -> None:
    """Note a mapping key; a key that is not plain text cannot be compared, nor used."""
    if frame.keys is None:
        return
    if frame.key_next:
        if value is None:
            raise StateError(
                f"{name}:{ev.start_mark.line + 1}: a key that is a list, a mapping or an alias: "
                "expected a plain text key"
            )
        if value in frame.keys:
            raise StateError(
                f"{name}:{ev.start_mark.line + 1}: key {value!r} appears twice in one mapping: "
                "expected each key once"
            )
        frame.keys.add(value)
    frame.key_next = not frame.key_next


def _kind(value: object) -> str:
    return {list: "a list", str: "text", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Maps merge key by key, everything else (lists included) is replaced by `over`."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
