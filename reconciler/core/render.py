"""Render the nftables JSON command document from a Jinja2 template.

Pure but for reading the template files (through Jinja2's loader and, when the caller hands
one in, its bytecode cache): the template sees plain data (docs/configuration.md,
"Template variables") and must produce `{"nftables": [...]}` holding only `add` commands
for the owned table. A sandboxed environment with StrictUndefined turns template mistakes
into one-line errors.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler import __version__
from reconciler.core import shuffle
from reconciler.core.caches import NONE, OFF, Caches, Entries
from reconciler.core.shuffle import PortMap
from reconciler.core.state import HOST_LOCAL, PROTOCOLS, Network, State, Watched
from reconciler.core.values import (  # noqa: F401 (re-exported: callers say `render.*`)
    _TOKEN,
    _TOKEN_JSON,
    CONTEXT_TYPES,
    Elements,
    Hidden,
    Lazy,
    Opaque,
    RenderTimeout,
    RepositoryDir,
    dumps,
    repository_templates,
    template_dirs,
)
from reconciler.core.watch import MAX_KERNEL
from reconciler.errors import MtdError, TemplateError

if TYPE_CHECKING:  # imported only when a template is rendered (`sandbox`)
    import jinja2

Bytecode = Callable[[], "jinja2.BytecodeCache"] | None  # `Caches.bytecode`

SUFFIX = ".json.j2"
MAX_DYNAMIC = MAX_KERNEL  # elements of dyn4 (and of dyn6): memory a tripwire flood can take
FAMILIES = {4: "ip", 6: "ip6"}


# Bounds of one rendering: a template may come from a repository (see docs/security.md).
RENDER_SECONDS = 30.0  # wall time, enforced in any thread (the daemon's too)
MAX_RENDERED_CHARS = 128 << 20  # the shipped templates write elements as placeholders


def context(
    state: State, mapping: PortMap, dynamic: Mapping[str, Sequence[Any]] | None = None
) -> dict[str, Any]:
    """Everything a template may use. Element lists are ready for `| tojson`."""
    entries = {v: list((dynamic or {}).get(v, ())) for v in ("4", "6")}
    # Each port map twice: inbound (tcp4: shown -> real) and outbound (tcp4_out: real ->
    # shown), the same rows read in either direction (`Elements`).
    elements = {
        f"{proto}{v}{kind}{out}": Elements(f"elements.{proto}{v}{kind}{out}", bool(out))
        for proto in PROTOCOLS
        for v in (4, 6)
        for kind in ("", "_net")
        for out in ("", "_out")
    }
    sources: dict[str, list[str]] = {"4": [], "6": []}
    ranged = [w for w in state.watched if w.per_source or not w.is_host]
    pieces = _disjoint_prefixes([w.source for w in ranged])
    # Watched prefixes as disjoint pieces: rules that ask "is this source watched at all"
    # (whatever the port) look them up in one interval set, `networks` for explicit
    # prefixes, `bucketed` for per_source ones (most specific wins among all of them).
    networks: dict[str, list[dict[str, Any]]] = {"4": [], "6": []}
    bucketed: dict[str, list[dict[str, Any]]] = {"4": [], "6": []}
    for w in ranged:
        out_pieces = bucketed if w.per_source else networks
        for p in pieces[w.source]:
            prefix = {"prefix": {"addr": str(p.network_address), "len": p.prefixlen}}
            out_pieces[str(p.version)].append(prefix)
    # Most specific first, so per-pair (classic) rules also let the narrower source win.
    ordered = [w for w in state.most_specific_first if not w.per_source]
    for w in ordered:
        v, label = w.source.version, w.label
        if w.is_host:
            sources[str(v)].append(label)
        for proto in PROTOCOLS:
            moves = mapping.moves.get((label, proto))
            if not moves:
                continue
            if w.is_host:
                name, keys = f"{proto}{v}", [label]
            else:
                name = f"{proto}{v}_net"
                keys = [
                    {"prefix": {"addr": str(p.network_address), "len": p.prefixlen}}
                    for p in pieces[w.source]
                ]
            for key in keys:
                elements[name].add(key, moves)
                elements[f"{name}_out"].add(key, moves)
    return {
        "table": Opaque("table", state.table),
        "family": "inet",
        "epoch": mapping.epoch,
        "mark": Opaque("mark", state.mark),
        "state": fleet_state(state),
        "elements": elements,
        "sources": sources,
        "networks": networks,
        "services": {proto: list(state.services[proto]) for proto in PROTOCOLS},
        "fixed": {proto: sorted(state.fixed[proto]) for proto in PROTOCOLS},
        "bucketed": bucketed,
        "buckets": [
            {proto: Hidden(f"buckets.{k}.{proto}", elems) for proto, elems in by.items()}
            for k, by in enumerate(_bucket_elements(by) for by in mapping.buckets)
        ],
        "seed": Hidden("seed", mapping.seed),
        "dynamic_size": MAX_DYNAMIC,
        "trusted": {v: _trusted(state, v) for v in ("4", "6")},
        "tripwire": _tripwire(state),
        "pairs": Lazy(lambda: _pairs(ordered, mapping)),
        # Placeholders too: their seconds left change every second, and a text that only
        # writes them with `| tojson` (as `maps` does) is kept and reused whatever they are.
        "dynamic": {
            v: Hidden(f"dynamic.{v}", [[str(src), int(left)] for src, left in entries[v]])
            for v in ("4", "6")
        },
        "dynamic_elements": {
            v: Hidden(
                f"dynamic_elements.{v}",
                [{"elem": {"val": str(src), "timeout": int(left)}} for src, left in entries[v]],
            )
            for v in ("4", "6")
        },
    }


def fleet_state(state: State) -> dict[str, Any]:
    """The desired state as templates see it: the fleet's keys, none of the host's own
    (Redis, paths, keys, table, mark, ownership: `state.HOST_LOCAL`)."""
    return {k: v for k, v in state.doc.items() if k not in HOST_LOCAL}


def _bucket_elements(by_proto: Mapping[str, Mapping[int, int]]) -> dict[str, list[list[int]]]:
    """One bucket's map elements: `tcp` inbound (shown -> real), `tcp_out` outbound."""
    out: dict[str, list[list[int]]] = {}
    for proto in PROTOCOLS:
        inbound = shuffle.inbound(by_proto.get(proto, {}))
        out[proto] = [[shown, real] for shown, real in sorted(inbound.items())]
        out[f"{proto}_out"] = [[real, shown] for shown, real in sorted(inbound.items())]
    return out


