"""Dynamic watching: what a watch entry is, and how entries become render input.

Pure. A dynamic source is watched for a while (`mtd watch add`, a Redis watch message, the
kernel's tripwire) and then expires. Its unit is what one attacker holds: an IPv4 address,
or an IPv6 /64 (held as its network address, host bits zero, as the kernel's `dyn6` set
looks it up). Entries live in the kernel as elements of `dyn4`/`dyn6` with a timeout, and
in the store (`adapters.watchstore`), so a full table replacement (rotation, apply, repair)
re-adds them with their remaining time.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.errors import MtdError

ORIGINS = ("cli", "redis", "tripwire", "crowdsec")
SETS = {"4": "dyn4", "6": "dyn6"}  # the owned table's dynamic sets, by family
RUNTIME_SETS = frozenset(SETS.values())  # their contents are runtime state, never drift
V6_UNIT = 64  # an IPv6 source is watched by /64
DEFAULT_SECONDS = 3600  # `--for` when not given: an hour, fail2ban's usual bantime scale
MAX_SECONDS = 30 * 86400  # 30 days: far below the kernel's element timeout limit
MAX_ENTRIES = 100_000  # in the store (a flood of watch messages cannot grow it further)
MAX_REASON = 200  # characters of a reason kept
DURATION_FORM = "SECONDS or a number with s, m, h or d (3600, 10m, 1h, 2d)"
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhd]?)\s*$")

Dynamic = dict[str, list[tuple[str, int]]]  # render input: family -> [(source, seconds left)]


class WatchError(MtdError):
    """A watch entry or argument that is refused; `str()` is the one line to show."""


@dataclass(frozen=True)
class Entry:
    """One watched dynamic source. `expires_at` is unix time."""

    source: str  # canonical: an IPv4 address, or an IPv6 /64's network address
    origin: str  # cli | redis | tripwire | crowdsec
    reason: str
    expires_at: float

    @property
    def family(self) -> str:
        return family(self.source)

    def left(self, now: float) -> int:
        """Whole seconds left (0: expired), never more than `MAX_SECONDS` (an entry from a
        clock far ahead, or a kernel element added by hand, stays within the kernel's
        timeout range)."""
        return min(MAX_SECONDS, max(0, math.floor(self.expires_at - now)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "origin": self.origin,
            "reason": self.reason,
            "expires_at": round(self.expires_at, 3),
        }


def canonical(text: str, trusted: Iterable[Any] = ()) -> str:
    """The source a watch entry is about, or `WatchError` in one line.

    An IPv4 address (or /32); an IPv6 address or /64 prefix, kept as the /64's network
    address. A wider or narrower IPv6 prefix, or any IPv4 prefix, is refused: a dynamic
    entry is one attacker's unit. So is a zone (`%eth0`), which no set element holds: what
    comes back is the text libnftables takes and lists back. A source inside `trusted`
    (prefixes) is refused: trusted beats dynamic, so the entry would have no effect.
    """
    raw = str(text).strip()
    if not raw or len(raw) > 64:
        raise WatchError(f"{_short(raw)}: expected an IPv4 address or an IPv6 address or /64")
    addr, slash, length = raw.partition("/")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise WatchError(
            f"{_short(raw)}: not an address: expected an IPv4 address (192.0.2.7) or an IPv6 "
            "address or /64 (2001:db8:1:2::/64)"
        ) from None
    if ip.version == 6 and ip.scope_id is not None:
        # A zone names an interface of the host that wrote it; libnftables refuses it in a
        # set element, and one such element would fail every full replacement.
        raise WatchError(
            f"{_short(raw)}: an IPv6 zone (%ZONE) names a local interface: expected an "
            "address without one"
        )
    if ip.version == 6 and ip.ipv4_mapped is not None:
        if slash:  # its /64 is ::/64, which no packet comes from
            raise WatchError(
                f"{_short(raw)}: IPv4-mapped: expected its IPv4 address {ip.ipv4_mapped}"
            )
        # How a dual-stack socket names an IPv4 client (fail2ban reads it from such logs):
        # that IPv4 source, not the /64 ::/64, which no IPv4 packet ever comes from.
        ip = ip.ipv4_mapped
    if slash:
        want = 32 if ip.version == 4 else V6_UNIT
        if not length.isdigit() or int(length) != want:
            unit = "an IPv4 address (a /32)" if ip.version == 4 else "an IPv6 /64"
            raise WatchError(
                f"{_short(raw)}: a dynamic entry is one source: expected {unit}, not a prefix "
                "(watch prefixes with watched: in the desired state)"
            )
    if ip.version == 6:
        net = ipaddress.ip_network(f"{ip}/{V6_UNIT}", strict=False)
        source = str(net.network_address)
    else:
        source = str(ip)
    nets = [p if not isinstance(p, str) else ipaddress.ip_network(p) for p in trusted]
    net = trusted_over(source, nets)
    if net is not None:
        raise WatchError(f"{_short(raw)}: inside trusted {net}: would have no effect")
    return source


def trusted_over(source: str, nets: Iterable[Any]) -> Any:
    """The trusted prefix that holds all of `source`'s unit (an IPv4 address, an IPv6 /64),
    or None. Only then has an entry no effect: a trusted /80 or /128 inside a /64 leaves
    the rest of that /64 to watch (the kernel matches a dynamic /64 after trusted)."""
    ip = ipaddress.ip_address(source)
    unit = ipaddress.ip_network(f"{ip}/{32 if ip.version == 4 else V6_UNIT}", strict=False)
    return next((n for n in nets if n.version == unit.version and unit.subnet_of(n)), None)


def unit_of(address: str) -> str:
    """The dynamic unit an address belongs to: itself (IPv4), its /64's network address."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return str(ip)
    return str(ipaddress.ip_network(f"{ip}/{V6_UNIT}", strict=False).network_address)


