"""The reconcile pass: shuffle -> render -> read live -> diff -> apply.

Triggers (the CLI, Redis, the drift timer, a git pull) only decide when it runs and with
which state, secret and epoch; each calls `run_pass` (lock, secret, epoch, session check,
gather, reconcile, epoch file, audit), which calls `reconcile`. `reconcile` talks to the
kernel (and its sysctls, put back through it when the kernel refuses a table) through the
`Backend` it is given; it records the sysctls it changed in `sysctls.json` and reports
refused dynamic entries to the watch store. The lock, the secret and the epoch file are
`run_pass`'s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from reconciler import defaults
from reconciler.adapters import auditlog, files, watchstore
from reconciler.adapters.caching import CachingBackend
from reconciler.adapters.kernel import SYSCTLS, Backend
from reconciler.core import diff, elements, patch, render, repair, shuffle, watch
from reconciler.core.bulk import gc_paused
from reconciler.core.caches import NONE, Caches
from reconciler.core.state import State
from reconciler.core.watch import Dynamic
from reconciler.errors import KernelError, MtdError
from reconciler.services import watching

Status = Literal["ok", "changed", "would change"]  # in sync; changed; would change (check)


@dataclass
class Result:
    """What one pass did, Ansible style: ok (in sync), changed, or would change (check)."""

    status: Status
    table: str
    epoch: int
    changes: list[diff.Change]
    fingerprint: str
    phases: dict[str, float] = field(default_factory=dict)
    # The rendered document without its elements: what an event-driven repair re-creates.
    skeleton: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    mappings: int = 0  # moved ports of the mapping at `epoch` (explicit watched entries)
    bucket_mappings: int = 0  # moved ports of its buckets (per_source and dynamic sources)
    buckets: int = 0
    applied_at: float | None = None  # unix time the transaction was sent (for the audit log)
    pending: dict[str, Any] | None = None  # `apply --confirm`: the revert armed (confirm.py)
    # The rendered elements, by set (references, no copy): what an element repair compares
    # the element events with.
    desired: elements.Desired | None = field(default=None, repr=False, compare=False)
    repaired: str = ""  # an event-driven repair: what it restored ("2 element(s)", ...)
    drawn: bool = False  # a preview without a secret yet: the mapping is a placeholder
    dropped: list[str] = field(default_factory=list)  # dynamic entries the kernel refused
    # The rendered commands (references, no copy): what the table holds after this pass, which
    # the next epoch's patch starts from (`core.patch`).
    rendered: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    patched: str = ""  # the table was patched in place, not replaced: what the patch rewrote

    @property
    def in_sync(self) -> bool:
        return not self.changes

    @property
    def duration(self) -> float:
        return sum(self.phases.values())

    def line(self) -> str:
        """`changed: table inet mtd epoch 4: +58 element, -58 element (0.04 s)`."""
        counts = ", ".join(f"{k} {n}" for k, n in sorted(diff.summary(self.changes).items()))
        if self.changes == [UNREAD]:
            counts = f"{self.mappings + self.bucket_mappings} mappings drawn anew"
            if self.buckets:
                counts += (
                    f" ({self.mappings} for watched entries, {self.bucket_mappings} in "
                    f"{self.buckets} buckets for per_source and dynamic sources)"
                )
            counts += f", {self.patched}" if self.patched else ", table replaced without reading it"
        what = f": {counts}" if counts else ""
        took = f"({self.duration:.2f} s)"
        return f"{self.status}: table inet {self.table} epoch {self.epoch}{what} {took}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "table": self.table,
            "epoch": self.epoch,
            "in_sync": self.in_sync,
            "summary": diff.summary(self.changes),
            "fingerprint": self.fingerprint,
            "phases": {k: round(v, 6) for k, v in self.phases.items()},
        }


UNREAD = diff.Change("~", "table", "", "table replaced without reading it back")


class _Phases(dict[str, float]):
    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


@gc_paused()
def reconcile(
    state: State,
    epoch: int,
    backend: Backend,
    *,
    secret: bytes,
    check: bool = False,
    templates: list[Path] | None = None,
    read_live: bool = True,
    dynamic: Dynamic | None = None,
    caches: Caches = NONE,
    held: Sequence[dict[str, Any]] | None = None,
) -> Result:
    """Make the owned table match `state` at `epoch`; with `check`, only report.

    `read_live=False` skips reading the table back (a rotation at a million mappings, where
    listing alone costs a minute): the table is then replaced without a diff. That loses no
    drift: the replacement overwrites whatever changed, and the full compare (apply, diff,
    status, the daemon's drift timer) reports drift between rotations; the daemon, which
    follows the kernel's change events, knows the table is as it left it.

    The dynamic watch entries (`dynamic`) go into the new table with their remaining time.
    Callers bring them from the store (`watching.gather`); without them the pass keeps what
    the live dyn4/dyn6 hold, so it never drops an entry and never touches a file itself.

    `held`: with `read_live=False`, the rendered commands the table is known to hold
    (the daemon's last pass, which the kernel's events vouch for). When the new table differs
    from it only in elements and rules changed in place (a rotation), it is patched in one
    transaction (`core.patch`) instead of replaced; a refused patch falls back to the
    replacement.
    """
    t = _Phases()
    with t("shuffle"):
        mapping = shuffle.compute(state, secret, epoch)
    if dynamic is None:
        with t("watch"):
            dynamic = watching.from_kernel(state, backend)
    with t("render"):
        commands = render.render(state, mapping, templates, dynamic, caches)
    skeleton = diff.skeleton_commands(commands)
    changes = [UNREAD]
    # Only a backend that remembers mtd's last commit (`caching`) may vouch for the table;
    # never with `ownership: ruleset`, whose flush reaches beyond it.
    owned = state.ownership != "ruleset"
    cached = backend if owned and isinstance(backend, CachingBackend) else None
    if read_live and cached is not None and cached.unchanged(state.table, commands):
        changes = []  # mtd's own last commit, and nothing committed since: nothing to list
    elif read_live:
        with t("read"):
            seed = mapping.seed if mapping.buckets else None
            canonical = _canonical(backend, skeleton, commands, state.table, seed)
            listing = backend.list_table(state.table)
        with t("diff"):
            changes = diff.compare(canonical, commands, listing)
            del listing  # up to a million elements: not kept through the apply
        if not changes and cached is not None:
            cached.in_sync(state.table, commands)
    if state.ownership == "ruleset":
        # The host's configuration asked mtd to own the whole ruleset: every other table
        # goes with the flush, and the preview says which.
        changes += [
            diff.Change(
                "-", "table", name, f"table {family} {name} (ownership: ruleset flushes it)"
            )
            for family, name in backend.list_tables()
            if (family, name) != ("inet", state.table)
        ]
    status, applied_at, dropped, patched = "ok", None, [], ""
    previous = {} if check else backend.set_sysctls(SYSCTLS)
    if changes:
        status = "would change" if check else "changed"
        with t("apply"):
            applied_at = time.time()
            try:
                if not read_live and held is not None and not check:
                    patched = _patch(state, backend, held, commands)
                if not patched:
                    dropped = _replace(state, backend, commands, check, dynamic, mapping, templates)
            except BaseException:
                backend.restore_sysctls(previous)  # a failed command changes nothing
                raise
    files.remember_sysctls(files.sysctl_record(state.epoch_file), previous)
    fingerprint = mapping.fingerprint(secret)
    mappings = sum(len(m) for m in mapping.moves.values())
    bucketed = sum(len(m) for by_proto in mapping.buckets for m in by_proto.values())
    return Result(
        status,
        state.table,
        epoch,
        changes,
        fingerprint,
        dict(t),
        skeleton,
        mappings=mappings,
        bucket_mappings=bucketed,
        buckets=len(mapping.buckets),
        applied_at=applied_at,
        desired=elements.Desired.from_commands(commands),
        dropped=dropped,
        rendered=commands,
        patched=patched,
    )


def _patch(
    state: State, backend: Backend, held: Sequence[dict[str, Any]], commands: list[dict]
) -> str:
    """Patch the table from `held` to `commands` in one transaction (`core.patch`): what
    it rewrote, or "" when it cannot be patched or the kernel refused the patch (nothing
    changed then: the caller replaces the table)."""
    if state.ownership == "ruleset":
        return ""
    found = patch.plan(state.table, held, commands)
    if found is None:
        return ""
    try:
        backend.patch_table(state.table, found.commands, commands)
    except KernelError:
        return ""
    return found.line()


def _replace(
    state: State,
    backend: Backend,
    commands: list[dict[str, Any]],
    check: bool,
    dynamic: Dynamic,
    mapping: Any,
    templates: list[Path] | None,
) -> list[str]:
    """Replace the table; the dynamic entries the kernel refused (one line each).

    A refused replacement that holds dynamic entries is tried again without them: when that
    one is taken, the entries were the cause, and they go back in small element
    transactions, halved until each refused one stands alone and is left out. One bad entry
    (a store from an older mtd, an edit by hand) costs that entry, never the table."""
    flush = state.ownership == "ruleset"
    try:
        backend.replace_table(state.table, commands, flush_ruleset=flush, check=check)
        return []
    except KernelError as exc:
        if not any(dynamic.get(v) for v in watch.SETS):
            raise
        original = exc
    bare = render.render(state, mapping, templates, {v: [] for v in watch.SETS})
    try:
        backend.replace_table(state.table, bare, flush_ruleset=flush, check=check)
    except KernelError:
        raise original from None  # not the entries: the table itself is refused
    if check:  # no table to add them to: said, not tried one by one
        n = sum(len(dynamic.get(v, ())) for v in watch.SETS)
        dropped = [f"{n} dynamic entries: refused by the kernel together: left out of the check"]
    else:
        dropped = list(watching.add_each(backend, state.table, dynamic).values())
    watchstore.report(dropped)
    return dropped


def _canonical(
    backend: Backend,
    skeleton: list[dict[str, Any]],
    commands: list[dict[str, Any]],
    table: str,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """The kernel's form of the rendered skeleton; a refusal numbered as in `commands`.
    With the buckets' `seed`, learnt with a stand-in for it (`diff.without_seed`), so a
    new epoch finds the form its predecessor learnt."""
    try:
        standin = diff.without_seed(skeleton, seed) if seed is not None else None
        if standin is not None:
            learnt = diff.with_seed(backend.canonical(standin[0], table), seed, standin[1])
            if learnt is not None:
                return learnt
        return backend.canonical(skeleton, table)
    except KernelError as exc:
        raise exc.renumbered(diff.skeleton_positions(commands)) from None


def repair_events(
    previous: Result,
    backend: Backend,
    events: list[repair.Event],
    state: State,
    raw: Sequence[repair.Raw] = (),
    undecoded: str = "",
) -> Result | str:
    """Put back what the events say someone else changed, in one small transaction (no
    listing: the same cost at any table size): chains and rules from the skeleton, elements
    from the element events compared with the last pass's rendered elements. Or why the
    table must be replaced instead, in words (the events touched something else, an element
    was not decoded with certainty, the kernel refused the batch)."""
    if previous.skeleton is None or previous.desired is None:
        return "no earlier pass to repair from"
    skeleton = previous.skeleton
    touched = any(
        kind == "element" and not repair.runtime(kind, name) and not repair.anonymous(name)
        for _, kind, name in events
    )
    batch: list[dict[str, Any]] = []
    changes: list[diff.Change] = []
    if touched:
        if undecoded:
            return undecoded
        out = repair.elements(
            state.table, skeleton, previous.desired, raw, repair.foreign_sets(skeleton, events)
        )
        if isinstance(out, str):
            return out
        batch, changes = out
    chains = repair.plan(state.table, skeleton, events, with_elements=touched)
    if chains is None:
        kinds = sorted({f"{op}{kind} {name}".strip() for op, kind, name in events})
        return f"the events touched more than chains, rules and elements ({', '.join(kinds)})"
    changes = [
        diff.Change(op, kind, name, f"{op}{kind} {name}")
        for op, kind, name in events
        if kind != "element" or not touched
    ] + changes
    t = _Phases()
    if chains or batch:  # an empty one would count as a commit and move no generation
        try:
            with t("apply"):
                backend.run(chains + batch)
        except KernelError as exc:
            return f"the repair was refused ({exc.reason})"
    names = sorted({name for _, kind, name in events if kind in repair.CHAIN_KINDS and name})
    what = [f"chain {', '.join(names)}"] if names else []
    what += [f"{sum(c.kind == 'element' for c in changes)} element(s)"] if touched else []
    return Result(
        "changed" if chains or batch else "ok",
        state.table,
        previous.epoch,
        changes,
        previous.fingerprint,
        dict(t),
        previous.skeleton,
        desired=previous.desired,
        repaired=" and ".join(what) or "nothing",
        rendered=previous.rendered,
    )


SecretFrom = Literal["read", "provision", "preview"]


@dataclass(frozen=True)
class Session:
    """The SSH-session check of a pass that changes the table (`services.lockout`)."""

    host: str
    force: bool = False


@dataclass(frozen=True)
class Audit:
    """The audit line of a pass: `always`, or only when the table changed; a failure to
    write it is `PassOutcome.audit_error` when `tolerate`, else raised (`AuditFailed`)."""

    origin: str
    host: str
    commit: str | None = None
    always: bool = False
    tolerate: bool = False


@dataclass
class PassRequest:
    """One pass as its caller wants it: the state and kernel backend, the secret, the epoch,
    what to check, and the few steps where the CLI, a pull round and the daemon differ."""

    state: State
    backend: Backend
    # Given, or made under the lock by a same-layer caller, or read ("read": never created;
    # "provision": created where no mapping is live; "preview": a stand-in when none yet).
    secret: bytes | Callable[[], bytes] | None = None
    secret_from: SecretFrom = "read"
    epoch: int | None = None  # the target; None: the epoch file's (+1 with `advance`)
    advance: bool = False
    at_least: int = 0  # the fleet's epoch (the daemon): never behind it
    check: bool = False  # preview: nothing is written, the lock is shared
    write_epoch: bool = False  # record the target in the epoch file once the kernel took it
    session: Session | Callable[[bytes, int], bool] | None = None  # True: forced past it
    confirm_seconds: int | None = None  # `apply --confirm`: armed around the kernel step
    guard: Any = None  # `fresh.undo_on_failure`'s: told once the kernel has the table
    templates: list[Path] | None = None
    caches: Caches = NONE  # what rendering may reuse (`core.caches`)
    read_live: bool | Callable[[int], bool] = True  # False: trust the last pass's table
    held: Sequence[dict[str, Any]] | None = None  # what it holds then: patched from (`reconcile`)
    around: Callable[[], AbstractContextManager[Any]] | None = None  # the daemon's quiet window
    # An element repair that makes the full pass unnecessary (the daemon's events), or None.
    repair: Callable[[int], Result | None] | None = None
    taken: Callable[[PassOutcome], None] | None = None  # once the kernel has it (a checkout)
    audit: Audit | None = None


@dataclass
class PassOutcome:
    """What a pass did: its result, the epoch reached, the epoch file's before it, the
    secret used (`drawn`: a stand-in), whether the session check was forced, whether an
    element repair replaced the full pass, what `around` yielded, and an audit failure."""

    result: Result
    epoch: int
    file_epoch: int
    secret: bytes
    drawn: bool = False
    forced: bool = False
    repaired: bool = False
    entered: Any = None
    audit_error: str | None = None


def run_pass(request: PassRequest) -> PassOutcome:
    """The one pass: lock, secret, epoch, session check, gather, reconcile (or repair),
    write the epoch, audit. Every trigger (the CLI, a pull round, the daemon) calls it."""
    state, nft = request.state, request.backend
    with files.reconcile_lock(state.epoch_file, shared=request.check):
        secret, drawn = _secret(request)
        current = files.read_epoch(state.epoch_file)
        target = request.epoch
        if target is None:
            target = max(current + (1 if request.advance else 0), request.at_least)
        forced = _session(request, secret, target)
        with _around(request) as entered:
            result = request.repair(target) if request.repair is not None else None
            repaired = result is not None
            if result is None:
                live = request.read_live
                result = reconcile(
                    state,
                    target,
                    nft,
                    secret=secret,
                    check=request.check,
                    templates=request.templates,
                    caches=request.caches,
                    read_live=live(target) if callable(live) else live,
                    dynamic=watching.gather(state, nft, write=not request.check),
                    held=request.held,
                )
        out = PassOutcome(result, target, current, secret, drawn, forced, repaired, entered)
        if request.guard is not None:
            request.guard.done()  # the kernel has it: every file stays
        if request.confirm_seconds is not None and entered is not None:
            result.pending = _settle_confirm(state, entered, result)
        if request.taken is not None:
            request.taken(out)
        # Only once the kernel took it: a refused rotation leaves the epoch file as it was.
        if request.write_epoch and not request.check and target != current:
            files.write_epoch(state.epoch_file, target)
        if request.audit is not None and not request.check:
            out.audit_error = _audit(request.audit, state, out)
    if drawn:
        result.drawn, result.fingerprint = True, ""
    return out


def _secret(request: PassRequest) -> tuple[bytes, bool]:
    """The pass's secret, and whether it is a preview's stand-in."""
    state, nft, given = request.state, request.backend, request.secret
    if isinstance(given, bytes):
        return given, False
    if given is not None:
        return given(), False
    if request.secret_from == "provision":
        return provision_secret(state, nft), False
    if request.secret_from == "preview" and no_secret_yet(state):
        # A preview from day zero: a stand-in secret, never written. Not day zero when the
        # table is live: the secret was lost, as `apply` would say.
        if ("inet", state.table) in nft.list_tables():
            raise MtdError(
                f"{state.secret_file}: no secret file, but table inet {state.table} is "
                "live: the secret was lost: restore it from a backup (nothing to preview)"
            )
        return defaults.PLACEHOLDER_SECRET, True
    return read_secret(state, nft), False  # read-only: never creates one


def no_secret_yet(state: State) -> bool:
    return not Path(state.secret_file).exists()


def _session(request: PassRequest, secret: bytes, target: int) -> bool:
    """The SSH-session check: whether it was forced past (`lockout.check`)."""
    from reconciler.services import lockout

    check = request.session
    if check is None:
        return False
    if callable(check):
        return check(secret, target)
    state = request.state
    return lockout.check(state, secret, target, request.backend, host=check.host, force=check.force)


def _around(request: PassRequest) -> AbstractContextManager[Any]:
    from reconciler.services import confirm

    if request.around is not None:
        return request.around()
    if request.confirm_seconds is not None and not request.check:
        host = request.session.host if isinstance(request.session, Session) else ""
        return confirm.armed(
            request.state, request.backend, seconds=request.confirm_seconds, host=host
        )
    return contextlib.nullcontext()


def _settle_confirm(state: State, pending: Any, result: Result) -> Any:
    """A pass that found the table as it should be disarms the revert it armed itself."""
    from reconciler.services import confirm

    if result.status == "ok" and pending["armed"] == pending["first_armed"]:
        confirm.disarm(state, pending)
        return None
    return pending


def _audit(audit: Audit, state: State, out: PassOutcome) -> str | None:
    """Write the pass's audit line; why it failed, when the request tolerates that."""
    if not (audit.always or out.result.status == "changed"):
        return None
    try:
        auditlog.log_result(
            state,
            out.result,
            origin=audit.origin,
            host=audit.host,
            commit=audit.commit,
            force=out.forced,
        )
    except auditlog.AuditFailed as exc:
        if not audit.tolerate:
            raise
        return "; ".join(exc.problems)
    return None


def provision_secret(state: State, nft: Backend) -> bytes:
    """The secret for a pass that may change the table (`apply`, `rotate`, `mtd run` at
    start): created only where no mapping is live yet. With the owned table in place, a
    missing secret file was lost, and a new one would silently move every port to a mapping
    that matches neither the fleet's expectations nor the audit log's fingerprints."""
    lost = lost_secret(state, nft)
    if lost:
        raise MtdError(lost)
    return files.load_secret(state.secret_file, create=True)


def read_secret(state: State, nft: Backend) -> bytes:
    """The secret for a command that only reads (`status`, `diff`): never created; a
    missing one with the table live gets the advice `provision_secret` gives."""
    lost = lost_secret(state, nft)
    if lost:
        raise MtdError(lost)
    return files.load_secret(state.secret_file)


def lost_secret(state: State, nft: Backend) -> str | None:
    """The one line for a secret file missing while the owned table is live."""
    p = Path(state.secret_file)
    if p.exists() or p.is_symlink() or nft.list_table(state.table) is None:
        return None
    return (
        f"{state.secret_file}: no secret file, but table inet {state.table} is live: "
        "the secret was lost: restore it from a backup, or start a new mapping on "
        "purpose with mtd down, then mtd apply"
    )


def take_down(state: State, backend: Backend) -> tuple[bool, list[str]]:
    """Remove the owned table on purpose and put back the sysctls mtd changed: whether
    anything changed, and what, in words. The caller holds the reconcile lock and writes the
    audit line."""
    record = files.sysctl_record(state.epoch_file)
    files.read_sysctl_record(record)  # a damaged record stops us before anything changes
    removed = backend.delete_table(state.table)
    out = [f"table inet {state.table} {'removed' if removed else 'absent'}"]
    restored = files.restore_sysctls(record, SYSCTLS)
    if restored is None:
        out.append("fwmark_reflect sysctls left as they are (mtd did not change them here)")
    elif restored:
        out.append(
            "restored "
            + ", ".join(f"{k.replace('/', '.')}={v}" for k, v in sorted(restored.items()))
        )
    else:
        out.append("fwmark_reflect sysctls left as they are (changed since by someone else)")
    return bool(removed or restored), out
