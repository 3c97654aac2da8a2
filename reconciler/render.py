"""Render the nftables JSON command document from a Jinja2 template.

Pure: the template sees plain data (documented in README, "Template variables") and must
produce `{"nftables": [...]}` holding only `add` commands for the owned table. A sandboxed
environment with StrictUndefined turns template mistakes into one-line errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from reconciler.errors import MtdError
from reconciler.shuffle import PortMap
from reconciler.state import PROTOCOLS, Network, State

SUFFIX = ".json.j2"
FAMILIES = {4: "ip", 6: "ip6"}


def template_dirs() -> list[Path]:
    """Shipped templates: inside the package when installed, `templates/` in a checkout."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "templates", here.parent / "templates") if d.is_dir()]


def environment(search: Iterable[Path]) -> jinja2.Environment:
    env = jinja2.sandbox.SandboxedEnvironment(
        loader=jinja2.FileSystemLoader([str(p) for p in search]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    # Plain compact JSON: the HTML-safe default escapes and is slower on 100k elements.
    env.policies["json.dumps_function"] = json.dumps
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":")}
    return env


def context(state: State, mapping: PortMap) -> dict[str, Any]:
    """Everything a template may use. Element lists are ready for `| tojson`."""
    elements: dict[str, list[Any]] = {
        f"{proto}{v}{kind}": [] for proto in PROTOCOLS for v in (4, 6) for kind in ("", "_net")
    }
    sources: dict[str, list[str]] = {"4": [], "6": []}
    pairs: list[dict[str, Any]] = []
    pieces = _disjoint_prefixes([w.source for w in state.watched if not w.is_host])
    # Most specific first, so per-pair (classic) rules also let the narrower source win.
    ordered = sorted(state.watched, key=lambda w: (-w.source.prefixlen, w.index))
    for w in ordered:
        v = w.source.version
        if w.is_host:
            sources[str(v)].append(w.label)
        for proto in PROTOCOLS:
            moves = mapping.moves.get((w.label, proto), {})
            if not moves:
                continue
            for real, hidden in moves.items():
                pairs.append(
                    {
                        "source": w.label,
                        "family": FAMILIES[v],
                        "proto": proto,
                        "port": real,
                        "to": hidden,
                    }
                )
            if w.is_host:
                name, keys = f"{proto}{v}", [w.label]
            else:
                name = f"{proto}{v}_net"
                keys = [
                    {"prefix": {"addr": str(p.network_address), "len": p.prefixlen}}
                    for p in pieces[w.source]
                ]
            out = elements[name]
            for key in keys:
                for real, hidden in moves.items():
                    # Both directions of the swap: the map is an involution, so the same
                    # map answers "where does this port go" and "what was it before".
                    out.append([{"concat": [key, real]}, hidden])
                    out.append([{"concat": [key, hidden]}, real])
    return {
        "table": state.table,
        "family": "inet",
        "epoch": mapping.epoch,
        "mark": state.mark,
        "state": state.doc,
        "elements": elements,
        "sources": sources,
        "pairs": pairs,
    }


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


def render(state: State, mapping: PortMap, search: Iterable[Path] | None = None) -> list[dict]:
    """The list of libnftables JSON commands for the owned table."""
    dirs = list(search) if search is not None else template_dirs()
    name = state.template + SUFFIX
    env = environment(dirs)
    where = _template_path(env, name)
    try:
        text = env.get_template(name).render(context(state, mapping))
    except jinja2.TemplateNotFound:
        dirs_text = ", ".join(str(d) for d in dirs) or "(no template directory)"
        raise MtdError(f"template {state.template!r}: no {name} in {dirs_text}") from None
    except jinja2.TemplateSyntaxError as exc:
        where = f"{exc.filename or name}:{exc.lineno}"
        raise MtdError(f"{where}: template syntax error: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        raise MtdError(f"{where}: undefined in template: {exc.message}") from None
    except jinja2.sandbox.SecurityError as exc:
        raise MtdError(f"{where}: refused by the template sandbox: {exc}") from None
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise MtdError(f"{where}: template failed: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MtdError(
            f"{where}: rendered output is not JSON: {exc.msg} "
            f"at rendered line {exc.lineno} column {exc.colno}"
        ) from None
    return _commands(doc, state, where)


def _template_path(env: jinja2.Environment, name: str) -> str:
    try:
        return env.get_template(name).filename or name
    except jinja2.TemplateError:
        return name


def _commands(doc: Any, state: State, where: str) -> list[dict]:
    """Check the rendered shape: only `add` commands, all inside the owned table."""
    if not isinstance(doc, dict) or not isinstance(doc.get("nftables"), list):
        raise MtdError(f'{where}: expected a JSON object {{"nftables": [...]}}')
    commands = doc["nftables"]
    for i, cmd in enumerate(commands):
        if not isinstance(cmd, dict) or list(cmd) != ["add"] or not isinstance(cmd["add"], dict):
            raise MtdError(f'{where}: nftables[{i}]: expected an {{"add": ...}} command')
        (kind, obj), *_ = cmd["add"].items()
        table = obj.get("name") if kind == "table" else obj.get("table")
        family = obj.get("family")
        if (family, table) != ("inet", state.table):
            raise MtdError(
                f"{where}: nftables[{i}]: adds {kind} to table {family} {table}: expected "
                f"only table inet {state.table} (mtd never touches other tables)"
            )
    return commands
