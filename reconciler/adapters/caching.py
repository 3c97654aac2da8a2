"""A kernel backend that remembers: any `Backend`, wrapped with the two caches the caller
chose (`cachedir.KernelCache`, which `MTD_CACHE` turns off one by one).

`canonical`: the kernel's form of a skeleton, by the skeleton and `Backend.version`; a new
process skips the scratch namespace. `committed`: the table mtd last committed, and where the
ruleset stood right after, so that a pass need not list a table nothing can have changed
since (40 s at a million elements): `unchanged`, which the backend beneath does not offer
(it only does what the kernel does). With both off, every call goes to the backend beneath.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from reconciler.adapters.cachedir import KernelCache
from reconciler.adapters.kernel import Backend, Mark


class CachingBackend:
    """A `Backend` by delegation to `kernel`, with `unchanged` and `in_sync` for the pass.

    Where the ruleset stands is `kernel.mark()`: this boot, this network namespace and its
    generation, which every transaction of any process moves by one (a table that timeouts
    or packets change without one has no `diff.digest`: always listed). What is recorded
    is the mark read *before* the fact (before mtd's commit, plus the one step that commit
    takes; before a listing), never read again after it: a generation only grows, so if
    anything else was committed in between, the ruleset has already left the recorded mark
    for good (short of 2^32 commits) and the record never matches. (Reading it right after
    a commit would also wait about 10 ms for the kernel to finish that commit's clean-up.)

    What is not the port (`Nft`'s `counters`, `commits`, `sibling`, `abandon`) is the
    wrapped backend's, as it is there or not.
    """

    def __init__(self, kernel: Backend, cache: KernelCache | None = None) -> None:
        self.kernel = kernel
        self.cache = cache if cache is not None else KernelCache()
        self._listed: tuple[str, Mark | None] = ("", None)  # the last listing's table, mark

    def __getattr__(self, name: str) -> Any:
        if name in ("kernel", "cache", "_listed"):  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.kernel, name)

    # -- what only this wrapper answers ------------------------------------------------------

    def unchanged(self, name: str, commands: Sequence[dict[str, Any]]) -> bool:
        """Whether the owned table is, for certain, what `commands` make (`diff.digest`):
        mtd's last `replace_table` through this cache sent them, or its last listing
        compared equal to them (`in_sync`), and nothing has been committed since. False
        whenever that cannot be told: then the caller lists and compares."""
        record = self.cache.committed()
        if not isinstance(record, dict) or record.get("table") != name:
            return False
        now = self.kernel.mark()
        if now is None or record.get("mark") != _text(now):
            return False
        from reconciler.core import diff

        digest = diff.digest(name, commands)
        return digest is not None and record.get("digest") == digest

    def in_sync(self, name: str, commands: Sequence[dict[str, Any]]) -> None:
        """The last `list_table(name)` compared equal to `commands`: `unchanged` may say so
        until the next commit (if nothing was committed while it listed)."""
        listed, mark = self._listed
        if listed == name and mark is not None:
            self._record(name, commands, mark)

    def _mark(self) -> Mark | None:
        """Where the ruleset stands, when a commit is remembered at all."""
        return self.kernel.mark() if "committed" in self.cache.use else None

    def _record(self, name: str, commands: Sequence[dict[str, Any]], mark: Mark) -> None:
        """Remember that the table is `commands` at `mark`."""
        from reconciler.core import diff

        digest = diff.digest(name, commands)
        # None: such a table changes by itself, only listings tell
        record = None if digest is None else {"mark": _text(mark), "table": name, "digest": digest}
        self.cache.keep_committed(record)

    # -- kernel.Backend ----------------------------------------------------------------------

    def list_table(self, name: str) -> list[dict[str, Any]] | None:
        self._listed = (name, self._mark())
        return self.kernel.list_table(name)

    def replace_table(
        self,
        name: str,
        commands: Sequence[dict[str, Any]],
        *,
        flush_ruleset: bool = False,
        check: bool = False,
    ) -> None:
        before = None if check else self._mark()
        self.kernel.replace_table(name, commands, flush_ruleset=flush_ruleset, check=check)
        if before is not None:  # mtd's own commit moved the generation by one
            where, generation = before
            self._record(name, commands, (where, generation + 1))

    def patch_table(
        self,
        name: str,
        batch: Sequence[dict[str, Any]],
        commands: Sequence[dict[str, Any]],
        *,
        check: bool = False,
    ) -> None:
        # Not recorded: the digest of the whole table costs as much as the patch itself.
        # The patch moved the generation past any record: the next reading pass lists.
        self.kernel.patch_table(name, batch, commands, check=check)

    def canonical(self, commands: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
        """The backend's answer, kept by the skeleton and `version`: the skeleton is the
        same from one rotation to the next."""
        if "canonical" not in self.cache.use:
            return self.kernel.canonical(commands, name)
        text = json.dumps({"name": name, "commands": list(commands)}, sort_keys=True)
        key = hashlib.sha256(f"{text}\0{self.kernel.version()}".encode()).hexdigest()
        listing = self.cache.canonical(key)
        if listing is None:
            listing = self.kernel.canonical(commands, name)
            self.cache.keep_canonical(key, listing)
        return listing

    def delete_table(self, name: str) -> bool:
        return self.kernel.delete_table(name)

    def list_tables(self) -> list[tuple[str, str]]:
        return self.kernel.list_tables()

    def set_sysctls(self, values: Mapping[str, str]) -> dict[str, str]:
        return self.kernel.set_sysctls(values)

    def restore_sysctls(self, values: Mapping[str, str]) -> None:
        self.kernel.restore_sysctls(values)

    def run(self, commands: Sequence[dict[str, Any]], *, check: bool = False) -> None:
        self.kernel.run(commands, check=check)

    def list_set(self, table: str, name: str) -> list[Any] | None:
        return self.kernel.list_set(table, name)

    def mark(self) -> Mark | None:
        return self.kernel.mark()

    def version(self) -> str:
        return self.kernel.version()


def _text(mark: Mark) -> str:
    """`BOOT:NETNS:GENERATION`: the mark as `committed.json` keeps it."""
    where, generation = mark
    return f"{where}:{generation}"