def _tripwire(state: State) -> dict[str, Any] | None:
    if state.tripwire is None:
        return None
    return {**{p: list(state.tripwire.ports[p]) for p in PROTOCOLS}, "for": state.tripwire.seconds}


def _trusted(state: State, v: str) -> list[Any]:
    """Collapsed: overlapping prefixes would clash in an interval set."""
    nets = [n for n in state.trusted if str(n.version) == v]
    return [_interval(n) for n in ipaddress.collapse_addresses(nets)]  # type: ignore[type-var]


def _interval(net: Network) -> Any:
    """An interval set element: an address, or a prefix."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _pairs(ordered: Iterable[Watched], mapping: PortMap) -> list[dict[str, Any]]:
    return [
        {
            "source": w.label,
            "family": FAMILIES[w.source.version],
            "proto": proto,
            "port": real,
            "to": hidden,
        }
        for w in ordered
        for proto in PROTOCOLS
        for real, hidden in mapping.moves.get((w.label, proto), {}).items()
    ]


def _disjoint_prefixes(nets: list[Network]) -> dict[Network, list[Network]]:
    """Each prefix minus the more specific prefixes inside it (most-specific-wins).

    Sorted by address then length, a prefix's nested prefixes follow it directly, so one
    pass with a stack finds every prefix's direct children.
    """
    children: dict[Network, list[Network]] = {n: [] for n in nets}
    stack: list[Network] = []
    for net in sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen)):
        while stack and not (
            stack[-1].version == net.version and net.subnet_of(stack[-1])  # type: ignore[arg-type]
        ):
            stack.pop()
        if stack:
            children[stack[-1]].append(net)
        stack.append(net)
    out: dict[Network, list[Network]] = {}
    for net, kids in children.items():
        pieces = [net]
        for kid in kids:
            nxt: list[Network] = []
            for p in pieces:
                if kid.subnet_of(p):  # type: ignore[arg-type]
                    nxt.extend(p.address_exclude(kid))  # type: ignore[arg-type]
                else:
                    nxt.append(p)
            pieces = nxt
        out[net] = sorted(pieces, key=lambda p: int(p.network_address))
    return out


def check(state: State, search: Iterable[Path] | None = None, caches: Caches = NONE) -> list[dict]:
    """Validate by rendering (a zero secret, epoch 0): what `mtd validate`, a reload and a
    pull candidate need to know before anything is applied. No secret is read."""
    from reconciler.core import shuffle

    return render(state, shuffle.compute(state, b"\0" * 32, 0), search, caches=caches)


def render(
    state: State,
    mapping: PortMap,
    search: Iterable[Path] | None = None,
    dynamic: Mapping[str, Sequence[Any]] | None = None,
    caches: Caches = NONE,
) -> list[dict]:
    """The list of libnftables JSON commands for the owned table. `dynamic`: the dynamic
    watch entries to put back into dyn4/dyn6, `{"4": [(addr, seconds_left), ...], "6": ...}`
    (`core.watch.dynamic`), so a full replacement keeps them with their remaining time.

    `caches`: with a cache of rendered texts, the same template and inputs give the text
    the previous process rendered, without Jinja2 (see `_reuse`); with a bytecode cache,
    templates are compiled once for every process."""
    dirs = list(search) if search is not None else template_dirs()
    name = state.template + SUFFIX
    ctx = context(state, mapping, dynamic)
    kept, env = caches.rendered, _Environment(dirs, caches)
    key = _render_key(dirs, name, ctx) if _cacheable(state, kept) else None
    reused = _reuse(kept, key, dirs, mapping.epoch) if key is not None else None
    if reused is not None:
        text, where, read, kept_paths, _ = reused
    else:
        text, where, read = _render_text(dirs, name, ctx, state.template, env())
        kept_paths = None
    repository = bool(repository_templates(dirs))
    if repository:
        _consented(state, dirs)
        _bounded_values(text, where)
    try:
        doc = json.loads(sent := _host_values(text, ctx), parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise TemplateError(
            f"{where}: rendered output is not JSON: {exc.msg} "
            f"at rendered line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:  # a number Python refuses to read (4300 digits and more)
        raise TemplateError(
            f"{where}: rendered output is not JSON libnftables reads: {str(exc)[:60]}: "
            "expected numbers a rule can hold (at most 64 bits)"
        ) from None
    except RecursionError:
        doc = None
    # A kept text was checked for depth when it was rendered (and kept only if it passed).
    if doc is None or (reused is None and _too_deep(doc)):
        raise TemplateError(
            f"{where}: rendered JSON nested more than {MAX_JSON_DEPTH} levels deep: expected "
            "a libnftables document (about 12 levels)"
        )
    paths = kept_paths if reused is not None else []
    if _TOKEN_JSON in sent:
        bulk = {h.token: h for h in _placeholders(ctx)}
        if not _splice_at(doc, kept_paths, bulk, sent.count(_TOKEN_JSON)):
            paths = _splice(doc, bulk)
        _written_once(ctx, where)
    commands = _commands(doc, state, where)
    if repository:
        _allowed(text, state, ctx, dirs, where)
        epoch = reused[4] if reused else _epoch_read(ctx, env())
        if epoch is not None:  # the round checks a commit's rules once, at the epoch it is at
            raise TemplateError(
                f"{where}: reads epoch: expected a repository template whose rules are the "
                "same at every epoch (the pull round checks them once; the mapping moves "
                "through map elements and seed)"
            )
    # Kept once rendered, and again when a kept entry did not say where its placeholders sit.
    if (
        key is not None
        and paths != kept_paths
        and (reused or _keep(key, dirs, name, ctx, text, env()))
    ):
        epoch = reused[4] if reused else _epoch_read(ctx, env())
        entry = {"where": where, "templates": read, "text": text, "paths": paths}
        kept.put(key, entry | {"epoch": epoch})
    return commands


def _no_constant(name: str) -> None:
    """NaN and Infinity are not JSON: libnftables would refuse what `mtd render` printed."""
    raise ValueError(f"{name} is not a JSON number")


def _epoch_read(ctx: Mapping[str, Any], env: jinja2.Environment) -> int | None:
    """The epoch a kept text depends on: None when no template it came from reads `epoch`
    (the shipped ones do not), so the next epoch reuses it too."""
    from reconciler.core import sandbox

    return ctx["epoch"] if sandbox.reads_variable(env, "epoch") else None


def _render_text(
    dirs: list[Path], name: str, ctx: dict[str, Any], template_name: str, env: jinja2.Environment
) -> tuple[str, str, list[tuple[str, str, str]]]:
    """The template's output through Jinja2's sandbox, where it was found, and every
    template file read (name, file, sha256) so far by this environment."""
    import jinja2

    from reconciler.core import sandbox

    where = next((str(d / name) for d in dirs if (d / name).is_file()), name)
    try:
        with sandbox.deadline(RENDER_SECONDS):
            template = env.get_template(name)
            where = template.filename or name
            text = _bounded_text(template.generate(ctx), where)
    except jinja2.TemplateNotFound as exc:
        dirs_text = ", ".join(str(d) for d in dirs) or "(no template directory)"
        if exc.name != name:  # an {% include %} or {% import %} of a missing template
            raise TemplateError(
                f"{where}: template {exc.name!r} not found in {dirs_text}"
            ) from None
        known = sorted({p.name[: -len(".json.j2")] for d in dirs for p in d.glob("*.json.j2")})
        raise TemplateError(
            f"template {template_name!r}: no {name} in {dirs_text}: expected one of "
            f"{', '.join(known) or '(none)'}, or a directory holding {name} given with "
            "--templates DIR"
        ) from None
    except jinja2.TemplateSyntaxError as exc:
        where = f"{exc.filename or name}:{exc.lineno}"
        raise TemplateError(f"{where}: template syntax error: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{where}: undefined in template: {exc.message}") from None
    except jinja2.sandbox.SecurityError as exc:
        raise TemplateError(f"{where}: refused by the template sandbox: {exc}") from None
    except RenderTimeout:
        raise TemplateError(
            f"{where}: rendering took longer than {RENDER_SECONDS:g} s: expected a template "
            "without huge loops"
        ) from None
    except RecursionError:
        raise TemplateError(
            f"{where}: template recursion too deep: expected macros that end"
        ) from None
    except MemoryError:
        raise TemplateError(f"{where}: template used too much memory") from None
    except MtdError:
        raise
    except Exception as exc:  # a template's own error is the template's, never a crash
        raise TemplateError(f"{where}: template failed: {type(exc).__name__}: {exc}") from None
    return text, where, sandbox.templates_read(env)


def environment(search: Iterable[Path], bytecode: Bytecode = None) -> jinja2.Environment:
    """The sandboxed Jinja2 environment templates render in (`sandbox.environment`)."""
    from reconciler.core import sandbox

    return sandbox.environment(search, bytecode, MAX_RENDERED_CHARS)


class _Environment:
    """The one environment a render uses, made when first needed (a reused text needs
    none): the caller's kept one for these templates (`Caches.environments`, a daemon's),
    else a new one. What it has read says what the text depends on (`_keep`)."""

    def __init__(self, dirs: list[Path], caches: Caches) -> None:
        self._dirs, self._caches = tuple(dirs), caches
        self._env: jinja2.Environment | None = None

    def __call__(self) -> jinja2.Environment:
        if self._env is None:
            from reconciler.core import sandbox

            make = self._caches.environments or sandbox.environment
            self._env = make(self._dirs, self._caches.bytecode, MAX_RENDERED_CHARS)
        return self._env


# Beyond this many watched sources, the key (a hash of every input) costs more than Jinja2
# saves, and the text (it lists the sources) grows large: always render.
RENDER_CACHE_MAX_SOURCES = 10_000


def _cacheable(state: State, kept: Entries) -> bool:
    return kept is not OFF and len(state.watched) <= RENDER_CACHE_MAX_SOURCES


def _render_key(dirs: list[Path], name: str, ctx: Mapping[str, Any]) -> str:
    """Everything a template may read but the mapping and the epoch: mtd's version, where
    templates are searched, which one, and the context, element lists as their placeholder
    and length (a text that read more of them is not kept: `_keep`). The epoch is kept with
    the text when a template reads it (`_epoch_read`), and must then match (`_reuse`)."""
    rest = {k: v for k, v in ctx.items() if k != "epoch"}
    text = f"{__version__}\0{[str(d) for d in dirs]!r}\0{name}\0{rest!r}"
    return hashlib.sha256(text.encode()).hexdigest()


MAX_CACHED_TEXT = 1 << 20  # characters of rendered text kept for the next process


def _keep(
    key: str,
    dirs: list[Path],
    name: str,
    ctx: Mapping[str, Any],
    text: str,
    env: jinja2.Environment,
) -> bool:
    """Whether the text may be kept: it depends on nothing but the key (the template read
    no element and no pair, which hold the mapping, a secret, and changed nothing of its
    context), and it is small."""
    if ctx["pairs"].read or any(h.read for h in _placeholders(ctx)):
        return False
    from reconciler.core import sandbox

    if sandbox.missed_templates(env):
        return False
    return len(text) <= MAX_CACHED_TEXT and _render_key(dirs, name, ctx) == key


def _reuse(
    kept: Entries, key: str, dirs: list[Path], epoch: int
) -> tuple[str, str, Any, Any, Any] | None:
    """The text, its template's file name, the template files it came from, where its
    placeholders sit and the epoch it depends on, from the render cache, if every template
    file it was rendered from is still the one found first in `dirs`, with the same source,
    and it depends on no epoch or on this one."""
    entry = kept.get(key)
    try:
        text, where, read = entry["text"], entry["where"], entry["templates"]
        if not (isinstance(text, str) and isinstance(where, str) and read):
            return None
        if entry["epoch"] is not None and entry["epoch"] != epoch:
            return None
        for name, filename, digest in read:
            found = _find(dirs, name)
            if found is None or found != filename:
                return None
            source = Path(found).read_text(encoding="utf-8")  # as Jinja2's loader reads it
            if hashlib.sha256(source.encode()).hexdigest() != digest:
                return None
    except (TypeError, KeyError, ValueError, OSError):
        return None
    return text, where, read, entry.get("paths"), entry["epoch"]


def _find(dirs: list[Path], name: str) -> str | None:
    """The file Jinja2's FileSystemLoader would load for `name`."""
    pieces = name.split("/")
    if any(p in ("", ".", "..") for p in pieces):
        return None
    for d in dirs:
        path = os.path.join(str(d), *pieces)
        if os.path.isfile(path):
            return os.path.normpath(path)
    return None


