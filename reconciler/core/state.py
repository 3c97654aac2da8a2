"""Desired state: parse YAML documents, validate them, and build the immutable model.

Pure: takes (file name, text) pairs and returns a `State` or raises `StateError` whose lines
name the file, line, key path and what was expected.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path as FilePath
from pathlib import PurePath
from typing import Any

from reconciler import __version__, defaults
from reconciler.core.addresses import Network, ipv4_mapped, parse_network, plain
from reconciler.core.bucket import DEFAULT_BUCKETS
from reconciler.core.bulk import gc_paused
from reconciler.core.documents import _check_events, _yaml, load, merge  # noqa: F401
from reconciler.core.locate import (  # noqa: F401 (`state.key_path`, `state.limited`)
    MAX_PROBLEMS,
    _Locator,
    _schema_message,
    key_path,
    limited,
)
from reconciler.errors import StateError

PROTOCOLS = ("tcp", "udp")
STATE_DIR = str(defaults.STATE_DIR)  # where mtd keeps its own files unless told otherwise
DEFAULTS: dict[str, Any] = defaults.STATE
# Keys only the host itself may set (its local configuration, or a local `-s` file): every
# path mtd reads or writes, and whatever acts beyond the mapping inside the owned table.
# A state from a repository may set only the fleet's desired state (the other keys).
HOST_LOCAL = (
    "table",
    "ownership",
    "mark",
    "secret_file",
    "epoch_file",
    "audit_log",
    "drift_interval",
    "redis",
    "repository_templates",
    "crowdsec",
)
REDIS_DEFAULTS: dict[str, Any] = defaults.REDIS

_NO_IGNORE: Mapping[str, frozenset[int]] = {p: frozenset() for p in PROTOCOLS}
Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Watched:
    """One untrusted source (an address or a prefix) and the ports that never move for it."""

    source: Network
    ignore: Mapping[str, frozenset[int]]
    index: int
    per_source: bool = False  # each address (IPv6: /64) inside gets a bucket mapping

    @property
    def is_host(self) -> bool:
        return self.source.prefixlen == self.source.max_prefixlen

    @cached_property  # asked for once per port and direction of a million-element map
    def label(self) -> str:
        """The canonical text of the source: an address for hosts, a prefix otherwise."""
        return str(self.source.network_address) if self.is_host else str(self.source)


@dataclass(frozen=True)
class State:
    """The validated desired state; `doc` is the merged document with defaults filled in."""

    table: str
    template: str
    ownership: str
    secret_file: str
    epoch_file: str
    mark: int
    port_range: tuple[int, int]
    services: Mapping[str, tuple[int, ...]]
    watched: tuple[Watched, ...]
    redis: Mapping[str, Any]
    drift_interval: float
    audit_log: str
    doc: Mapping[str, Any] = field(repr=False)
    trusted: tuple[Network, ...] = ()
    buckets: int = DEFAULT_BUCKETS
    tripwire: Tripwire | None = None
    # ports.fixed: never moved for any source, never a target. Every entry's `ignore` (and
    # so the buckets') already holds them, so what moves needs no second rule.
    fixed: Mapping[str, frozenset[int]] = field(default_factory=lambda: _NO_IGNORE)
    buckets_written: bool = False  # the state sets `buckets` itself (not the default)

    @cached_property
    def bucket_ignore(self) -> Mapping[str, frozenset[int]]:
        """The ports the bucket mappings leave in place: the per_source entries' shared
        ignore list (validated equal), `ports.fixed` alone when no entry is per_source."""
        first = next((w for w in self.watched if w.per_source), None)
        return first.ignore if first is not None else self.fixed

    def bucket_ports(self, proto: str) -> list[int]:
        """Service ports of `proto` the bucket mappings move."""
        return [p for p in self.services[proto] if p not in self.bucket_ignore[proto]]

    @cached_property
    def bucket_count(self) -> int:
        """The buckets the ruleset holds: `buckets` when an entry is per_source or the state
        sets it, else one that every dynamic (and tripped) source shares. A bucket costs 16
        rules; the default 16 are for per_source entries, whose sources would otherwise
        all share one view."""
        if self.buckets_written or any(w.per_source for w in self.watched):
            return self.buckets
        return 1

    @property
    def has_buckets(self) -> bool:
        """Whether the template renders bucket mappings (for per_source entries and dynamic
        sources): every template that supports per_source entries does."""
        from reconciler.core.templates import support

        return "per_source" in support(self.template).features

    @property
    def repository_templates(self) -> bool:
        """Whether the host's configuration allows templates kept in the state repository
        (docs/security.md): host-local, so never a repository's say."""
        return self.doc.get("repository_templates") is True

    def is_trusted(self, addr: Network) -> bool:
        return any(
            t.version == addr.version and addr.subnet_of(t)  # type: ignore[arg-type]
            for t in self.trusted
        )

    # What the schema checked (`schema_key`): a command that writes records it as accepted.
    schema_key: str = field(default="", repr=False, compare=False)
    # The documents as parsed, {name: data} in JSON, when YAML parsed them and JSON keeps
    # them as they are ("" otherwise): what a command that writes keeps for the next one.
    parsed_json: str = field(default="", repr=False, compare=False)
    parsed_key: str = field(default="", repr=False, compare=False)  # what `parsed_json` is of

    def moved_ports(self, watched: Watched, proto: str) -> list[int]:
        """Service ports of `proto` that move for this source (services minus its ignore list)."""
        return [p for p in self.services[proto] if p not in watched.ignore[proto]]

    @cached_property
    def most_specific_first(self) -> list[Watched]:
        """Overlapping sources: the most specific wins. Longer prefixes (addresses) first,
        then the order written; the one definition render and the audit both use."""
        return sorted(self.watched, key=lambda w: (-w.source.prefixlen, w.index))

    def covering(self, addr: Network) -> Watched | None:
        """The watched entry whose mapping `addr` gets: the most specific one covering it."""
        for w in self.most_specific_first:
            if w.source.version == addr.version and addr.subnet_of(w.source):  # type: ignore[arg-type]
                return w
        return None

    def free_ports(self, proto: str) -> FreePorts:
        """Ports of the range no service of `proto` uses, fixed ones aside: the targets of a
        template that writes swaps (`Support.swaps`), and what the capacity check counts."""
        return FreePorts(*self.port_range, (*self.services[proto], *self.fixed[proto]))

    def target_ports(self, proto: str, ignore: frozenset[int]) -> FreePorts:
        """Ports of the range a service of `proto` may be shown at, for a source that keeps
        `ignore` in place: every other port, service ports included (a service port that is
        never a target would be named by its absence from every view)."""
        return FreePorts(*self.port_range, (*ignore, *self.fixed[proto]))


