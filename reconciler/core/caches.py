"""What the caches a caller hands in look like, and the names an operator turns off.

The core keeps none of them: `render` and `state` take the caches they may use as
arguments (`Caches`), the CLI builds them (`adapters.cachedir`, in the directory the host
chose) and `OFF` stands for a cache not used. Each only saves time: with every cache off, a
command gives the same output (`tests/test_caches.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from reconciler.errors import MtdError

if TYPE_CHECKING:
    import jinja2

# Every cache, by the name `MTD_CACHE` turns it on or off with (docs/operations.md).
NAMES = {
    "parsed": "the state documents as parsed (YAML is neither imported nor run)",
    "verdicts": "the states the schema accepted (jsonschema is neither imported nor run)",
    "bytecode": "the compiled templates (on disk, and kept in a long-lived process)",
    "rendered": "the rendered texts (Jinja2 is not imported)",
    "canonical": "the kernel's form of a rendered skeleton (no scratch namespace)",
    "committed": "the table mtd last committed (an unchanged table is not listed)",
}
ENV = "MTD_CACHE"


def chosen(value: str | None) -> frozenset[str]:
    """The caches to use, from `MTD_CACHE`: unset or `on` every one; `off` none; else a
    comma-separated list of names (`parsed,bytecode`), or of names each after a `-` to
    leave out of the rest (`-rendered,-canonical`)."""
    text = (value or "on").strip().lower()
    if text in ("on", "all", ""):
        return frozenset(NAMES)
    if text in ("off", "none", "0"):
        return frozenset()
    words = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in words if w.lstrip("-") not in NAMES]
    if unknown or len({w.startswith("-") for w in words}) > 1:
        raise MtdError(
            f"{ENV}={value}: expected on, off, or cache names ({', '.join(NAMES)}), all "
            "plain (those used) or all after a '-' (those left out)"
        )
    if words[0].startswith("-"):
        return frozenset(NAMES) - {w[1:] for w in words}
    return frozenset(words)


class Entries(Protocol):
    """Entries kept by key across processes: rendered texts (a mapping each) and parsed
    documents (their JSON text, as `state.parse` took it); `get` gives None when there is
    none, or none to trust."""

    def get(self, key: str) -> Any: ...

    def put(self, key: str, entry: Any) -> None: ...


class Verdicts(Protocol):
    """The keys (`state.schema_key`) of documents the schema accepted before."""

    def __contains__(self, key: object) -> bool: ...

    def add(self, key: str) -> None: ...


class _Off:
    """A cache not used: it finds nothing and keeps nothing."""

    def get(self, key: str) -> Any:
        return None

    def put(self, key: str, entry: Any) -> None:
        return None

    def __contains__(self, key: object) -> bool:
        return False

    def add(self, key: str) -> None:
        return None


OFF = _Off()


class Memory:
    """Entries kept in this process only, the few newest: `mtd run` renders the same text
    at every epoch (the mapping and the seed are placeholders), so a rotation reuses it
    without Jinja2."""

    KEEP = 4

    def __init__(self) -> None:
        self._entries: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self._entries.get(key)

    def put(self, key: str, entry: Any) -> None:
        self._entries.pop(key, None)
        self._entries[key] = entry
        while len(self._entries) > self.KEEP:
            del self._entries[next(iter(self._entries))]


@dataclass(frozen=True)
class Caches:
    """The caches one command's state parsing and rendering may use; `OFF` each by default.

    `bytecode` makes Jinja2's cache of compiled templates when a template is first rendered
    (jinja2 is imported then); None: templates are compiled each process. `environments`
    gives the sandboxed environment for a template path (`sandbox.environment`'s
    arguments), kept by the caller so a long-lived process compiles each template once;
    None: a new one for each rendering."""

    parsed: Entries = OFF
    verdicts: Verdicts = OFF
    rendered: Entries = OFF
    bytecode: Callable[[], jinja2.BytecodeCache] | None = None
    environments: Callable[..., jinja2.Environment] | None = None


NONE = Caches()
