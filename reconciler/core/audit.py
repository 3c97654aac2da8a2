"""The audit log: one JSON line per applied change, so "which mapping was live when" has an
answer.

Each line holds the time, host, commit, epoch, trigger origin, result and the mapping's keyed
fingerprint (`PortMap.fingerprint`): it proves which mapping was live without revealing it.
With the secret, `mapping_of` recomputes the mapping itself and the fingerprint confirms it.
The file (written by `adapters.auditlog`) is mode 0600.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from reconciler.core import bucket, shuffle, watch
from reconciler.core.state import PROTOCOLS, State, Watched, ipv4_mapped
from reconciler.errors import MtdError

ORIGINS = ("start", "redis", "pull", "drift", "manual", "revert")
# Results after which the recorded mapping is the live one ("ok": a commit applied that
# changed nothing in the table; "reverted": `mtd apply --confirm` put the table of before
# back, with that table's epoch and fingerprint; "rejected" lines are kept for the record).
LIVE = ("changed", "ok", "reverted")
# The owned table was removed on purpose (`mtd down`, `mtd run --down-on-exit`): from then
# on, until the next live entry, every source saw the real ports.
DOWN = "down"


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


def live_at(
    log: Sequence[Mapping[str, Any]], when: datetime, host: str | None = None
) -> Mapping[str, Any] | None:
    """The entry that decided what was live at `when`: the last applied one (or removal of
    the table, result `down`) at or before it."""
    found = None
    for entry in log:
        if host is not None and entry.get("host") != host:
            continue
        if entry.get("result") in (*LIVE, DOWN) and parse_time(entry["time"]) <= when:
            found = entry
    return found


def next_within(
    log: Sequence[Mapping[str, Any]], when: datetime, seconds: float, host: str | None = None
) -> Mapping[str, Any] | None:
    """The first change after `when` but within `seconds` of it: a time given to the whole
    second may stand for a moment after that change."""
    for entry in log:
        if host is not None and entry.get("host") != host:
            continue
        if entry.get("result") in (*LIVE, DOWN):
            t = parse_time(entry["time"])
            if when < t < when + timedelta(seconds=seconds):
                return entry
    return None


@dataclass(frozen=True)
class SourceView:
    """What one source saw: the watched entry covering it (None: real ports, or a dynamic
    source), its moves, and the bucket when the moves are a bucket's (per_source, dynamic)."""

    watched: Watched | None
    moves: Mapping[str, Mapping[int, int]]
    fingerprint: str  # of the whole mapping, to compare with the audit line
    bucket: int | None = None
    trusted: bool = False


def mapping_of(
    state: State, secret: bytes, epoch: int, source: str, dynamic: Collection[str] = ()
) -> SourceView:
    """The mapping `source` saw at `epoch`, with the ruleset's precedence: trusted (real
    ports), the most specific watched entry covering it (a per_source one: its bucket), a
    dynamic source (`dynamic`: canonical sources, `core.watch.canonical`): its bucket."""
    try:
        addr = ipaddress.ip_network(source, strict=False)
    except ValueError:
        raise MtdError(
            f"--source {source!r}: expected an IPv4/IPv6 address such as 192.0.2.3"
        ) from None
    addr = ipv4_mapped(addr) or addr  # a dual-stack log's IPv4 client: that IPv4 source
    portmap = shuffle.compute(state, secret, epoch)
    print_ = portmap.fingerprint(secret)
    if state.is_trusted(addr):
        return SourceView(None, {}, print_, trusted=True)
    w = state.covering(addr)
    if w is None or w.per_source:
        unit = watch.unit_of(str(addr.network_address))
        if (w is None and unit not in dynamic) or not portmap.buckets:
            return SourceView(None, {}, print_)
        k = bucket.of(addr.network_address, portmap.seed, state.bucket_count)
        moves = {p: dict(m) for p, m in portmap.buckets[k].items()}
        return SourceView(w, moves, print_, bucket=k)
    moves = {p: dict(portmap.moves.get((w.label, p), {})) for p in PROTOCOLS}
    return SourceView(w, moves, print_)


COLUMNS = ("TIME", "HOST", "ORIGIN", "COMMIT", "EPOCH", "RESULT", "FINGERPRINT")


def table(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """`mtd history`: a header, then one aligned row per entry (an error at the end)."""
    rows = [COLUMNS] + [_cells(e) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    out = []
    for row, entry in zip(rows, [None, *entries], strict=True):
        text = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
        if entry is not None and entry.get("error"):
            text += f"  {entry['error']}"
        out.append(text.rstrip())
    return out


def _cells(entry: Mapping[str, Any]) -> tuple[str, ...]:
    epoch = entry.get("epoch")
    return (
        str(entry.get("time")),
        str(entry.get("host") or "-"),
        str(entry.get("origin") or "-"),
        (entry.get("commit") or "-")[:12],
        "-" if epoch is None else str(epoch),
        str(entry.get("result") or "-"),
        str(entry.get("fingerprint") or "-"),
    )
