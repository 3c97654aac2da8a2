"""The audit log: one JSON line per applied change, so "which mapping was live when" has an
answer.

Each line holds the time, host, commit, epoch, trigger origin, result and the mapping's keyed
fingerprint (`PortMap.fingerprint`): it proves which mapping was live without revealing it.
With the secret, `mapping_of` recomputes the mapping itself and the fingerprint confirms it.
The file is mode 0600.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler import shuffle
from reconciler.errors import MtdError
from reconciler.state import PROTOCOLS, State, Watched

ORIGINS = ("start", "redis", "pull", "drift", "manual")
# Results after which the recorded mapping is the live one ("ok": a commit applied that
# changed nothing in the table; "rejected" lines are kept for the record only).
LIVE = ("changed", "ok")


def now() -> datetime:
    return datetime.now(UTC)


def timestamp(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """ISO 8601 (`2024-05-01T12:00:00Z`; UTC when no zone is given) or `@UNIX_SECONDS`."""
    try:
        if text.startswith("@"):
            return datetime.fromtimestamp(float(text[1:]), UTC)
        when = datetime.fromisoformat(text)
    except ValueError:
        raise MtdError(
            f"{text!r}: expected a time such as 2024-05-01T12:00:00Z or @1714564800"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


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
) -> dict[str, Any]:
    """Append one line; the file and its directory are created private."""
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
    p = Path(path)
    line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
    try:
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, line)  # one write with O_APPEND: lines of concurrent writers never mix
        finally:
            os.close(fd)
    except OSError as exc:
        raise MtdError(f"{p}: cannot write the audit log: {exc.strerror}") from None
    return entry


def log_result(
    state: State, result: Any, *, origin: str, host: str, commit: str | None = None
) -> dict[str, Any]:
    """Record a reconcile `Result` in the state's audit log (call it after a change)."""
    return record(
        state.audit_log,
        host=host,
        origin=origin,
        epoch=result.epoch,
        result=result.status,
        fingerprint=result.fingerprint,
        commit=commit,
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


def live_at(
    log: Sequence[Mapping[str, Any]], when: datetime, host: str | None = None
) -> Mapping[str, Any] | None:
    """The entry whose mapping was live at `when`: the last applied one at or before it."""
    found = None
    for entry in log:
        if host is not None and entry.get("host") != host:
            continue
        if entry.get("result") in LIVE and parse_time(entry["time"]) <= when:
            found = entry
    return found


@dataclass(frozen=True)
class SourceView:
    """What one source saw: the watched entry covering it (None: real ports) and its moves."""

    watched: Watched | None
    moves: Mapping[str, Mapping[int, int]]
    fingerprint: str  # of the whole mapping, to compare with the audit line


def mapping_of(state: State, secret: bytes, epoch: int, source: str) -> SourceView:
    """The mapping `source` saw at `epoch`: that of the most specific watched entry covering
    it, as the ruleset does."""
    try:
        addr = ipaddress.ip_network(source, strict=False)
    except ValueError:
        raise MtdError(
            f"--source {source!r}: expected an IPv4/IPv6 address such as 192.0.2.3"
        ) from None
    portmap = shuffle.compute(state, secret, epoch)
    covering = [
        w
        for w in state.watched
        if w.source.version == addr.version and addr.subnet_of(w.source)  # type: ignore[arg-type]
    ]
    if not covering:
        return SourceView(None, {}, portmap.fingerprint(secret))
    w = max(covering, key=lambda w: w.source.prefixlen)
    moves = {p: dict(portmap.moves.get((w.label, p), {})) for p in PROTOCOLS}
    return SourceView(w, moves, portmap.fingerprint(secret))


def line(entry: Mapping[str, Any]) -> str:
    """One history line: time host origin commit epoch result fingerprint."""
    commit = (entry.get("commit") or "-")[:12]
    epoch = entry.get("epoch")
    text = (
        f"{entry.get('time')}  {entry.get('host', '-')}  {entry.get('origin', '-'):<6}  "
        f"{commit:<12}  epoch {'-' if epoch is None else epoch}  {entry.get('result', '-')}"
        f"  {entry.get('fingerprint') or '-'}"
    )
    return text + (f"  {entry['error']}" if entry.get("error") else "")
