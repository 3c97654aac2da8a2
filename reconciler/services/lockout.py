"""The SSH-session check of `mtd apply`, `rotate` and `pull` (docs/operations.md, "No lockouts").

Where the session's client finds the session's port after the change is computed from the
desired state (`audit.mapping_of`, as the ruleset does). Where it finds it now is the mapping
of the live table: recomputed from the audit log's last applied line, whose fingerprint
confirms it, from the state being applied or from `earlier` states (the commit a pull
replaces); when no candidate matches, or no table is live, the session is taken to reach
sshd at its real port, which is how an operator's session normally comes in.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping

from reconciler.adapters import auditlog, session, watchstore
from reconciler.adapters.kernel import Backend
from reconciler.core import audit, lockout, watch
from reconciler.core.state import State
from reconciler.errors import MtdError


def check(
    state: State,
    secret: bytes,
    epoch: int,
    backend: Backend,
    *,
    host: str,
    force: bool,
    earlier: Iterable[State] = (),
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Refuse (one-line `MtdError`) a change at `epoch` that would move the SSH session's
    port for its client. True when `force` overrode a refusal (the audit line says so)."""
    text = session.ssh_connection(environ)
    if text is None:
        return False
    try:
        s = lockout.parse(text)
    except MtdError:
        if force:
            return True
        raise
    if s.port not in state.services.get("tcp", ()):
        return False  # not a service: mtd never moves it
    dynamic = _dynamic(state)
    view = audit.mapping_of(state, secret, epoch, s.source, dynamic)
    after = lockout.seen_at(view.moves, s.port)
    now = _now(state, secret, backend, s, host, earlier, dynamic)
    is_trusted = view.trusted
    line = lockout.refusal(s, now, after, is_trusted=is_trusted)
    if line is None:
        return False
    if force:
        return True
    raise MtdError(line)


def _dynamic(state: State) -> set[str]:
    """The dynamic sources watched now (the store): they keep their bucket mapping across
    the change, as the tripwire's and `mtd watch`'s entries survive a replacement."""
    try:
        entries = watchstore.load(watchstore.path_for(state.epoch_file))
    except MtdError:
        return set()
    return set(watch.live(entries, time.time()))


def _now(
    state: State,
    secret: bytes,
    backend: Backend,
    s: lockout.Session,
    host: str,
    earlier: Iterable[State],
    dynamic: Collection[str] = (),
) -> int:
    """Where the session's client finds its port in the live table."""
    if ("inet", state.table) not in backend.list_tables():
        return s.port
    try:
        entry = audit.live_at(auditlog.entries(state.audit_log), auditlog.now(), host)
    except MtdError:
        return s.port
    if entry is None or entry.get("result") == audit.DOWN or entry.get("epoch") is None:
        return s.port
    for candidate in (*earlier, state):
        try:
            view = audit.mapping_of(candidate, secret, int(entry["epoch"]), s.source, dynamic)
        except (MtdError, ValueError, TypeError):
            continue
        if view.fingerprint == entry.get("fingerprint"):
            return lockout.seen_at(view.moves, s.port)
    return s.port
