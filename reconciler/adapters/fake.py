"""An in-memory kernel backend, shipped so tests of the services need neither root nor a
namespace (as kubernetes-sigs/knftables ships its `Fake`).

It keeps each applied table as the listing the kernel would give (one object per command,
elements folded into their set or map), answers `canonical` with the same listing form, so
the diff after an apply is empty exactly as with the real kernel, and can be told to refuse
commands or to drift. `tests/test_backend_contract.py` runs the same cases against it and
against libnftables in a namespace, so it cannot drift from reality unnoticed.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.adapters.kernel import FAMILY, describe
from reconciler.core.diff import elem_text
from reconciler.errors import KernelError

Listing = list[dict[str, Any]]
REFUSED = "Could not process rule: Operation not supported"
_MISSING = "Could not process rule: No such file or directory"
_EXISTS = "Could not process rule: File exists"
_FLUSHED = "\0flushed"  # where a flushed chain's rules stood, until the batch ends


@dataclass
class Transaction:
    """One `replace_table` or `delete_table` call, whether it was refused or checked."""

    op: str  # replace | delete
    table: str
    commands: Listing
    check: bool = False
    flush_ruleset: bool = False
    error: KernelError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Refusal:
    index: int | None
    when: Callable[[dict[str, Any]], bool] | None
    reason: str
    times: int | None  # None: every time


@dataclass
class FakeKernel:
    """A `kernel.Backend` in memory. `tables` holds listings by table name."""

    tables: dict[str, Listing] = field(default_factory=dict)
    transactions: list[Transaction] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    list_calls: int = 0
    canonical_calls: int = 0
    commits: int = 0  # transactions that changed something, as `Nft.commits` counts them
    generation: int = 0  # every commit and every `drift` moves it, as the kernel's does
    # Which ruleset (`mark`): this fake's own, never another's (as a namespace's cookie).
    ruleset: str = field(default_factory=lambda: f"fake:{os.urandom(8).hex()}")
    _refusals: list[_Refusal] = field(default_factory=list)
    # Called inside `replace_table` before committing, so after a caller read `mark`:
    # another process's commit landing there, which no test can time against the kernel.
    interleave: Callable[[], None] | None = None

    # -- what tests tell it ---------------------------------------------------------------

    def refuse(
        self,
        index: int | None = None,
        *,
        when: Callable[[dict[str, Any]], bool] | None = None,
        reason: str = REFUSED,
        times: int | None = None,
    ) -> None:
        """Refuse the rendered command at `index` of the next replaces, or any command for
        which `when(command)` holds (in `canonical` too, as the kernel would); `times`
        limits how many transactions are refused (None: until `accept_all`)."""
        if (index is None) == (when is None):
            raise ValueError("refuse: expected index or when, not both")
        self._refusals.append(_Refusal(index, when, reason, times))

    def accept_all(self) -> None:
        self._refusals.clear()

    def drift(self, name: str, mutate: Callable[[Listing], None] | None = None) -> None:
        """Change the stored table behind mtd's back: by `mutate(listing)`, or by default
        dropping the first element found (as `nft delete element` would)."""
        listing = self.tables[name]
        self.generation += 1
        if mutate is not None:
            mutate(listing)
            return
        for item in listing:
            for obj in item.values():
                if obj.get("elem"):
                    obj["elem"] = obj["elem"][1:]
                    return
        raise ValueError(f"table {name} holds no element to drop")

    @property
    def applied(self) -> list[Transaction]:
        """Transactions that changed a table (not refused, not checks)."""
        return [t for t in self.transactions if t.ok and not t.check]

    # -- kernel.Backend --------------------------------------------------------------------

    def list_table(self, name: str) -> Listing | None:
        self.list_calls += 1
        listing = self.tables.get(name)
        return None if listing is None else copy.deepcopy(listing)

    def replace_table(
        self,
        name: str,
        commands: Sequence[dict[str, Any]],
        *,
        flush_ruleset: bool = False,
        check: bool = False,
    ) -> None:
        commands = list(commands)
        tx = Transaction("replace", name, commands, check=check, flush_ruleset=flush_ruleset)
        self.transactions.append(tx)
        try:
            listing = self._load(name, commands, by_index=True)
        except KernelError as exc:
            tx.error = exc
            raise
        if check:
            return
        if self.interleave is not None:
            self.interleave()
        if flush_ruleset:
            self.tables.clear()
        self.tables[name] = listing
        self.commits += 1
        self.generation += 1

    def patch_table(
        self,
        name: str,
        batch: Sequence[dict[str, Any]],
        commands: Sequence[dict[str, Any]],
        *,
        check: bool = False,
    ) -> None:
        batch = list(batch)
        tx = Transaction("patch", name, batch, check=check)
        self.transactions.append(tx)
        try:
            for i, cmd in enumerate(batch):  # a refusal by index counts in the batch
                for r in self._refusals:
                    if r.index == i:
                        raise KernelError(r.reason, index=i, command=describe(cmd))
            tables = self._run(batch)
        except KernelError as exc:
            tx.error = exc
            raise
        if check:
            return
        self.tables = tables
        self.commits += 1
        self.generation += 1

    def list_tables(self) -> list[tuple[str, str]]:
        return [(FAMILY, name) for name in sorted(self.tables)]

    def delete_table(self, name: str) -> bool:
        tx = Transaction("delete", name, [])
        self.transactions.append(tx)
        if name not in self.tables:
            tx.error = KernelError(
                "No such file or directory", not_found=True, context=f"delete table {name}"
            )
            return False
        del self.tables[name]
        self.commits += 1
        self.generation += 1
        return True

    def canonical(self, commands: Sequence[dict[str, Any]], name: str) -> Listing:
        self.canonical_calls += 1
        return self._load(name, list(commands), by_index=False)

    def set_sysctls(self, values: Mapping[str, str]) -> dict[str, str]:
        before = {
            k: self.sysctls[k] for k in values if k in self.sysctls and self.sysctls[k] != values[k]
        }
        self.sysctls.update(values)
        return before

    def restore_sysctls(self, values: Mapping[str, str]) -> None:
        self.sysctls.update(values)  # its own namespace: never the host's /proc/sys

    def mark(self) -> tuple[str, int]:
        return self.ruleset, self.generation

    def version(self) -> str:
        return "fake"  # its listing form is its own, the same in every process

    def list_set(self, table: str, name: str) -> list[Any] | None:
        listing = self.tables.get(table)
        for obj in listing or []:
            if obj.get("set", {}).get("name") == name:
                return copy.deepcopy(obj["set"].get("elem") or [])
        return None

    def run(self, commands: Sequence[dict[str, Any]], *, check: bool = False) -> None:
        """The verbs an event-driven repair or a patch sends: add/flush/delete chain, add
        rule, delete set, flush set or map, add/delete element (a dynamic watch, a map
        element put back), all in one existing table; anything else
        is refused, as is a rule into a chain that is not there. Nothing changes unless
        every command applies."""
        commands = list(commands)
        tx = Transaction("run", "", commands, check=check)
        self.transactions.append(tx)
        try:
            tables = self._run(commands)
        except KernelError as exc:
            tx.error = exc
            raise
        if not check:
            self.tables = tables
            self.commits += 1
            self.generation += 1

    # -- internals ------------------------------------------------------------------------

    def _run(self, commands: Listing) -> dict[str, Listing]:
        tables = copy.deepcopy(self.tables)
        for i, cmd in enumerate(commands):
            for r in self._refusals:
                if r.when is not None and r.when(cmd):
                    raise KernelError(r.reason, index=i, command=describe(cmd))
            (verb, body), *_ = cmd.items()
            (kind, obj), *_ = body.items()
            listing = tables.get(obj.get("table", ""))
            if listing is None:
                raise KernelError(_MISSING, index=i, command=describe(cmd), not_found=True)
            name = obj.get("name")
            chains = {o["chain"]["name"] for o in listing if "chain" in o}
            if (verb, kind) == ("add", "chain"):
                if name not in chains:
                    listing.append({"chain": copy.deepcopy(obj)})
            elif (verb, kind) in (("flush", "chain"), ("delete", "chain")):
                if name not in chains:
                    raise KernelError(_MISSING, index=i, command=describe(cmd), not_found=True)
                gone = [o for o in listing if "rule" in o and o["rule"]["chain"] == name]
                if verb == "delete":
                    gone += [o for o in listing if "chain" in o and o["chain"]["name"] == name]
                elif gone:  # rules added again go where the chain's rules were
                    listing.insert(next(n for n, o in enumerate(listing) if o is gone[0]),
                                   {_FLUSHED: name})  # fmt: skip
                listing[:] = [o for o in listing if not any(o is g for g in gone)]
            elif (verb, kind) == ("add", "rule"):
                if obj["chain"] not in chains:
                    raise KernelError(_MISSING, index=i, command=describe(cmd), not_found=True)
                at = next((n for n, o in enumerate(listing) if o.get(_FLUSHED) == obj["chain"]),
                          len(listing))  # fmt: skip
                listing.insert(at, {"rule": copy.deepcopy(obj)})
            elif verb == "flush" and kind in ("set", "map"):
                target = next((o[kind] for o in listing if o.get(kind, {}).get("name") == name),
                              None)  # fmt: skip
                if target is None:
                    raise KernelError(_MISSING, index=i, command=describe(cmd), not_found=True)
                target.pop("elem", None)
            elif (verb, kind) == ("delete", "set"):
                listing[:] = [o for o in listing if o.get("set", {}).get("name") != name]
            elif kind == "element" and verb in ("add", "delete"):
                _element(listing, verb, obj, i, cmd)
            else:
                raise KernelError(f"fake kernel: unsupported {verb} {kind}", index=i, command=verb)
        for listing in tables.values():
            listing[:] = [o for o in listing if _FLUSHED not in o]
        return tables

    def _load(self, name: str, commands: Listing, *, by_index: bool) -> Listing:
        """The listing of `commands`, or the first refusal (nothing stored either way)."""
        for i, cmd in enumerate(commands):
            for n, r in enumerate(self._refusals):
                hit = (by_index and r.index == i) or (r.when is not None and r.when(cmd))
                if hit:
                    if r.times is not None:
                        r.times -= 1
                        if r.times <= 0:
                            del self._refusals[n]
                    raise KernelError(r.reason, index=i, command=describe(cmd))
        return _listing(name, commands)


def _element(listing: Listing, verb: str, obj: dict[str, Any], i: int, cmd: Any) -> None:
    """`add`/`delete element` into a set or map, as the kernel does: adding one that is
    there keeps it as it is (its timeout too), or is refused when a map's value differs;
    deleting one that is not there is refused. A map's element is deleted by its key."""
    target, is_map = None, False
    for o in listing:
        for kind in ("set", "map"):
            if o.get(kind, {}).get("name") == obj["name"]:
                target, is_map = o[kind], kind == "map"
    if target is None:
        raise KernelError(_MISSING, index=i, command=describe(cmd), not_found=True)
    have = target.setdefault("elem", [])
    for item in obj.get("elem") or []:
        key = _key(item, is_map and verb == "add")
        at = next((n for n, e in enumerate(have) if _key(e, is_map) == key), None)
        if verb == "add" and at is None:
            if isinstance(item, dict) and "timeout" in item.get("elem", {}):
                item = {"elem": {**item["elem"], "expires": item["elem"]["timeout"]}}
            have.append(copy.deepcopy(item))
        elif verb == "add" and is_map and elem_text(have[at][1]) != elem_text(item[1]):
            raise KernelError(_EXISTS, index=i, command=describe(cmd))
        elif verb == "delete":
            if at is None:
                raise KernelError(_MISSING, index=i, command=describe(cmd), not_found=True)
            del have[at]
    if not have:
        del target["elem"]


