"""The audit log file: one JSON line appended per applied change, mode 0600.

What a line means and how a past mapping is recomputed from it is pure (`core.audit`); this
module only appends and reads the file.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler.adapters import files
from reconciler.core.audit import DOWN, ORIGINS, parse_time, timestamp
from reconciler.core.state import State
from reconciler.errors import MtdError


class AuditFailed(MtdError):
    """The change is live but its audit line could not be written: not a failed change, so
    it is reported apart ("applied, audit failed") and never retried or rolled back."""

    def __init__(self, result: Any, *problems: str) -> None:
        super().__init__(*(f"applied, audit failed: {p}" for p in problems))
        self.result = result


def now() -> datetime:
    return datetime.now(UTC)


def check_writable(path: str | Path) -> None:
    """Before a change: the log can be opened for appending (created private when missing),
    so that a change that could not be recorded is refused rather than made."""
    p = Path(path)
    try:
        fd = files.open_own(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "audit log")
        try:
            _check_own(p, os.fstat(fd))
        finally:
            os.close(fd)
    except MtdError as exc:
        why = str(exc).removeprefix(f"{p}: ")
        raise MtdError(f"{p}: cannot write the audit log: {why}: nothing changed") from None


def record(
    path: str | Path,
    *,
    host: str,
    origin: str,
    epoch: int | None,
    result: str,
    fingerprint: str | None,
    commit: str | None = None,
    error: str | None = None,
    when: datetime | None = None,
    table: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Append one line; the file and its directory are created private. `force`: the
    change overrode the SSH-session check (`--force`)."""
    if origin not in ORIGINS:
        raise ValueError(f"audit origin {origin!r}: expected one of {', '.join(ORIGINS)}")
    entry: dict[str, Any] = {
        "time": timestamp(when or now()),
        "host": host,
        "commit": commit,
        "epoch": epoch,
        "origin": origin,
        "result": result,
        "fingerprint": fingerprint,
    }
    if error:
        entry["error"] = error
    if table:
        entry["table"] = table
    if force:
        entry["force"] = True
    p = Path(path)
    line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
    fd = files.open_own(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "audit log")
    try:
        _check_own(p, os.fstat(fd))
        os.write(fd, line)  # one write with O_APPEND: lines of concurrent writers never mix
    except OSError as exc:
        raise MtdError(f"{p}: cannot write the audit log: {exc.strerror}") from None
    finally:
        os.close(fd)
    return entry


def _check_own(p: Path, st: os.stat_result) -> None:
    """Append only to a private regular file of this user. Anything else (a shell profile, a
    file of another user, one others may read) is refused with what to expect and the
    command that fixes it, never re-moded or re-owned by mtd itself."""
    if not stat.S_ISREG(st.st_mode):
        raise MtdError(
            f"{p}: not a regular file: expected the audit log, a private regular file (0600); "
            "mtd writes into nothing else"
        )
    if st.st_uid != os.geteuid():
        raise MtdError(
            f"{p}: owned by user {st.st_uid}: expected user {os.geteuid()}, who runs mtd "
            f"(run: chown {os.geteuid()} {p})"
        )
    if st.st_mode & 0o077:
        raise MtdError(
            f"{p}: mode {stat.S_IMODE(st.st_mode):04o}: expected 0600, the audit log is private "
            f"(run: chmod 600 {p})"
        )


def log_result(
    state: State,
    result: Any,
    *,
    origin: str,
    host: str,
    commit: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Record a reconcile `Result` in the state's audit log (call it after a change);
    `AuditFailed` when it cannot be written. Its time is when the change was sent to the
    kernel, so that a time at which the new mapping was seen live never finds the one before."""
    sent = getattr(result, "applied_at", None)
    try:
        return record(
            state.audit_log,
            host=host,
            origin=origin,
            epoch=result.epoch,
            result=result.status,
            fingerprint=result.fingerprint,
            commit=commit,
            when=None if sent is None else datetime.fromtimestamp(sent, UTC),
            force=force,
        )
    except MtdError as exc:
        raise AuditFailed(result, *exc.problems) from None


def log_down(state: State, *, origin: str, host: str) -> dict[str, Any]:
    """The owned table was removed on purpose: from now on every source sees the real ports."""
    return record(
        state.audit_log,
        host=host,
        origin=origin,
        epoch=None,
        result=DOWN,
        fingerprint=None,
        table=state.table,
    )


def entries(path: str | Path) -> list[dict[str, Any]]:
    """Every line of the log; a missing log is an empty history."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise MtdError(f"{p}: cannot read the audit log: {exc}") from None
    out = []
    lines = text.split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("time"), str):
                raise ValueError
            parse_time(entry["time"])
        except (ValueError, MtdError):
            if n == len(lines):
                continue  # a last line torn by a crash while writing: the rest is intact
            raise MtdError(f"{p}:{n}: not an audit entry: expected one JSON object") from None
        out.append(entry)
    return out
