"""`mtd apply --confirm SECONDS` and `mtd confirm`: a change that undoes itself unless
confirmed in time (the "commit confirmed" of network operating systems).

Before the change, the live table (its listing, or "absent") is kept in a private record
next to the epoch file, and a detached watcher is started: its own session and process
group, no terminal, SIGHUP ignored, so the SSH session that started it may die. Unless
`mtd confirm` removes the record before the deadline, the watcher takes the reconcile lock
and restores the previous table in ONE transaction (delete and re-add, as every
replacement; or deletes the table when there was none), records a `reverted` audit line
and removes the record.

A second `apply --confirm` while one is pending extends it: the restore point stays the
table of before the FIRST one (the last confirmed table), the deadline is the new one, and
the earlier watcher, whose token no longer matches, exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from reconciler.adapters import auditlog, files
from reconciler.adapters.kernel import SYSCTLS, Backend
from reconciler.core import audit
from reconciler.core.state import State
from reconciler.errors import MtdError

RECORD = "confirm.json"
REVERTED = "reverted"
POLL = 0.5  # seconds between the watcher's looks at the record: `mtd confirm` ends it soon


def record_path(epoch_file: str | Path) -> Path:
    return Path(epoch_file).with_name(RECORD)


def read(path: Path) -> dict[str, Any] | None:
    """The pending record; None when nothing is pending. A record that is not one is an
    error naming the file: silently dropping it would drop a revert someone counts on."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MtdError(f"{path}: cannot read the pending revert: {exc.strerror or exc}") from None
    try:
        rec = json.loads(text)
        ok = (
            isinstance(rec, dict)
            and isinstance(rec.get("token"), str)
            and isinstance(rec.get("deadline"), int | float)
            and isinstance(rec.get("table"), str)
            and (rec.get("previous") is None or isinstance(rec.get("previous"), list))
        )
    except ValueError:
        ok = False
    if not ok:
        raise MtdError(
            f"{path}: not a pending revert of mtd apply --confirm: expected its JSON record; "
            "remove it to drop the revert"
        )
    return rec


def _write(path: Path, rec: dict[str, Any]) -> None:
    files.write_atomic(path, json.dumps(rec, separators=(",", ":")), mode=0o600)