def _key(item: Any, is_map: bool = False) -> str:
    """An element's key in one text form, whichever JSON form (or tuple) it came in."""
    if is_map:
        item = item[0]
    return elem_text(item["elem"]["val"] if isinstance(item, dict) and "elem" in item else item)


def _listing(name: str, commands: Listing) -> Listing:
    """`add` commands as the kernel lists them: one object each, elements in their set."""
    out: Listing = []
    named: dict[str, dict[str, Any]] = {}
    for i, cmd in enumerate(commands):
        (verb, body), *_ = cmd.items()
        (kind, obj), *_ = body.items()
        if verb not in ("add", "create"):
            raise KernelError(f"fake kernel: unsupported verb {verb!r}", index=i, command=verb)
        obj = {k: (list(v) if k == "elem" else copy.deepcopy(v)) for k, v in obj.items()}
        if kind == "table":
            if not any("table" in o for o in out):
                out.append({"table": {"family": FAMILY, "name": name}})
            continue
        if kind in ("element", "rule"):  # into a set, map or chain added before
            target = named.get(
                f"{'chain' if kind == 'rule' else 'set'} {obj.get('chain') or obj.get('name')}"
            )
            if target is None:
                raise KernelError(_MISSING, index=i, command=describe(cmd), not_found=True)
            if kind == "element":
                target.setdefault("elem", []).extend(obj.get("elem") or [])
                continue
        out.append({kind: obj})
        if kind in ("set", "map", "chain"):
            named[f"{'chain' if kind == 'chain' else 'set'} {obj['name']}"] = obj
    return out