def family(source: str) -> str:
    return "6" if ":" in source else "4"


def seconds(text: str | int) -> int:
    """`--for`: 3600, 10m, 1h, 2d; from 1 second to `MAX_SECONDS`."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _DURATION.match(str(text))
        if m is None:
            raise WatchError(f"--for {_short(str(text))}: expected {DURATION_FORM}")
        value = int(m[1]) * _UNITS[m[2]]
    if not 1 <= value <= MAX_SECONDS:
        raise WatchError(
            f"--for {_short(str(text))}: expected 1 second to {MAX_SECONDS // 86400} days"
        )
    return value


def capped(text: str) -> tuple[int, str]:
    """`--for` as an IDS gives it: a duration over `MAX_SECONDS` (fail2ban's
    `bantime.increment`), or -1 (its permanent ban), is the maximum, with the note to show;
    otherwise `seconds(text)` and no note. A ban is never lost for its length."""
    days = MAX_SECONDS // 86400
    if str(text).strip() == "-1":
        return MAX_SECONDS, f"--for -1 (a permanent ban): watched for {days} days, the maximum"
    m = _DURATION.match(str(text))
    if m is not None and int(m[1]) * _UNITS[m[2]] > MAX_SECONDS:
        return MAX_SECONDS, f"--for {_short(str(text))}: more than {days} days: watched for " + (
            f"{days} days, the maximum"
        )
    return seconds(text), ""


def reason(text: str | None) -> str:
    """Printable, one line, at most `MAX_REASON` characters; longer is refused (not cut, so
    what is listed is what was given)."""
    text = "" if text is None else str(text)
    if len(text) > MAX_REASON:
        raise WatchError(f"--reason: {len(text)} characters: expected at most {MAX_REASON}")
    if not text.isprintable():
        raise WatchError(f"--reason {_short(text)}: expected printable text on one line")
    return text


def live(entries: Mapping[str, Entry], now: float) -> dict[str, Entry]:
    """The entries not yet expired (with at least a second left)."""
    return {s: e for s, e in entries.items() if e.left(now) >= 1}


MAX_KERNEL = 65536  # elements of each of dyn4 and dyn6 (`render.MAX_DYNAMIC`)


def dynamic(entries: Mapping[str, Entry], now: float, limit: int = MAX_KERNEL) -> Dynamic:
    """Render input: every live entry with its remaining whole seconds, by family, at most
    `limit` a family (the kernel set's size: one more would fail the whole replacement).
    Over the limit, entries an operator or the fleet made (cli, redis) go before tripwire
    ones, then those with the most time left; the store keeps the rest."""
    by_family: dict[str, list[Entry]] = {"4": [], "6": []}
    for entry in live(entries, now).values():
        by_family[entry.family].append(entry)
    out: Dynamic = {"4": [], "6": []}
    for fam, items in by_family.items():
        if len(items) > limit:
            items.sort(key=lambda e: (e.origin == "tripwire", -e.expires_at, e.source))
            items = items[:limit]
        out[fam] = sorted((e.source, e.left(now)) for e in items)
    return out


def harvest(
    entries: Mapping[str, Entry], kernel: Mapping[str, int], now: float
) -> dict[str, Entry]:
    """Entries with those the kernel holds that the store does not (the tripwire adds them
    in the packet path): origin tripwire, expiring when the kernel's element does.
    `kernel` maps canonical source to seconds left. Expired entries are dropped."""
    out = dict(live(entries, now))
    for source, left in kernel.items():
        if source not in out and left >= 1:
            out[source] = Entry(source, "tripwire", "tripwire", now + left)
    return out


def counts(entries: Mapping[str, Entry], now: float) -> dict[str, int]:
    """Live entries by origin (every origin present, 0 when none)."""
    out = dict.fromkeys(ORIGINS, 0)
    for e in live(entries, now).values():
        out[e.origin] = out.get(e.origin, 0) + 1
    return out


def kernel_entries(elements: Iterable[Any]) -> dict[str, int]:
    """A dynamic set's listed elements as {canonical source: seconds left}: plain values
    (no timeout: kept a day, as written by hand) or `{"elem": {"val", "expires"}}`."""
    out: dict[str, int] = {}
    for item in elements:
        val, left = item, 86400
        if isinstance(item, dict) and isinstance(item.get("elem"), dict):
            val = item["elem"].get("val")
            exp = item["elem"].get("expires", item["elem"].get("timeout"))
            left = int(exp) if isinstance(exp, int | float) else left
        if not isinstance(val, str):
            continue
        try:
            source = canonical(val)
        except WatchError:
            continue
        out[source] = left
    return out


def element(source: str, left: int) -> dict[str, Any]:
    """One dynamic set element with its timeout (libnftables JSON)."""
    return {"elem": {"val": source, "timeout": int(left)}}


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


def commands(
    table: str, add: Iterable[tuple[str, int]] = (), remove: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """One small transaction in the owned table's dynamic sets, valid whether or not each
    element is there: every touched element is added (a no-op when present) and deleted,
    then the added ones are put back with their timeout (an `add` alone would keep an
    element's old timeout)."""
    add, remove = list(add), list(remove)
    touched: dict[str, list[str]] = {}
    for source in [s for s, _ in add] + remove:
        touched.setdefault(SETS[family(source)], []).append(source)

    def ref(name: str, elem: list[Any]) -> dict[str, Any]:
        return {"family": "inet", "table": table, "name": name, "elem": elem}

    batch: list[dict[str, Any]] = []
    for name, sources in sorted(touched.items()):
        batch.append({"add": {"element": ref(name, list(sources))}})
        batch.append({"delete": {"element": ref(name, list(sources))}})
    added: dict[str, list[Any]] = {}
    for source, left in add:
        added.setdefault(SETS[family(source)], []).append(element(source, left))
    for name, elems in sorted(added.items()):
        batch.append({"add": {"element": ref(name, elems)}})
    return batch