MAX_JSON_DEPTH = 64  # real documents nest about 12 deep; the diff and libnftables recurse


def _too_deep(doc: Any) -> bool:
    """Iteratively, so the check itself cannot overflow the stack."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def _bounded_text(chunks: Iterable[str], where: str) -> str:
    """Join the rendered chunks, refusing more than `MAX_RENDERED_CHARS` of them."""
    out, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_RENDERED_CHARS:
            raise TemplateError(
                f"{where}: rendered output over {MAX_RENDERED_CHARS} characters: expected a "
                "smaller document (element lists belong in `| tojson`)"
            )
        out.append(chunk)
    return "".join(out)


def _host_values(text: str, ctx: Mapping[str, Any]) -> str:
    """The host's own values in place of their tokens (`Opaque`): each token is one whole
    JSON string, so the text stays JSON (a token inside another string breaks it)."""
    for opaque in (ctx["table"], ctx["mark"]):
        text = text.replace(json.dumps(opaque.token), json.dumps(opaque._value))
    return text


def _written_once(ctx: Mapping[str, Any], where: str) -> None:
    """Each element list at most once: the elements written are then bounded by the
    validated state (a list written a thousand times by reference was 10^8 elements)."""
    for h in _placeholders(ctx):
        if h.written > 1 and (isinstance(h, Elements) or isinstance(h._value, list)):
            raise TemplateError(
                f"{where}: {h.token[len(_TOKEN) :]} written {h.written} times: expected each "
                "element list at most once"
            )


def _consented(state: State, dirs: list[Path]) -> None:
    if not state.repository_templates:
        first = repository_templates(dirs)[0]
        raise TemplateError(
            f"{first}: a template from the state repository: expected templates only from this "
            "host (its local configuration may allow them: repository_templates: true)"
        )


def _bounded_values(text: str, where: str) -> None:
    """A repository template's JSON values, counted on the text before it is parsed (an
    upper bound: separators and openings). The character bound alone let 100 MB of
    `{"accept":null},` become gigabytes of Python objects, then of libnftables'."""
    from reconciler.core import templates

    limit = templates.REPOSITORY.max_values
    values = sum(text.count(c) for c in ",:[{")
    if values > limit:
        raise TemplateError(
            f"{where}: rendered output of about {values} JSON values: expected at most {limit} "
            "(element lists belong in `| tojson`): not allowed in a repository template"
        )


