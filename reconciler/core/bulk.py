"""Bulk data in CPython: a ruleset of a million map elements.

As Python objects, a million elements are millions of small containers, and CPython's
cyclic garbage collector walks the whole, growing heap again and again while they are
built or parsed: about three times the work itself. A reconcile pass builds acyclic data
that reference counting frees, so the collector is paused for the pass (`gc_paused`).
Better still, element lists that can write their own JSON never become objects (`dumps`).
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_RAW = re.compile(r'"\\u0000raw:(\d+)"')


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection inside; nested uses and a collector already off are respected."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def dumps(obj: Any) -> str:
    """Compact JSON of `obj`, where an object with a `json_text()` method (an element list,
    see `render.Elements`) is written as the text that method returns."""
    raw: list[str] = []

    def placeholder(o: Any) -> str:
        if not hasattr(o, "json_text"):
            raise TypeError(f"{type(o).__name__} is not JSON serializable")
        raw.append(o.json_text())
        return f"\0raw:{len(raw) - 1}"

    text = json.dumps(obj, separators=(",", ":"), default=placeholder)
    return _RAW.sub(lambda m: raw[int(m.group(1))], text) if raw else text