@dataclass(frozen=True)
class Tripwire:
    """Ports that make an unlisted source watched (dynamically, for `seconds`)."""

    ports: Mapping[str, tuple[int, ...]]
    seconds: int


class FreePorts(Sequence[int]):
    """The range minus the service ports, one index at a time: a pass reads a few ports per
    source, and listing 60,000 of them would be most of a small pass."""

    def __init__(self, lo: int, hi: int, taken: Iterable[int]) -> None:
        self._lo = lo
        ordered = sorted({p for p in taken if lo <= p <= hi})
        # The number of free ports below each taken one (non-decreasing): the i-th free port
        # is lo + i + (taken ports at or below it), found by bisection, O(log n) a lookup
        # (a scan of every service port made a draw quadratic: 30,000 services from a
        # commit took minutes per source or bucket).
        self._free_below = [p - lo - j for j, p in enumerate(ordered)]
        self._len = hi - lo + 1 - len(ordered)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> int:  # type: ignore[override]
        if not 0 <= i < self._len:
            raise IndexError(i)
        return self._lo + i + bisect.bisect_right(self._free_below, i)


@cache
def schema_text() -> str:
    """The JSON Schema shipped in the package, as written (next to this module)."""
    return FilePath(__file__).with_name("schema.json").read_text(encoding="utf-8")


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema shipped in the package (also what `mtd schema` prints)."""
    return json.loads(schema_text())


# The keys (`schema_key`) of the documents the schema accepted before: a cache the caller
# chose (`core.caches.Verdicts`), asked `key in accepted`.
Accepted = Container[str]


def schema_key(doc: Mapping[str, Any]) -> str:
    """What a schema verdict depends on: mtd's version, the schema and the document the
    schema checks. `repr` tells apart what JSON would merge (1, 1.0, True, "1")."""
    text = f"{__version__}\0{schema_text()}\0{doc!r}"
    return hashlib.sha256(text.encode()).hexdigest()


@cache
def merged_schema() -> dict[str, Any]:
    """The schema of the merged state: that of one file, plus what the files must provide
    between them (each file alone may leave it to another)."""
    out = json.loads(json.dumps(schema()))
    out["required"] = ["ports"]
    out["properties"]["ports"]["required"] = ["range", "services"]
    return out


# Bounds of one state file, generous for real states (100,000 watched sources are about
# 3 MB, 400,000 YAML events and 4 levels deep) and small enough that a hostile document
# fails in well under a second instead of exhausting memory or the C stack.
MAX_DOCUMENT_BYTES = 64 << 20


@gc_paused()
def load_yaml(name: str, text: str) -> dict[str, Any]:
    """One YAML document as a mapping; an empty file is an empty mapping.

    The document is bounded first (size, nesting depth, expanded size of aliases) and a key
    written twice in one mapping is an error: YAML would silently keep the last one.
    """
    if len(text) > MAX_DOCUMENT_BYTES:
        raise StateError(
            f"{name}: {len(text)} characters: expected at most {MAX_DOCUMENT_BYTES} in a state file"
        )
    return load(name, text)


@dataclass(frozen=True)
class Local:
    """What the host itself says: its configuration documents (trusted, host-local keys
    only), where mtd keeps its files, and whether the state documents come from a
    repository (then they may not set a host-local key)."""

    documents: Sequence[tuple[str, str]] = ()
    state_dir: str = STATE_DIR
    untrusted: bool = False
    forbidden: Sequence[str] = ()  # directories no host-local path may point into (the clone)


def parse(
    documents: Sequence[tuple[str, str]],
    local: Local | None = None,
    accepted: Accepted | None = None,
    known: Mapping[str, dict[str, Any]] | None = None,
) -> State:
    """Merge documents in the given order, validate the result and build the `State`.

    `known`: every document (the host's configuration's too) by name, as `load_yaml` parsed
    these very texts before (the caller's cache, keyed by the texts): YAML is then neither
    imported nor run. Everything after parsing is checked as always.
    """
    if not documents:
        raise StateError("no desired state: expected at least one YAML file")
    local = local or Local()
    if known is not None and all(name in known for name, _ in [*documents, *local.documents]):
        parsed = [(name, known[name]) for name, _ in documents]
        configs = [(name, known[name]) for name, _ in local.documents]
        return build(parsed, dict(documents), local, accepted, configs)
    parsed = [(name, load_yaml(name, text)) for name, text in documents]
    configs = [(name, load_yaml(name, text)) for name, text in local.documents]
    kept = _as_json({name: data for name, data in [*configs, *parsed]})
    state = build(parsed, dict(documents), local, accepted, configs)
    return dataclasses.replace(state, parsed_json=kept)


def _as_json(documents: dict[str, Any]) -> str:
    """The parsed documents in JSON, if JSON gives them back as they are (not a date, not a
    number as a key...), else "". Taken before `build`, which must not see them changed."""
    try:
        text = json.dumps(documents)
    except (TypeError, ValueError):
        return ""
    return text if repr(json.loads(text)) == repr(documents) else ""


@gc_paused()
def build(
    parsed: Sequence[tuple[str, dict[str, Any]]],
    texts: Mapping[str, str],
    local: Local | None = None,
    accepted: Accepted | None = None,
    configs: Sequence[tuple[str, dict[str, Any]]] | None = None,
) -> State:
    """Validate merged, already-loaded documents; `texts` lets errors point at a line.

    The host's configuration is merged first, so a local state file may still override it;
    a state from a repository may not set a host-local key at all. `accepted` says whether
    the schema accepted this very document before: then jsonschema (most of a short
    command's start-up) is neither imported nor run. The checks in Python always run.
    """
    local = local or Local()
    if configs is None:  # the host's configuration, parsed here unless the caller did
        configs = [(name, load_yaml(name, text)) for name, text in local.documents]
    texts = {**texts, **dict(local.documents)}
    _check_origin(configs, parsed, texts, local)
    parsed = [*configs, *parsed]
    doc: dict[str, Any] = {}
    for _, data in parsed:
        doc = merge(doc, data)
    locate = _Locator(parsed, texts)
    checked, others = _schema_input(doc)
    key = schema_key(checked)
    if accepted is None or key not in accepted:
        errors = _schema_errors(checked, others)
        if errors:
            first = [locate(path, message) for path, message in errors[:MAX_PROBLEMS]]
            raise limited(first, more=len(errors) - len(first))
    return _semantic(doc, locate, local, key)


def _check_origin(
    configs: Sequence[tuple[str, dict[str, Any]]],
    parsed: Sequence[tuple[str, dict[str, Any]]],
    texts: Mapping[str, str],
    local: Local,
) -> None:
    """Host-local keys only in the host's configuration; none from a repository."""
    problems = []
    for name, data in configs:
        problems += [
            _Locator([(name, data)], texts)(
                [key],
                "not a host setting: expected only "
                f"{', '.join(HOST_LOCAL)} in the local configuration",
            )
            for key in data
            if key not in HOST_LOCAL
        ]
    if local.untrusted:
        for name, data in parsed:
            problems += [
                _Locator([(name, data)], texts)(
                    [key],
                    "a host-local setting: expected it only in the host's local configuration "
                    "(--config), never in the repository",
                )
                for key in data
                if key in HOST_LOCAL
            ]
    if problems:
        raise limited(problems)


def _schema_input(doc: dict[str, Any]) -> tuple[dict[str, Any], list[int] | None]:
    """What the schema has to check, and the indexes of the watched entries kept.

    jsonschema takes seconds over 100k watched entries. An entry of the common shape (a
    `source` text, maybe a `comment`) is valid by construction, so only the other entries
    are validated, and their errors keep the entry's own index.
    """
    watched = doc.get("watched")
    if not isinstance(watched, list):
        return doc, None
    others = [i for i, entry in enumerate(watched) if not _plain_entry(entry)]
    return {**doc, "watched": [watched[i] for i in others]}, others


def _schema_errors(
    doc: dict[str, Any], others: list[int] | None
) -> list[tuple[list[str | int], str]]:
    """(key path, message) of each schema error in `_schema_input`'s document, sorted by
    path; `others` maps its watched entries back to their own index."""
    import jsonschema

    out = []
    for e in jsonschema.Draft202012Validator(merged_schema()).iter_errors(doc):
        path = list(e.absolute_path)
        if others is not None and path[:1] == ["watched"] and len(path) > 1:
            path[1] = others[int(path[1])]
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            # Point at the unknown key itself, so the error names the file that has it.
            allowed = e.schema.get("properties", {})
            path.append(next(k for k in e.instance if k not in allowed))
            out.append((path, f"unknown key: expected one of {', '.join(sorted(allowed))}"))
            continue
        out.append((path, _schema_message(e)))
    return sorted(out, key=lambda error: error[0])


def _plain_entry(entry: Any) -> bool:
    return (
        type(entry) is dict
        and type(entry.get("source")) is str
        and entry["source"] != ""
        and entry.keys() <= {"source", "comment"}
        and type(entry.get("comment", "")) is str
    )


def _semantic(doc: dict[str, Any], locate: _Locator, local: Local, key: str = "") -> State:
    problems: list[str] = []
    if "hosts" in doc:  # allowed by the schema for the group files of an inventory only
        raise StateError(
            locate(
                ["hosts"],
                "only groups/*.yaml files of an inventory (a directory with groups/ or "
                "hosts/) list hosts: expected no hosts key here",
            )
        )
    full = merge(DEFAULTS, doc)
    secret_file = full.get("secret_file") or str(PurePath(local.state_dir, "secret"))
    lo, hi = doc["ports"]["range"]
    if lo > hi:
        problems.append(
            locate(["ports", "range"], f"[{lo}, {hi}]: expected [low, high] with low <= high")
        )
    services = {p: tuple(sorted(doc["ports"]["services"].get(p, []))) for p in PROTOCOLS}
    given_fixed = doc["ports"].get("fixed") or {}
    fixed = {p: frozenset(given_fixed.get(p, [])) for p in PROTOCOLS}
    with_fixed: dict[tuple[frozenset[int], ...], Mapping[str, frozenset[int]]] = {}
    if any(fixed.values()):
        with_fixed[tuple(_NO_IGNORE[p] for p in PROTOCOLS)] = {p: fixed[p] for p in PROTOCOLS}
    watched: list[Watched] = []
    seen: dict[Network, int] = {}
    for i, entry in enumerate(doc.get("watched") or []):
        text = entry["source"]
        net = _source(
            text, ["watched", i, "source"], "192.0.2.3 or 2001:db8::/48", locate, problems
        )
        if net is None:
            continue
        if net in seen:
            problems.append(
                locate(
                    ["watched", i, "source"],
                    f"{text!r} is already watched[{seen[net]}]: expected each source once",
                )
            )
            continue
        seen[net] = i
        given = entry.get("ignore")
        ignore = {p: frozenset(given.get(p, [])) for p in PROTOCOLS} if given else _NO_IGNORE
        for proto in PROTOCOLS if given else ():
            stray = sorted(ignore[proto] - set(services[proto]))
            if stray:
                problems.append(
                    locate(
                        ["watched", i, "ignore", proto],
                        f"{stray} not in ports.services.{proto}: expected service ports only",
                    )
                )
        if with_fixed:  # one shared mapping per distinct list: 100k entries, a few lists
            k = tuple(ignore[p] for p in PROTOCOLS)
            ignore = with_fixed.get(k) or with_fixed.setdefault(
                k, {p: ignore[p] | fixed[p] for p in PROTOCOLS}
            )
        watched.append(
            Watched(source=net, ignore=ignore, index=i, per_source=bool(entry.get("per_source")))
        )
    problems += _per_source_problems(watched, locate)
    trusted = _trusted(doc.get("trusted") or [], locate, problems)
    tripwire = _tripwire(doc.get("tripwire"), services, locate, problems, fixed)
    # Every default filled in, derived ones included: templates see it as `state`.
    full["secret_file"] = secret_file
    full["epoch_file"] = full.get("epoch_file") or str(PurePath(secret_file).with_name("epoch"))
    full["audit_log"] = full.get("audit_log") or str(PurePath(secret_file).with_name("audit.jsonl"))
    full["redis"] = merge(REDIS_DEFAULTS, doc.get("redis") or {})
    full.setdefault("watched", [])
    full.setdefault("trusted", [])
    buckets_written = "buckets" in full
    full.setdefault("buckets", DEFAULT_BUCKETS)
    full.setdefault("tripwire", None)  # none: no port trips
    if tripwire is not None:  # `for: 1h` is 3600 to templates too
        full["tripwire"] = {**full["tripwire"], "for": tripwire.seconds}
    full.setdefault("crowdsec", None)  # none: no CrowdSec Local API followed
    full["ports"] = {
        **full["ports"],
        "services": {**{p: [] for p in PROTOCOLS}, **full["ports"]["services"]},
        "fixed": {**{p: [] for p in PROTOCOLS}, **(full["ports"].get("fixed") or {})},
    }
    state = State(
        table=full["table"],
        template=full["template"],
        ownership=full["ownership"],
        secret_file=full["secret_file"],
        epoch_file=full["epoch_file"],
        mark=full["mark"],
        port_range=(lo, hi),
        services=services,
        watched=tuple(watched),
        redis=full["redis"],
        drift_interval=float(full["drift_interval"]),
        audit_log=full["audit_log"],
        doc=full,
        trusted=trusted,
        buckets=int(full.get("buckets", DEFAULT_BUCKETS)),
        tripwire=tripwire,
        fixed=fixed if any(fixed.values()) else _NO_IGNORE,
        buckets_written=buckets_written,
        schema_key=key,
    )
    problems += _forbidden_paths(state, local, locate)
    if not problems:
        problems += _capacity_problems(state, locate)
        problems += _template_problems(state, locate)
    if problems:
        raise limited(problems)
    return state


def _per_source_problems(watched: Sequence[Watched], locate: _Locator) -> list[str]:
    """All per_source entries share one set of bucket maps: their ignore lists must match."""
    shared = [w for w in watched if w.per_source]
    out = []
    for w in shared[1:]:
        if w.ignore != shared[0].ignore:
            out.append(
                locate(
                    ["watched", w.index, "ignore"]
                    if w.ignore != _NO_IGNORE
                    else ["watched", w.index, "per_source"],
                    f"{w.label}: ignore {_ignore_text(w.ignore)} differs from watched"
                    f"[{shared[0].index}] ({shared[0].label}: {_ignore_text(shared[0].ignore)}): "
                    "expected one ignore list for every per_source entry (they share the "
                    "bucket mappings)",
                )
            )
    return out


def _ignore_text(ignore: Mapping[str, frozenset[int]]) -> str:
    parts = [f"{p}: {sorted(ignore[p])}" for p in PROTOCOLS if ignore[p]]
    return "{" + ", ".join(parts) + "}"


def _source(
    text: str, path: list[str | int], example: str, locate: _Locator, problems: list[str]
) -> Network | None:
    """An address or a prefix without host bits; None (and one problem) otherwise."""
    try:
        net = parse_network(text)
    except ValueError as exc:
        hint = "has host bits set" if "host bits" in str(exc) else "is not an address"
        problems.append(
            locate(
                path,
                f"{text!r} {hint}: expected an IPv4/IPv6 address or a CIDR prefix such as "
                f"{example}",
            )
        )
        return None
    if net.version == 6 and net.network_address.scope_id is not None:  # type: ignore[union-attr]
        # A zone names an interface of the host that wrote it: libnftables refuses it in a
        # set, so `validate` said ok to a commit every host's kernel then refused.
        problems.append(
            locate(
                path,
                f"{text!r} has an IPv6 zone (%ZONE), which names a local interface: expected "
                "an address or prefix without one",
            )
        )
        return None
    v4 = ipv4_mapped(net)
    if v4 is not None:
        # Taken as written, the entry would silently hide nothing (watched) or exempt no
        # one (trusted): an IPv4 client sends IPv4 packets, which an ip6 match never sees.
        problems.append(
            locate(path, f"{text!r} is IPv4-mapped: expected its IPv4 form {plain(v4)}")
        )
        return None
    return net


def _trusted(items: Sequence[str], locate: _Locator, problems: list[str]) -> tuple[Network, ...]:
    """The trusted prefixes; each must parse, without host bits, and appear once."""
    out: dict[Network, None] = {}  # ordered, and a set: 60,000 prefixes stay linear
    for i, text in enumerate(items):
        net = _source(text, ["trusted", i], "203.0.113.0/24 or 2001:db8:2::/64", locate, problems)
        if net is None:
            continue
        if net in out:
            problems.append(locate(["trusted", i], f"{text!r} twice: expected each prefix once"))
            continue
        out[net] = None
    return tuple(out)


def _tripwire(
    given: Mapping[str, Any] | None,
    services: Mapping[str, tuple[int, ...]],
    locate: _Locator,
    problems: list[str],
    fixed: Mapping[str, frozenset[int]] = _NO_IGNORE,
) -> Tripwire | None:
    """Tripwire ports are never service ports (a client of a service would trip it), nor
    fixed ones (a port clients reach in place)."""
    if not given:
        return None
    ports = {p: tuple(sorted(given.get(p, []))) for p in PROTOCOLS}
    for proto in PROTOCOLS:
        for used, key in ((services[proto], "services"), (fixed[proto], "fixed")):
            clash = sorted(set(ports[proto]) & set(used))
            if clash:
                problems.append(
                    locate(
                        ["tripwire", proto],
                        f"{clash} in ports.{key}.{proto}: expected ports no service uses "
                        "(every client of that service would trip it)",
                    )
                )
    from reconciler.core import watch

    try:
        seconds = watch.seconds(given["for"])
    except watch.WatchError as exc:  # the schema let a string of that shape through
        problems.append(locate(["tripwire", "for"], str(exc).removeprefix("--for ")))
        seconds = 1
    return Tripwire(ports=ports, seconds=seconds)


def _forbidden_paths(state: State, local: Local, locate: _Locator) -> list[str]:
    """No file of mtd's inside the repository clone: a secret committed there would make
    the mapping predictable, an epoch or audit file there could be rewritten by a commit."""
    paths = {
        ("secret_file",): state.secret_file,
        ("epoch_file",): state.epoch_file,
        ("audit_log",): state.audit_log,
        ("redis", "signing_key_file"): state.redis.get("signing_key_file"),
        ("crowdsec", "key_file"): (state.doc.get("crowdsec") or {}).get("key_file"),
    }
    out = []
    for key, path in paths.items():
        if not path:
            continue
        for top in local.forbidden:
            if _inside(path, top):
                out.append(
                    locate(
                        list(key),
                        f"{path} is inside {top}, the repository clone: expected a path "
                        "outside it (files there come from commits)",
                    )
                )
    return out


def _inside(path: str, top: str) -> bool:
    p, t = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(top))
    return p == t or p.startswith(t.rstrip("/") + "/")


def _capacity_problems(state: State, locate: _Locator) -> list[str]:
    """Every source must be able to move all its ports to ports of the range the shuffle
    draws from (`shuffle.compute`): the free ones for a template that writes swaps, else
    every port the source does not keep in place, service ports included."""
    from reconciler.core.templates import support

    swaps = support(state.template).swaps
    problems = []
    lo, hi = state.port_range
    bucketed = 0  # ports every bucket moves, both protocols
    for proto in PROTOCOLS:
        before = len(problems)
        kind = "free " if swaps else ""

        def room(ignore: frozenset[int], proto: str = proto) -> int:
            return len(state.free_ports(proto) if swaps else state.target_ports(proto, ignore))

        # Sources with the same ignore list move the same ports: check the first of each.
        checked: set[frozenset[int]] = set()
        for w in state.watched:
            if w.ignore[proto] in checked:
                continue
            checked.add(w.ignore[proto])
            moved, free = len(state.moved_ports(w, proto)), room(w.ignore[proto])
            if moved > free:
                problems.append(
                    locate(
                        ["watched", w.index, "source"],
                        f"{w.label}: {proto} moves {moved} ports but ports.range [{lo}, {hi}] "
                        f"has only {free} {kind}{proto} ports to show them at: expected a "
                        "larger range or fewer services",
                    )
                )
        moved, free = len(state.bucket_ports(proto)), room(state.bucket_ignore[proto])
        bucketed += moved
        if moved > free and len(problems) == before and state.has_buckets:
            problems.append(
                locate(
                    ["ports", "range"],
                    f"[{lo}, {hi}]: the bucket mappings of dynamic sources move {moved} {proto} "
                    f"ports but only {free} {kind}ports can show them: expected a larger range "
                    "or fewer services",
                )
            )
    if state.has_buckets and state.bucket_count * bucketed > MAX_BUCKET_MOVES and not problems:
        # Each bucket is a shuffle of its own, in two maps (inbound, outbound): 1024 buckets of
        # 30,000 services asked a pass for 61 million elements (gigabytes, then the kernel).
        problems.append(
            locate(
                ["buckets"],
                f"{state.buckets} buckets x {bucketed} moved ports = "
                f"{state.buckets * bucketed:,} bucket mappings: expected at most "
                f"{MAX_BUCKET_MOVES:,} (fewer buckets or fewer services)",
            )
        )
    return problems


MAX_BUCKET_MOVES = 1 << 19  # buckets x moved ports: 1024 buckets of 512 services


def _template_problems(state: State, locate: _Locator) -> list[str]:
    """What the template declares it cannot render (`core.templates`): say so, instead of
    a ruleset that silently skips a source or a protocol."""
    from reconciler.core.templates import support

    can = support(state.template)
    instead = f" ({can.instead})" if can.instead else ""
    problems = []
    for w in state.watched:
        if w.source.version not in can.families:
            problems.append(
                locate(
                    ["watched", w.index, "source"],
                    f"{w.label} is IPv{w.source.version}: template {state.template} handles "
                    f"{can.families_text()} only{instead}",
                )
            )
        kind = "addresses" if w.is_host else "prefixes"
        if kind not in can.features:
            problems.append(
                locate(
                    ["watched", w.index, "source"],
                    f"{w.label}: template {state.template} handles no {kind}{instead}",
                )
            )
        if w.per_source and "per_source" not in can.features:
            problems.append(
                locate(
                    ["watched", w.index, "per_source"],
                    f"{w.label}: template {state.template} handles no per_source entries{instead}",
                )
            )
    for key, used in (("trusted", state.trusted), ("tripwire", state.tripwire)):
        if used and key not in can.features:
            problems.append(locate([key], f"template {state.template} handles no {key}{instead}"))
    for proto in PROTOCOLS:
        if state.services[proto] and proto not in can.protocols:
            problems.append(
                locate(
                    ["ports", "services", proto],
                    f"template {state.template} moves {can.protocols_text()} only: expected no "
                    f"{proto} services{instead}",
                )
            )
    return problems