def without_handles(listing: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The listing as it can be added back (handles belong to the kernel's old objects)."""
    out = []
    for obj in listing:
        ((kind, body),) = obj.items()
        out.append({kind: {k: v for k, v in body.items() if k != "handle"}})
    return out


def restore_point(state: State, host: str) -> dict[str, Any] | None:
    """What the audit log says about the table live now (epoch, fingerprint, commit), so the
    revert's line names the mapping it puts back, as `mtd history --mapping-at` needs."""
    try:
        entry = audit.live_at(auditlog.entries(state.audit_log), auditlog.now(), host)
    except MtdError:
        return None
    if entry is None or entry.get("result") == audit.DOWN:
        return None
    return {k: entry.get(k) for k in ("epoch", "fingerprint", "commit")}


@contextlib.contextmanager
def armed(state: State, backend: Backend, *, seconds: float, host: str) -> Iterator[dict[str, Any]]:
    """Around a change (the caller holds the reconcile lock): keep the table of before and
    start the watcher BEFORE the change, so that a command killed right after the kernel
    took it still gets reverted. If the change fails, the record is put back as it was."""
    if state.ownership == "ruleset":
        raise MtdError(
            "--confirm: ownership: ruleset flushes other tables, which a revert cannot put "
            "back: expected ownership: table"
        )
    path = record_path(state.epoch_file)
    before = read(path)
    rec: dict[str, Any] = {
        "token": os.urandom(16).hex(),  # as secrets.token_hex
        "armed": audit.timestamp(auditlog.now()),
        "deadline": time.time() + seconds,
        "seconds": seconds,
        "table": state.table,
        "host": host,
        "audit_log": str(state.audit_log),
        "epoch_file": str(state.epoch_file),
    }
    if before is not None and before.get("table") == state.table:
        # Extended: the restore point stays the last confirmed table.
        rec |= {k: before.get(k) for k in ("previous", "restore", "first_armed")}
    else:
        listing = backend.list_table(state.table)
        rec["previous"] = None if listing is None else without_handles(listing)
        rec["restore"] = restore_point(state, host) if listing is not None else None
        rec["first_armed"] = rec["armed"]
    _write(path, rec)
    try:
        rec["pid"] = spawn(path, rec["token"])
        _write(path, rec)  # the watcher's pid, for people (it matches the token, not the pid)
        yield rec
    except BaseException:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            _write(path, before)  # its own watcher still runs, on its token
        raise


def disarm(state: State, rec: dict[str, Any]) -> None:
    """Nothing changed and nothing was pending before: no revert to wait for."""
    path = record_path(state.epoch_file)
    current = read(path)
    if current is not None and current.get("token") == rec.get("token"):
        path.unlink(missing_ok=True)


def spawn(path: Path, token: str) -> int:
    """The watcher, detached: a new session (so no SIGHUP from the terminal, no signal to
    the caller's process group reaches it), no terminal, its standard files closed."""
    import reconciler

    # The package this process runs, wherever it was started from (cwd is / for the watcher).
    package = str(Path(reconciler.__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (package, os.environ.get("PYTHONPATH", "")) if p)
    import subprocess  # only when a revert is armed: not in every apply's start-up

    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler.services.confirm", str(path), token],
        env={**os.environ, "PYTHONPATH": pythonpath},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,
        cwd="/",
    )
    return proc.pid


def confirm(state: State) -> dict[str, Any] | None:
    """Cancel the pending revert (the caller holds the reconcile lock): its record, or None
    when nothing was pending."""
    path = record_path(state.epoch_file)
    rec = read(path)
    if rec is not None:
        path.unlink()
    return rec


def last_revert(state: State, host: str) -> dict[str, Any] | None:
    """The audit line of the last revert, when it is the last line of this host."""
    try:
        log = [e for e in auditlog.entries(state.audit_log) if e.get("host") == host]
    except MtdError:
        return None
    return log[-1] if log and log[-1].get("origin") == "revert" else None


def _owned(table: str, previous: Sequence[Any]) -> list[dict[str, Any]]:
    """The kept listing as commands, each checked to be inside `inet TABLE` (the record is
    mtd's own, but what goes into the kernel is checked, as every rendered command is)."""
    out = []
    for obj in previous:
        ok = isinstance(obj, dict) and len(obj) == 1
        if ok:
            ((kind, body),) = obj.items()
            ok = isinstance(body, dict) and body.get("family") == "inet"
            ok = ok and body.get("name" if kind == "table" else "table") == table
        if not ok:
            raise MtdError(
                f"{RECORD}: the kept table holds {str(obj)[:80]}: expected objects of table "
                f"inet {table} only: nothing reverted"
            )
        out.append({"add": obj})
    return out


def revert(rec: dict[str, Any], backend: Backend) -> dict[str, Any]:
    """Put the table of before back in one transaction, or remove the table when there was
    none; then the audit line. Returns that line."""
    table, previous = rec["table"], rec.get("previous")
    host = str(rec.get("host") or "")
    log = rec.get("audit_log") or str(Path(rec["epoch_file"]).with_name("audit.jsonl"))
    if previous is None:
        backend.delete_table(table)
        with contextlib.suppress(MtdError):
            files.restore_sysctls(files.sysctl_record(rec["epoch_file"]), SYSCTLS)
        return auditlog.record(
            log, host=host, origin="revert", epoch=None, result=audit.DOWN, fingerprint=None,
            table=table,
        )  # fmt: skip
    try:
        backend.replace_table(table, _owned(table, previous))
    except MtdError as exc:
        auditlog.record(
            log, host=host, origin="revert", epoch=None, result="rejected", fingerprint=None,
            error=f"revert of table inet {table} refused: {'; '.join(exc.problems)}", table=table,
        )  # fmt: skip
        raise
    restore = rec.get("restore") or {}
    return auditlog.record(
        log,
        host=host,
        origin="revert",
        epoch=restore.get("epoch"),
        result=REVERTED,
        fingerprint=restore.get("fingerprint"),
        commit=restore.get("commit"),
        table=table,
    )


def watch(path: Path, token: str, backend: Backend | None = None) -> int:
    """The watcher: wait for the deadline (or for its record to go: confirmed, or taken
    over by a later --confirm), then revert under the reconcile lock."""
    while True:
        rec = read(path)
        if rec is None or rec["token"] != token:
            return 0
        left = float(rec["deadline"]) - time.time()
        if left > 0:
            time.sleep(min(left, POLL))
            continue
        with files.reconcile_lock(rec["epoch_file"]):
            rec = read(path)  # `mtd confirm` may have run while we waited for the lock
            if rec is None or rec["token"] != token:
                return 0
            if backend is None:
                from reconciler.adapters.kernel import Nft

                backend = Nft()
            try:
                revert(rec, backend)
            except MtdError:
                return 1  # recorded in the audit log by revert()
            except Exception as exc:  # no terminal to tell: the audit log says it
                with contextlib.suppress(Exception):
                    auditlog.record(
                        rec.get("audit_log") or Path(rec["epoch_file"]).with_name("audit.jsonl"),
                        host=str(rec.get("host") or ""), origin="revert", epoch=None,
                        result="rejected", fingerprint=None, table=rec["table"],
                        error=f"revert failed: internal error: {type(exc).__name__}: {exc}",
                    )  # fmt: skip
                return 1
            finally:
                path.unlink(missing_ok=True)
        return 0


def main(argv: Sequence[str]) -> int:
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    if len(argv) != 2:
        return 2
    try:
        return watch(Path(argv[0]), argv[1])
    except MtdError:
        return 1


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main(sys.argv[1:]))
