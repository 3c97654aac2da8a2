"""The caches kept on disk for the next process, in one private directory the host chose
(`--state-dir`/cache): parsed states, schema verdicts, compiled templates, rendered texts,
the kernel's canonical forms and the table mtd last committed.

Each is an object the caller hands down (`core.caches`); `open_caches` builds those
`MTD_CACHE` leaves on. What is read from here lets a check be skipped, so only a directory
this user owns and nobody else may write is read; read-only commands (`write=False`) read,
never write. Writing is best effort: an entry not kept only costs the next process time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler import defaults
from reconciler.adapters.files import private_dir, read_json, write_atomic
from reconciler.core import caches
from reconciler.errors import MtdError

if TYPE_CHECKING:
    import jinja2


def directory(state_dir: str | Path) -> Path:
    """The cache directory of a state directory (`--state-dir`)."""
    return Path(state_dir) / defaults.CACHE


def open_caches(where: Path, *, write: bool, use: frozenset[str]) -> caches.Caches:
    """The parsing and rendering caches in `where`, those in `use` (`caches.chosen`)."""
    return caches.Caches(
        parsed=ParsedStates(where, write=write) if "parsed" in use else caches.OFF,
        verdicts=SchemaVerdicts(where, write=write) if "verdicts" in use else caches.OFF,
        rendered=RenderedTexts(where, write=write) if "rendered" in use else caches.OFF,
        bytecode=bytecode(where / "templates", write=write) if "bytecode" in use else None,
        environments=environments if "bytecode" in use else None,
    )


@functools.lru_cache(maxsize=8)
def environments(search: tuple[Path, ...], bytecode: Any, max_chars: int) -> jinja2.Environment:
    """One sandboxed environment per template path, for this process: templates compile
    once (a daemon rotates in milliseconds); Jinja2 still reloads a template whose file
    changed. Part of the `bytecode` cache: `MTD_CACHE=-bytecode` turns both off."""
    from reconciler.core import sandbox

    return sandbox.environment(search, bytecode, max_chars)


def private(where: Path) -> bool:
    """Ours and writable by nobody else: what a cache that skips a check must be in."""
    try:
        st = where.stat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def read_private_json(path: Path) -> Any:
    """`read_json`, only from a private directory (what a check it skips rests on)."""
    return read_json(path) if private(path.parent) else None


def keep_cached(path: Path, text: str, keep: int) -> None:
    """Write one cache entry (0600, in a private directory made if need be) and keep only
    the `keep` newest of its kind (`<kind>-*.json`). Best effort."""
    kind = path.name.split("-", 1)[0]
    try:
        private_dir(path.parent)
        if not private(path.parent):
            return
        # No fsync: an entry lost or torn by a crash is unreadable, and only costs time.
        write_atomic(path, text, mode=0o600, sync=False)
        kept = sorted(path.parent.glob(f"{kind}-*.json"), key=_mtime, reverse=True)
        for old in kept[keep:]:
            old.unlink(missing_ok=True)
    except (OSError, MtdError):
        pass


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def bytecode(where: Path, *, write: bool) -> Any:
    """Jinja2's cache of compiled templates in `where`, made when first needed; None when
    `where` is not private (cached bytecode is code). Compiling `maps` is a large part of a
    short `mtd apply`'s start-up; Jinja2 checks each entry against the template's source."""
    with contextlib.suppress(OSError):
        if write:
            private_dir(where)
    if not private(where):
        return None
    return _Bytecode(str(where), write)


class _Bytecode:
    """Builds the cache (importing jinja2) only when a template is rendered; equal for the
    same directory, so `environments` keeps one environment per cache."""

    def __init__(self, where: str, write: bool) -> None:
        self.where, self.write = where, write

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Bytecode) and (other.where, other.write) == (
            self.where,
            self.write,
        )

    def __hash__(self) -> int:
        return hash((self.where, self.write))

    def __call__(self) -> Any:
        import jinja2

        write = self.write

        class Cache(jinja2.FileSystemBytecodeCache):
            def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
                if write:
                    with contextlib.suppress(OSError):  # not written: costs time only
                        super().dump_bytecode(bucket)

        return Cache(self.where)


class RenderedTexts:
    """Rendered texts for the next process, one file per key, 0600. A kept text holds no
    mapping (`render` keeps only those that read no element and no pair)."""

    KEEP = 4  # texts kept: a few states or templates in turn

    def __init__(self, where: Path, *, write: bool) -> None:
        self.where, self.write = where, write

    def _path(self, key: str) -> Path:
        return self.where / f"rendered-{key[:40]}.json"

    def get(self, key: str) -> Any:
        if not private(self.where):
            return None
        entry = read_json(self._path(key))
        return entry if isinstance(entry, dict) and entry.get("key") == key else None

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        if self.write:
            keep_cached(self._path(key), json.dumps({"key": key, **entry}), self.KEEP)


class ParsedStates:
    """The state documents as `state.parse` took them (`State.parsed_json`), by the key of
    their texts (`files.parsed_key`). The state files are not secret; 0600 all the same."""

    KEEP = 4  # parsed states kept (an inventory's hosts, a few edits back)

    def __init__(self, where: Path, *, write: bool) -> None:
        self.where, self.write = where, write

    def _path(self, key: str) -> Path:
        return self.where / f"parsed-{key[:40]}.json"

    def get(self, key: str) -> dict[str, dict[str, Any]] | None:
        if not private(self.where):
            return None
        entry = read_json(self._path(key))
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        documents = entry.get("documents")
        if not isinstance(documents, dict) or not all(
            isinstance(d, dict) for d in documents.values()
        ):
            return None
        return documents

    def put(self, key: str, entry: str) -> None:
        """`entry`: the documents' JSON text, written as it is (never dumped again)."""
        if self.write and key and entry:
            body = f'{{"key": {json.dumps(key)}, "documents": {entry}}}'
            keep_cached(self._path(key), body, self.KEEP)


