"""Dynamic watch entries between the store and the kernel.

`gather` runs before every full table replacement (apply, rotate, a daemon's pass, a pull
round): it harvests the kernel's dyn4/dyn6 (the tripwire adds sources there in the packet
path) into the store, drops what expired, and returns the render input, so the new table
holds every entry with its remaining time. `change` is `mtd watch add/del --local` and a
daemon's reaction to a watch message: the store, then one small element transaction (no
table replacement). Both run under the reconcile lock (the caller's), then the store's, in
that order, so a pass never harvests an element a `watch del` is removing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from reconciler.adapters import watchstore
from reconciler.adapters.kernel import Backend
from reconciler.core import watch
from reconciler.core.state import State
from reconciler.core.watch import Dynamic, Entry
from reconciler.errors import KernelError


def trusted(state: State) -> list[Any]:
    """The state's trusted prefixes: a dynamic entry inside one would have no effect."""
    return list(state.trusted)


def kernel_entries(state: State, backend: Backend) -> dict[str, int] | None:
    """{source: seconds left} of the live dyn4/dyn6; None when the table has no such set
    (no table yet, or a template without dynamic sets)."""
    list_set = getattr(backend, "list_set", None)
    if list_set is None:
        return None
    found: dict[str, int] | None = None
    for name in watch.SETS.values():
        elems = list_set(state.table, name)
        if elems is not None:
            found = (found or {}) | watch.kernel_entries(elems)
    return found


def from_kernel(state: State, backend: Backend, *, now: float | None = None) -> Dynamic:
    """The render input from the live dyn4/dyn6 alone: what a pass keeps when its caller
    brings no store (the pass itself does no file I/O)."""
    now = time.time() if now is None else now
    kept = watch.harvest({}, kernel_entries(state, backend) or {}, now)
    return _render_input(state, kept, now)


def gather(state: State, backend: Backend, *, write: bool, now: float | None = None) -> Dynamic:
    """The render input for a full replacement; with `write`, the store is brought up to
    date first (the kernel's tripwire entries in, expired entries out)."""
    now = time.time() if now is None else now
    kernel = kernel_entries(state, backend) or {}
    path = watchstore.path_for(state.epoch_file)
    if write:
        with watchstore.locked(state.epoch_file):
            dropped: list[str] = []
            entries = watchstore.load(path, dropped)
            merged = watch.harvest(entries, kernel, now)
            if merged != entries or dropped:
                watchstore.save(path, merged, now)
        watchstore.report(dropped)  # once: the store no longer holds them
    else:
        merged = watch.harvest(watchstore.load(path), kernel, now)
    return _render_input(state, merged, now)


def _render_input(state: State, entries: dict[str, Entry], now: float) -> Dynamic:
    nets = trusted(state)
    return watch.dynamic({s: e for s, e in entries.items() if not _inside(s, nets)}, now)


def _inside(source: str, nets: list[Any]) -> bool:
    """Trusted beats dynamic: such an entry is kept in the store but never rendered."""
    return watch.trusted_over(source, nets) is not None


@dataclass
class Outcome:
    """What `change` did: the entries stored and removed, and where."""

    added: list[Entry] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kernel: bool = False  # the element transaction ran (False: store only, no dynamic set)
    problems: list[str] = field(default_factory=list)  # refused entries (store full...)

    def line(self, table: str) -> str:
        now = time.time()
        parts = [f"watched {e.source} for {e.left(now)} s" for e in self.added]
        parts += [f"unwatched {s}" for s in self.removed]
        where = (
            f"table inet {table} and the store"
            if self.kernel
            else f"the store only (table inet {table} has no dyn4/dyn6 set yet)"
        )
        return f"{'; '.join(parts) or 'nothing changed'}: {where}"