def _allowed(text: str, state: State, ctx: Mapping[str, Any], dirs: list[Path], where: str) -> None:
    """A repository template (docs/security.md): only if the host allows them, and then
    only what `templates.REPOSITORY` lists. `text` passed `_commands` once the host's values
    were put in; it is checked with them still tokens, so a refusal line names `{{ mark }}`
    or `{{ table }}` and never the host's value (a template that wrote the mark as a set's
    size read it in the error), and a rule sets the mark bits only through `{{ mark }}`."""
    from reconciler.core import templates

    lists = {
        id(h._value) for h in _placeholders(ctx) if isinstance(h, Hidden) and type(h._value) is list
    }

    def opaque(value: Any) -> bool:
        return isinstance(value, Elements) or id(value) in lists

    commands = json.loads(text, parse_constant=_no_constant)["nftables"]
    mark = ctx["mark"].token
    refused = templates.check_repository(commands, mark, opaque)
    if refused is not None:
        for name in ("table", "mark"):
            refused = refused.replace(json.dumps(ctx[name].token), f"{{{{ {name} }}}}")
        raise TemplateError(f"{where}: {refused}: not allowed in a repository template")


def _placeholders(ctx: Mapping[str, Any]) -> list[Elements | Hidden]:
    """Every value a template writes as a placeholder: what holds the mapping, and the
    dynamic entries."""
    hidden = [h for bucket in ctx["buckets"] for h in bucket.values()]
    dynamic = [*ctx["dynamic"].values(), *ctx["dynamic_elements"].values()]
    return [*ctx["elements"].values(), *hidden, ctx["seed"], *dynamic]


