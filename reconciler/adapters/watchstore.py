"""The dynamic watch store: `watch.json` next to the epoch file (mode 0600).

Written atomically (write, fsync, rename) under its own lock file, like the other state
files, so the CLI, the daemon and a pull round never lose each other's entries. It is what
lets dynamic entries survive a full table replacement, a daemon restart and a Redis restart:
the kernel's elements expire by themselves, the store says what to re-add and for how long.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reconciler import defaults
from reconciler.adapters import files
from reconciler.core import watch
from reconciler.core.watch import Entry
from reconciler.errors import MtdError
from reconciler.logs import LOGGER, event

NAME = "watch.json"
LOG = logging.getLogger(f"{LOGGER}.watch")
MAX_BYTES = 64 << 20  # a store of MAX_ENTRIES entries is about 20 MB


def path_for(epoch_file: str | Path) -> Path:
    return Path(epoch_file).with_name(NAME)


@contextlib.contextmanager
def locked(epoch_file: str | Path) -> Iterator[Path]:
    """The store's own lock (not the reconcile lock: a pass holding that one reads and
    writes the store too)."""
    p = path_for(epoch_file)
    with files.file_lock(p.with_name(f"{NAME}.lock")):
        yield p


def load(path: str | Path, dropped: list[str] | None = None) -> dict[str, Entry]:
    """The entries (expired ones too: callers drop them); {} when there is no store yet.

    An entry that is not canonical (a zone, a prefix, an unknown origin: an older mtd, or
    an edit by hand) costs that entry alone: it is left out with one line, appended to
    `dropped` when given (the caller rewrites the store without it), else logged. Only a
    store that is not mtd's format at all is refused whole."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise MtdError(f"{p}: cannot read the watch store: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise MtdError(f"{p}: watch store larger than {MAX_BYTES} bytes: expected mtd's own")
    try:
        data = json.loads(raw)
        items = data["entries"]
        if not isinstance(items, list):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise MtdError(
            f'{p}: unreadable watch store: expected {{"entries": [{{"source", "origin", '
            '"reason", "expires_at"}, ...]} (remove it to start afresh)'
        ) from None
    out: dict[str, Entry] = {}
    problems: list[str] = []
    for i, item in enumerate(items):
        try:
            e = _entry(item)
        except watch.WatchError as exc:
            problems.append(f"{p}: entry {i}: {exc}: dropped")
        except (ValueError, KeyError, TypeError):
            problems.append(f"{p}: entry {i}: {ENTRY_FORM}: dropped")
        else:
            out[e.source] = e
    if dropped is not None:
        dropped.extend(problems)
    else:
        report(problems)
    return out


ENTRY_FORM = (
    'expected {"source": ADDRESS, "origin": "cli"|"redis"|"tripwire", "reason": TEXT, '
    '"expires_at": UNIX_SECONDS}'
)
LOG_LINES = 5  # dropped entries logged one by one, then counted


def report(problems: list[str]) -> None:
    """Dropped entries in the log: a few lines, then one with the count of the rest."""
    for line in problems[:LOG_LINES]:
        event(LOG, logging.WARNING, "watch", line, error=line)
    if len(problems) > LOG_LINES:
        more = f"{len(problems) - LOG_LINES} more dropped watch entries"
        event(LOG, logging.WARNING, "watch", more, error=more)


def _entry(item: Any) -> Entry:
    if not isinstance(item, dict):
        raise TypeError
    origin, expires = item["origin"], item["expires_at"]
    if origin not in watch.ORIGINS or type(expires) not in (int, float):
        raise ValueError
    if not isinstance(item["source"], str):
        raise TypeError
    if not 0 <= expires <= defaults.MAX_UNIX_SECONDS:
        raise ValueError
    source = watch.canonical(item["source"])
    if source != item["source"]:
        raise watch.WatchError(f"{item['source']!r:.60}: expected its canonical form {source}")
    return Entry(source, origin, watch.reason(item["reason"]), float(expires))