def change(
    state: State,
    backend: Backend,
    add: Iterable[Entry] = (),
    remove: Iterable[str] = (),
    *,
    now: float | None = None,
    release: Iterable[tuple[str, str]] = (),
) -> Outcome:
    """Store the entries, then apply them to the kernel in one small transaction. The
    caller holds the reconcile lock (and the monitor's quiet window, in the daemon).
    `release`: (source, origin) removed only while its entry has that origin (a CrowdSec
    decision's end never ends an operator's watch); a CrowdSec entry already held as given
    is not applied again (two hosts following one Local API publish each decision)."""
    now = time.time() if now is None else now
    out = Outcome()
    dropped: list[str] = []
    with watchstore.locked(state.epoch_file) as path:
        entries = watch.live(watchstore.load(path, dropped), now)
        chosen = dict(entries)  # before this change: whose kernel elements are an operator's
        for entry in add:
            held = entries.get(entry.source)
            if entry.origin == "crowdsec" and held is not None and _same(held, entry):
                continue
            problem = watchstore.put(entries, entry, now)
            if problem:
                out.problems.append(problem)
            elif entry.left(now) >= 1:
                out.added.append(entry)
        remove = list(remove)
        remove += [s for s, origin in release if s in entries and entries[s].origin == origin]
        for source in remove:
            entries.pop(source, None)
            out.removed.append(source)
        watchstore.save(path, entries, now)
    watchstore.report(dropped)
    kernel = kernel_entries(state, backend)
    if kernel is None or not (out.added or out.removed):
        return out
    batch = [
        *_make_room(state.table, kernel, chosen, out.added, out.removed),
        *watch.commands(state.table, [(e.source, e.left(now)) for e in out.added], out.removed),
    ]
    try:
        backend.run(batch)
    except KernelError as exc:
        if exc.not_found:  # the table went away meanwhile: the store has it
            return out
        if len(out.added) < 2:
            raise
        # One entry the kernel refuses must not cost the others: the removals and the
        # room first, then the entries by halves (the refused ones said, one line each).
        rest = [*_make_room(state.table, kernel, chosen, out.added, out.removed)]
        rest += watch.commands(state.table, [], out.removed) if out.removed else []
        if rest:
            backend.run(rest)
        pairs: Dynamic = {"4": [], "6": []}
        for e in out.added:
            pairs[e.family].append((e.source, e.left(now)))
        refused = add_each(backend, state.table, pairs, renew=True)
        out.problems += refused.values()
        out.added = [e for e in out.added if e.source not in refused]
    out.kernel = True
    return out


def _same(held: Entry, entry: Entry) -> bool:
    return held.origin == entry.origin and abs(held.expires_at - entry.expires_at) < 2.0


def _make_room(
    table: str,
    kernel: dict[str, int],
    store: dict[str, Entry],
    added: list[Entry],
    removed: list[str],
) -> list[dict[str, Any]]:
    """Deletes of tripwire elements (fewest seconds left first) that make room, in a full
    dyn4/dyn6, for what `watch.commands` adds (it adds every touched source before deleting
    or renewing it): spoofed trips, or a /48's worth of /64s, fill a set, and the kernel
    refuses any add to a full set (ENFILE), so `mtd watch add` (fail2ban's ban) and `del`
    would fail for as long as the flood lasts, even after a rotation. Entries an operator
    or the fleet made are never evicted."""
    out: list[dict[str, Any]] = []
    touched = {e.source for e in added} | set(removed)
    for fam, name in watch.SETS.items():
        live = [s for s in kernel if watch.family(s) == fam]
        new = {s for s in touched if watch.family(s) == fam and s not in kernel}
        over = len(live) + len(new) - watch.MAX_KERNEL
        if over <= 0:
            continue
        trips = sorted(
            (kernel[s], s)
            for s in live
            if s not in touched and (s not in store or store[s].origin == "tripwire")
        )
        if trips:
            evict = [s for _, s in trips[:over]]
            ref = {"family": "inet", "table": table, "name": name, "elem": evict}
            out.append({"delete": {"element": ref}})
    return out


def add_each(backend: Backend, table: str, dynamic: Dynamic, renew: bool = False) -> dict[str, str]:
    """Put entries into dyn4/dyn6 in element transactions, halved until each one the kernel
    refuses stands alone and is left out: {source: the line saying why}. `renew`: the elements may
    be there already (their timeout is set anew). A family whose set is missing is skipped
    (a template without it)."""
    dropped: dict[str, str] = {}
    for fam, name in watch.SETS.items():
        pending = [list(dynamic.get(fam, ()))]
        while pending:
            chunk = pending.pop()
            if not chunk:
                continue
            if renew:
                batch = watch.commands(table, chunk)
            else:
                ref = {"family": "inet", "table": table, "name": name}
                elems = [watch.element(src, left) for src, left in chunk]
                batch = [{"add": {"element": ref | {"elem": elems}}}]
            try:
                backend.run(batch)
            except KernelError as exc:
                if exc.not_found:
                    break
                if len(chunk) == 1:
                    dropped[chunk[0][0]] = (
                        f"dynamic entry {chunk[0][0]!r:.60}: refused by the kernel "
                        f"({exc.reason}): left out of table inet {table}"
                    )
                else:
                    half = len(chunk) // 2
                    pending += [chunk[half:], chunk[:half]]
    return dropped