def _splice(
    node: dict | list, bulk: dict[str, Elements | Hidden], at: tuple[str | int, ...] = ()
) -> list[list[str | int]]:
    """Replace, in place, each placeholder by its value (an element list stays an
    `Elements`, written by `bulk.dumps`); returns where each one was (keys from the top)."""
    paths = []
    for k, v in node.items() if isinstance(node, dict) else enumerate(node):
        if isinstance(v, str):
            if v in bulk:
                node[k] = _value(bulk[v])  # type: ignore[index]
                paths.append([*at, k])
        elif isinstance(v, dict | list):
            paths += _splice(v, bulk, (*at, k))
    return paths


def _splice_at(doc: Any, paths: Any, bulk: dict[str, Elements | Hidden], count: int) -> bool:
    """Splice at the places `_splice` found when the text was kept, without walking the
    whole document; False, with nothing changed, unless they lead to exactly the `count`
    placeholders the text holds (a stale or damaged entry: the caller walks instead)."""
    if not isinstance(paths, list) or len(paths) != count:
        return False
    found = []
    try:
        for path in paths:
            node = doc
            for k in path[:-1]:
                node = node[k]
            v = node[path[-1]]
            if not isinstance(v, str) or v not in bulk:
                return False
            found.append((node, path[-1], bulk[v]))
    except (TypeError, KeyError, IndexError):
        return False
    if len({(id(node), k) for node, k, _ in found}) != count:  # one place named twice
        return False
    for node, k, value in found:
        node[k] = _value(value)
    return True