def save(path: str | Path, entries: dict[str, Entry], now: float | None = None) -> None:
    """Write the live entries (expired ones are dropped here)."""
    now = time.time() if now is None else now
    kept = sorted(watch.live(entries, now).values(), key=lambda e: e.source)
    text = json.dumps({"entries": [e.as_dict() for e in kept]}, separators=(",", ":"))
    files.write_atomic(path, text + "\n", mode=0o600)


def put(entries: dict[str, Entry], entry: Entry, now: float) -> str | None:
    """Add or replace `entry`; the one line to show when the store is full (then nothing
    changes). A new entry for a source replaces the old one (its time and reason).

    A full store makes room for an operator's or the fleet's entry by dropping the
    tripwire entry with the least time left: a flood of trips (spoofed IPv4 sources and
    the /64s of one /48 are 131,072 entries, harvested at the next replacement) must not
    make `mtd watch add` (fail2ban's ban) fail for as long as the trips last."""
    if entry.source not in entries and len(watch.live(entries, now)) >= watch.MAX_ENTRIES:
        trips = [e for e in watch.live(entries, now).values() if e.origin == "tripwire"]
        if entry.origin != "tripwire" and trips:
            del entries[min(trips, key=lambda e: (e.expires_at, e.source)).source]
            entries[entry.source] = entry
            return None
        return (
            f"watch store full ({watch.MAX_ENTRIES} live entries): {entry.source} not added "
            "(wait for entries to expire, or remove some with mtd watch del)"
        )
    entries[entry.source] = entry
    return None


# Watch changes `mtd watch` made on this host alone because the fleet's Redis was down:
# `mtd run` publishes them once it is connected again (`unpublished` in the daemon).
UNPUBLISHED = "watch-unpublished.json"


def unpublished_path(epoch_file: str | Path) -> Path:
    return Path(epoch_file).with_name(UNPUBLISHED)


def keep_unpublished(epoch_file: str | Path, changes: list[dict[str, Any]]) -> None:
    """Add changes ({"op", "source", "reason", "expires_at"}) for the fleet, bounded: the
    newest `watch.MAX_ENTRIES` (one per source and op: a later change replaces one before)."""
    with locked(epoch_file):
        kept = {(c["op"], c["source"]): c for c in _unpublished(epoch_file)}
        for c in changes:
            other = ("del" if c["op"] == "add" else "add", c["source"])
            kept.pop(other, None)  # a del after an add (or the reverse): only the last counts
            kept[(c["op"], c["source"])] = c
        items = list(kept.values())[-watch.MAX_ENTRIES :]
        text = json.dumps({"changes": items}, separators=(",", ":"))
        files.write_atomic(unpublished_path(epoch_file), text + "\n", mode=0o600)


def take_unpublished(epoch_file: str | Path) -> list[dict[str, Any]]:
    """The kept changes, removed from the file (the caller keeps back what it could not
    publish); an unreadable file counts as none, and is removed."""
    with locked(epoch_file):
        out = _unpublished(epoch_file)
        with contextlib.suppress(FileNotFoundError):
            unpublished_path(epoch_file).unlink()
    return out


def _unpublished(epoch_file: str | Path) -> list[dict[str, Any]]:
    p = unpublished_path(epoch_file)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        data = json.loads(raw) if len(raw) <= MAX_BYTES else {}
        items = data.get("changes") if isinstance(data, dict) else None
    except (OSError, ValueError, RecursionError):
        return []
    out = []
    for item in items if isinstance(items, list) else []:
        try:
            if not isinstance(item, dict) or item.get("op") not in ("add", "del"):
                raise TypeError
            expires = item.get("expires_at", 0)
            if type(expires) not in (int, float) or not math.isfinite(expires):
                raise TypeError  # json reads Infinity and NaN too
            origin = item.get("origin", "redis")
            if origin not in ("redis", "crowdsec"):
                raise TypeError
            out.append(
                {
                    "op": item["op"],
                    "source": watch.canonical(item["source"]),
                    "reason": watch.reason(item.get("reason", "")),
                    "expires_at": float(expires),
                }
                | ({"origin": origin} if origin != "redis" else {})
            )
        except (KeyError, TypeError, watch.WatchError):
            continue
    return out
