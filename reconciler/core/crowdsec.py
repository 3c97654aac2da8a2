"""CrowdSec decisions as dynamic watch entries (origin `crowdsec`).

Pure. A decision comes from another program (the Local API's stream: `new` and `deleted`
lists), so it is data with a small vocabulary: a `ban` on an `Ip` or a `Range`, with a Go
duration. Each becomes the dynamic units mtd can express (an IPv4 address, an IPv6 /64),
at most `MAX_UNITS` for one decision; anything else is refused with one line.

The `Book` keeps the live decisions by id, so two decisions on one source end only when
both have: a source is watched until the latest of its decisions expires, and deleting one
decision never ends another's watch. What changes for the kernel is the difference between
the book's units before and after (`changes`): a decision seen again (a resync after the
Local API restarted or was away) changes nothing, so none is applied twice.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.core import watch
from reconciler.core.watch import WatchError

ORIGIN = "crowdsec"
TYPES = ("ban",)  # what mtd acts on; captcha, throttle... are other bouncers' business
SCOPES = ("ip", "range")
MAX_UNITS = 256  # sources (IPv4 addresses, IPv6 /64s) one decision may watch: a /24, a /56
MAX_DECISIONS = watch.MAX_ENTRIES  # in one response, and in the book
MAX_HELD = watch.MAX_ENTRIES  # sources all held decisions watch (what the store can hold)
MAX_VALUE = 64  # characters of a decision's value (an address or a prefix)
SAME = 2.0  # seconds within which an expiry is the same (a duration is read at each pull)
_GO_DURATION = re.compile(r"^(-?)((?:\d+(?:\.\d+)?(?:h|m|s|ms|us|µs|ns))+)$")
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_GO_UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}

Units = dict[str, tuple[float, str]]  # source -> (expires_at, reason)


@dataclass(frozen=True)
class Decision:
    """A ban mtd can express: its units and until when (capped as `mtd watch` caps)."""

    id: int
    units: tuple[str, ...]
    expires_at: float
    reason: str


def duration(text: Any) -> float:
    """A Go duration as the Local API writes it (`3h59m58.5s`, `-20ms`), in seconds."""
    m = _GO_DURATION.match(text) if isinstance(text, str) and len(text) <= 40 else None
    if m is None:
        raise WatchError(f"duration {_short(text)}: expected a Go duration such as 3h59m58s")
    value = sum(float(n) * _GO_UNITS[u] for n, u in _GO_PART.findall(m[2]))
    return -value if m[1] else value


def units(scope: str, value: str) -> tuple[str, ...]:
    """The dynamic units of an `Ip` or `Range` value; `WatchError` when mtd cannot express
    it (not an address, a range wider than `MAX_UNITS` sources). Each unit then passes
    `watch.canonical`, the gate of every other entrance: a unit the kernel would refuse
    (a zone kept by a range's network address) never reaches the fleet's watch hash."""
    if isinstance(value, str) and "%" in value:  # an `Ip`'s /64 would drop it silently
        watch.canonical(value)  # refuses it as `mtd watch` does
    found = _units(scope, value)
    try:
        return tuple(watch.canonical(u) for u in found)
    except WatchError as exc:
        raise WatchError(f"value {_short(value)}: {exc}") from None


def _units(scope: str, value: str) -> tuple[str, ...]:
    if not isinstance(value, str) or not value or len(value) > MAX_VALUE:
        raise WatchError(f"value {_short(value)}: expected an address or a prefix")
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise WatchError(f"{_short(value)}: expected an address or a prefix") from None
    if scope == "ip" and net.prefixlen != net.max_prefixlen:
        raise WatchError(f"{_short(value)}: scope Ip: expected one address")
    if net.version == 6 and isinstance(net, ipaddress.IPv6Network):
        mapped = net.network_address.ipv4_mapped
        if mapped is not None and net.prefixlen >= 96:  # how dual-stack sockets name IPv4
            net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)
    if net.version == 4:
        count = net.num_addresses
        if count > MAX_UNITS:
            raise WatchError(
                f"{value}: {count} addresses: mtd watches at most {MAX_UNITS} sources for one "
                f"decision (a /{32 - MAX_UNITS.bit_length() + 1} of IPv4)"
            )
        return tuple(str(a) for a in net)  # a range's every address, ends included
    if net.prefixlen >= watch.V6_UNIT:
        return (watch.unit_of(str(net.network_address)),)
    count = 1 << (watch.V6_UNIT - net.prefixlen)
    if count > MAX_UNITS:
        raise WatchError(
            f"{value}: {count} /64s: mtd watches at most {MAX_UNITS} sources for one decision "
            f"(a /{watch.V6_UNIT - MAX_UNITS.bit_length() + 1} of IPv6)"
        )
    return tuple(str(n.network_address) for n in net.subnets(new_prefix=watch.V6_UNIT))


def decision(item: Any, now: float) -> Decision | None:
    """One decision of the stream; None for one that has already expired. `WatchError` in
    one line (naming its id and value) for what mtd does not act on."""
    if not isinstance(item, dict):
        raise WatchError(f"decision {_short(item)}: expected an object")
    ident = item.get("id")
    if type(ident) is not int or ident < 0:
        raise WatchError(f"decision id {_short(ident)}: expected a whole number")
    what = f"decision {ident}"
    kind, scope = item.get("type"), item.get("scope")
    if not isinstance(kind, str) or kind.lower() not in TYPES:
        raise WatchError(f"{what}: type {_short(kind)}: mtd acts on ban decisions only")
    if not isinstance(scope, str) or scope.lower() not in SCOPES:
        raise WatchError(f"{what}: scope {_short(scope)}: expected Ip or Range")
    try:
        found = units(scope.lower(), item.get("value"))  # type: ignore[arg-type]
        left = duration(item.get("duration"))
    except WatchError as exc:
        raise WatchError(f"{what}: {exc}") from None
    if left < 1:
        return None
    left = min(left, watch.MAX_SECONDS)
    return Decision(ident, found, now + left, _reason(item))


def _reason(item: Mapping[str, Any]) -> str:
    """`crowdsec SCENARIO`, printable and cut to what a watch entry keeps."""
    scenario = item.get("scenario")
    text = scenario if isinstance(scenario, str) else ""
    text = "".join(c if c.isprintable() else "?" for c in text[: watch.MAX_REASON])
    return f"{ORIGIN} {text}".strip()[: watch.MAX_REASON]


@dataclass
class Book:
    """The live ban decisions by id (what the Local API said, minus what expired)."""

    decisions: dict[int, Decision] = field(default_factory=dict)
    held: int = 0  # units of all decisions (a source in two decisions counts twice)

    def units(self, now: float) -> Units:
        """Each watched unit with its latest expiry (and that decision's reason)."""
        out: Units = {}
        for d in self.decisions.values():
            if d.expires_at - now < 1:
                continue
            for u in d.units:
                if u not in out or out[u][0] < d.expires_at:
                    out[u] = (d.expires_at, d.reason)
        return out

    def full(self, items: Iterable[Any], now: float) -> list[str]:
        """Replace the book with a startup list; the problems, one line each."""
        self.decisions, self.held = {}, 0
        return self.delta(items, (), now)

    def delta(self, new: Iterable[Any], deleted: Iterable[Any], now: float) -> list[str]:
        """Deleted decisions go (by id), new ones come; the problems, one line each."""
        problems: list[str] = []
        for item in deleted:
            ident = item.get("id") if isinstance(item, dict) else None
            if type(ident) is int and ident in self.decisions:
                self.held -= len(self.decisions.pop(ident).units)
        for item in new:
            try:
                d = decision(item, now)
            except WatchError as exc:
                problems.append(str(exc))
                continue
            if d is None:
                continue
            if d.id not in self.decisions and len(self.decisions) >= MAX_DECISIONS:
                problems.append(f"decision {d.id}: {MAX_DECISIONS} decisions held: not added")
                continue
            old = self.decisions.get(d.id)
            held = self.held - (len(old.units) if old else 0)
            if held + len(d.units) > MAX_HELD:  # 100,000 /24 ranges would be 25 million
                problems.append(
                    f"decision {d.id}: {len(d.units)} more sources would pass the {MAX_HELD} "
                    "mtd watches: not added"
                )
                continue
            self.decisions[d.id] = d
            self.held = held + len(d.units)
        self.decisions = {i: d for i, d in self.decisions.items() if d.expires_at - now >= 1}
        self.held = sum(len(d.units) for d in self.decisions.values())
        return problems


def changes(
    before: Units, after: Units, now: float, trusted: Iterable[Any] = ()
) -> tuple[list[watch.Entry], list[str], list[str]]:
    """(entries to add, sources to remove, problems): what the kernel and the store need so
    that `before` becomes `after`. A unit whose expiry moved by less than `SAME` seconds is
    left alone; a unit inside a trusted prefix is never watched (one line says so)."""
    nets = list(trusted)
    add: list[watch.Entry] = []
    problems: list[str] = []
    for source, (expires, why) in sorted(after.items()):
        old = before.get(source)
        if old is not None and abs(old[0] - expires) < SAME:
            continue
        net = watch.trusted_over(source, nets)
        if net is not None:
            if old is None:
                problems.append(f"{source}: inside trusted {net}: not watched")
            continue
        add.append(watch.Entry(source, ORIGIN, why, expires))
    remove = sorted(s for s in before if s not in after)
    return add, remove, problems


def left(expires_at: float, now: float) -> int:
    """Whole seconds a unit has left (what a watch message carries)."""
    return max(0, min(watch.MAX_SECONDS, math.floor(expires_at - now)))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 42 else text[:40] + "..."