def _value(found: Elements | Hidden) -> Any:
    found.written += 1
    return found if isinstance(found, Elements) else found._value


# What a template may ask for: `add` only (mtd itself adds the delete of its table), and
# only objects that live inside a table.
VERBS = ("add",)
OBJECTS = (
    "table", "chain", "rule", "set", "map", "element", "flowtable", "counter", "quota",
    "limit", "ct helper", "ct timeout", "ct expectation", "secmark", "synproxy",
)  # fmt: skip


def _commands(doc: Any, state: State, where: str) -> list[dict]:
    """Check every command's structure before anything else sees it: exactly one verb (from
    `VERBS`), exactly one object (from `OBJECTS`), family inet, the owned table, and that
    table without flags.

    libnftables acts on every key of a command object, in its own order: reading only the
    first key let an object with two keys smuggle a rule into another table.
    """
    if (
        not isinstance(doc, dict)
        or list(doc) != ["nftables"]
        or not isinstance(doc["nftables"], list)
    ):
        raise TemplateError(
            f'{where}: expected a JSON object {{"nftables": [...]}} and nothing else'
        )
    commands = doc["nftables"]
    owned = f"inet {state.table}"
    for i, cmd in enumerate(commands):
        if not isinstance(cmd, dict) or len(cmd) != 1:
            keys = ", ".join(map(repr, cmd)) if isinstance(cmd, dict) else _kind(cmd)
            raise TemplateError(
                f"{where}: nftables[{i}]: {keys}: expected exactly one verb "
                f"({', '.join(VERBS)}) per command"
            )
        ((verb, body),) = cmd.items()
        if verb not in VERBS:
            raise TemplateError(
                f"{where}: nftables[{i}]: verb {verb!r} ({_touches(body)}): expected only "
                f"{', '.join(VERBS)} (mtd replaces table {owned} itself)"
            )
        if not isinstance(body, dict) or len(body) != 1:
            keys = ", ".join(map(repr, body)) if isinstance(body, dict) else _kind(body)
            raise TemplateError(
                f"{where}: nftables[{i}]: {verb} {keys}: expected exactly one object per command"
            )
        ((kind, obj),) = body.items()
        if kind not in OBJECTS or not isinstance(obj, dict):
            raise TemplateError(
                f"{where}: nftables[{i}]: {verb} {kind!r}: expected one of {', '.join(OBJECTS)} "
                "given as an object"
            )
        table = obj.get("name") if kind == "table" else obj.get("table")
        family = obj.get("family")
        if family != "inet" or table != state.table:
            raise TemplateError(
                f"{where}: nftables[{i}]: {verb} {kind} to table {family} {table}: expected "
                f"only table {owned} (mtd never touches other tables)"
            )
        if kind == "table" and obj.get("flags"):
            raise TemplateError(
                f"{where}: nftables[{i}]: add table {owned} with flags "
                f"{json.dumps(obj['flags'])}: expected none (owner would take the table away "
                "with mtd's process, dormant would switch it off)"
            )
    return commands


