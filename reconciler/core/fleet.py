"""Where each host of a fleet stands, from the heartbeat records its `mtd run` keeps in Redis.

Pure: takes the records (bytes, as read) and the fleet's epoch, returns one row per host and
an Ansible-like recap. Records are data anyone with Redis access could have written: each is
checked field by field, and a bad one is shown as `invalid`, never trusted or crashed on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler import defaults

STATUSES = ("ok", "changed", "behind", "rejected", "silent", "stopped")
CONVERGED = frozenset({"ok", "changed"})
MAX_RECORD = 4096  # bytes; a heartbeat is about 300
_FIELDS: dict[str, tuple[type, ...]] = {
    "host": (str,),
    "epoch": (int,),
    "fleet_epoch": (int,),
    "commit": (str, type(None)),
    "head": (str, type(None)),
    "pull_rejected": (bool,),
    "in_sync": (bool,),
    "result": (str, type(None)),
    "error": (str, type(None)),
    "version": (str,),
    "time": (int, float),
}


@dataclass(frozen=True)
class Row:
    host: str
    status: str  # one of STATUSES, or "invalid"
    record: dict[str, Any] = field(default_factory=dict)
    why: str = ""  # what makes it not converged, in a few words

    @property
    def converged(self) -> bool:
        return self.status in CONVERGED


def parse(raw: bytes | str | int | None) -> dict[str, Any]:
    """One heartbeat record; `ValueError` saying what is wrong with it. An int is a record
    the reader left in Redis: its size in bytes (-1: a key that is not a string)."""
    if raw is None:
        raise ValueError("no record")
    if isinstance(raw, int):
        what = "a key of another type" if raw < 0 else f"{raw} bytes"
        raise ValueError(f"{what}: expected a string of at most {MAX_RECORD} bytes")
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > MAX_RECORD:
        raise ValueError(f"{len(data)} bytes: expected at most {MAX_RECORD}")
    try:
        rec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not JSON: expected a heartbeat record of `mtd run`") from None
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object")
    for key, types in _FIELDS.items():
        value = rec.get(key)
        if type(value) not in types or (type(value) is int and value < 0):
            raise ValueError(f"{key} {clean(repr(value), 40)}: expected {_kind(types)}")
    if not 0 <= rec["time"] <= defaults.MAX_UNIX_SECONDS:  # NaN, infinity, an int no float holds
        raise ValueError(f"time {clean(repr(rec['time']), 40)}: expected unix seconds")
    stopped = rec.get("stopped", False)
    if type(stopped) is not bool:
        raise ValueError(f"stopped {clean(repr(stopped), 40)}: expected true or false")
    return {k: rec[k] for k in _FIELDS} | ({"stopped": True} if stopped else {})


def _kind(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer >= 0", float: "a number", bool: "true or false"}
    out = [names[t] for t in types if t in names]
    if type(None) in types:
        out.append("null")
    return " or ".join(out)


def classify(
    last: Mapping[str, bytes | int | None],
    live: Mapping[str, bytes | int | None],
    fleet_epoch: int,
) -> list[Row]:
    """One row per host ever seen: stopped when its daemon said so as it stopped on purpose
    (its live record gone); silent when its live record expired; else rejected (its
    last pass failed or its pull head was refused), behind (an older epoch, or not in sync),
    changed (its last pass changed the table) or ok."""
    rows = []
    for host in sorted(last):
        name = clean(host, 64)
        raw = live.get(host)
        silent = raw is None
        try:
            rec = parse(last[host] if silent else raw)
        except ValueError as exc:
            rows.append(Row(name, "invalid", {}, str(exc)))
            continue
        if rec["host"] != host:
            rows.append(Row(name, "invalid", {}, f"record names host {clean(rec['host'], 64)!r}"))
            continue
        rec["host"] = name
        if silent and rec.get("stopped"):
            rows.append(Row(name, "stopped", rec, "mtd run stopped on purpose"))
        elif silent:
            rows.append(Row(name, "silent", rec, "no heartbeat"))
        elif rec["result"] == "error" or rec["pull_rejected"]:
            why = "pull head rejected" if rec["pull_rejected"] else "last pass failed"
            rows.append(Row(name, "rejected", rec, why))
        elif rec["epoch"] < fleet_epoch:
            rows.append(Row(name, "behind", rec, f"epoch {rec['epoch']} < {fleet_epoch}"))
        elif not rec["in_sync"]:
            rows.append(Row(name, "behind", rec, "not in sync"))
        else:
            rows.append(Row(name, "changed" if rec["result"] == "changed" else "ok", rec))
    return rows


def recap(rows: list[Row]) -> dict[str, int]:
    out = {s: 0 for s in STATUSES}
    for row in rows:
        out[row.status] = out.get(row.status, 0) + 1
    return out


def converged(rows: list[Row]) -> bool:
    """Every host converged, and at least one reported (an empty fleet gates nothing)."""
    return bool(rows) and all(r.converged for r in rows)


def clean(text: str, limit: int = 200) -> str:
    """Printable, one line, bounded: a record cannot move the cursor or forge lines."""
    out = "".join(c if c.isprintable() else "?" for c in str(text))
    return out if len(out) <= limit else out[: limit - 3] + "..."


def table(rows: list[Row], fleet_epoch: int, now: float) -> list[str]:
    """The text form: a column per field, then the recap line; `now` (unix seconds) is the
    caller's, as every other time here: the core reads no clock."""
    head = ("HOST", "STATUS", "EPOCH", "COMMIT", "RESULT", "SEEN", "VERSION", "WHY")
    lines: list[tuple[str, ...]] = [head]
    for r in rows:
        rec = r.record
        seen = f"{max(0, now - rec['time']):.0f}s ago" if "time" in rec else "-"
        commit = (rec.get("commit") or "-")[:12]
        why = r.why
        if rec.get("error"):
            why = f"{why}: {rec['error']}" if why else rec["error"]
        lines.append(
            (
                r.host,
                r.status,
                str(rec.get("epoch", "-")),
                clean(commit, 12),
                clean(rec.get("result") or "-", 12),
                seen,
                clean(rec.get("version", "-"), 20),
                clean(why),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    out = [
        "  ".join([*(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)), line[-1]])
        for line in lines
    ]
    counts = recap(rows)
    text = " ".join(f"{k}={v}" for k, v in counts.items())
    out.append(f"recap: {text} (fleet epoch {fleet_epoch}, {len(rows)} hosts)")
    return [line.rstrip() for line in out]


def as_json(rows: list[Row], fleet_epoch: int) -> dict[str, Any]:
    return {
        "fleet_epoch": fleet_epoch,
        "converged": converged(rows),
        "recap": recap(rows),
        "hosts": [{**r.record, "host": r.host, "status": r.status, "why": r.why} for r in rows],
    }