SCHEMA_VERDICTS = "schema-accepted.json"


class SchemaVerdicts:
    """The keys (`state.schema_key`) of the states the schema accepted lately."""

    KEEP = 16  # states accepted lately (an inventory's hosts, a few edits back)

    def __init__(self, where: Path, *, write: bool) -> None:
        self.where, self.write = where, write

    def _keys(self) -> list[str]:
        keys = read_json(self.where / SCHEMA_VERDICTS)
        return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []

    def __contains__(self, key: object) -> bool:
        return private(self.where) and key in self._keys()

    def add(self, key: str) -> None:
        if not (self.write and key):
            return
        try:
            private_dir(self.where)
            if not private(self.where):
                return
            keys = self._keys()
            if keys[:1] == [key]:
                return
            kept = [key, *(k for k in keys if k != key)][: self.KEEP]
            write_atomic(self.where / SCHEMA_VERDICTS, json.dumps(kept) + "\n", mode=0o600)
        except (OSError, MtdError):
            pass


class KernelCache:
    """What `caching.CachingBackend` keeps: canonical forms (keyed by the skeleton,
    libnftables and the kernel release) and the table mtd last committed. Kept in memory for
    the process, and in `where` (None: memory only) for the next one; `use` says which of
    the two (`canonical`, `committed`) are on."""

    CANONICAL_KEEP = 8  # forms kept on disk (a per-pair template has one per epoch)
    COMMITTED = "committed.json"

    def __init__(
        self,
        where: Path | None = None,
        *,
        write: bool = True,
        use: frozenset[str] = frozenset(caches.NAMES),
    ) -> None:
        self.where, self.write, self.use = where, write, use
        self._canonical: dict[str, list[dict[str, Any]]] = {}
        self._committed: dict[str, Any] | None = None

    def canonical(self, key: str) -> list[dict[str, Any]] | None:
        if "canonical" not in self.use:
            return None
        listing = self._canonical.get(key)
        if listing is None and self.where is not None:
            try:
                data = json.loads((self.where / f"canonical-{key[:40]}.json").read_text())
            except (OSError, ValueError):
                return None  # missing or torn: learn it again
            ok = isinstance(data, list) and all(isinstance(o, dict) for o in data)
            listing = data if ok else None
        return listing

    def keep_canonical(self, key: str, listing: list[dict[str, Any]]) -> None:
        if "canonical" not in self.use:
            return
        self._canonical = {key: listing}  # one skeleton is live at a time: memory stays flat
        if self.where is not None and self.write:
            path = self.where / f"canonical-{key[:40]}.json"
            keep_cached(path, json.dumps(listing), self.CANONICAL_KEEP)

    def committed(self) -> Any:
        if "committed" not in self.use:
            return None
        if self._committed is None and self.where is not None:
            return read_private_json(self.where / self.COMMITTED)
        return self._committed

    def keep_committed(self, record: dict[str, Any] | None) -> None:
        if "committed" not in self.use:
            return
        self._committed = record
        if record is not None and self.where is not None and self.write:
            keep_cached(self.where / self.COMMITTED, json.dumps(record), 1)