def _touches(body: Any) -> str:
    """`table ip filter`: what a refused command would have acted on, for the error."""
    if isinstance(body, dict) and len(body) == 1:
        ((kind, obj),) = body.items()
        if isinstance(obj, dict):
            table = obj.get("name") if kind == "table" else obj.get("table")
            return f"{kind} of table {obj.get('family')} {table}"
        return str(kind)
    return "ruleset" if body is None or body == {} else _kind(body)


def _kind(value: Any) -> str:
    return {list: "a list", str: "text", dict: "an object"}.get(type(value), type(value).__name__)


def placeholders(commands: Sequence[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Rendered commands with the mapping written as `text` (a preview without a secret):
    each map's elements become one count, the buckets' jhash seed the text itself. Sets
    (sources, services, trusted prefixes) stay as they are: they are the state, not secret."""
    maps = {c["add"]["map"].get("name") for c in commands if "map" in c.get("add", {})}
    out = []
    for cmd in commands:
        ((verb, body),) = cmd.items()
        ((kind, obj),) = body.items()
        if kind in ("map", "element") and obj.get("elem") is not None and obj["name"] in maps:
            obj = {**obj, "elem": f"<{len(obj['elem'])} elements {text}>"}
        elif kind == "rule":
            obj = {**obj, "expr": _seedless(obj.get("expr"), text)}
        out.append({verb: {kind: obj}})
    return out


def _seedless(expr: Any, text: str) -> Any:
    if isinstance(expr, list):
        return [_seedless(x, text) for x in expr]
    if isinstance(expr, dict):
        out = {k: _seedless(v, text) for k, v in expr.items()}
        if "jhash" in out and isinstance(out["jhash"], dict) and "seed" in out["jhash"]:
            out["jhash"] = {**out["jhash"], "seed": f"<{text}>"}
        return out
    return expr
