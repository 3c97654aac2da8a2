"""A fleet inventory in one state directory: which documents apply to which host.

Pure. Layout (paths relative to the state directory):

- `*.yaml` at the top level: every host, merged in name order;
- `groups/NAME.yaml`: the hosts named in its `hosts:` list, groups merged in name order;
- `hosts/HOST.yaml`: that host alone, merged last.

So host beats group beats all; mappings merge key by key and everything else (lists included)
is replaced, as for any directory of state files (`state.merge`). The `hosts:` key belongs
to the inventory, not to the desired state: it is removed before validation.

A directory without `groups/` or `hosts/` documents is not an inventory: every host gets
the same state, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from reconciler.core.state import Accepted, Local, State, build, load_yaml
from reconciler.defaults import YAML_SUFFIXES
from reconciler.errors import StateError

GROUPS = "groups"
HOSTS = "hosts"

Documents = Sequence[tuple[str, str]]


def kind(rel: str) -> str | None:
    """`shared`, `groups` or `hosts` for the state files of a directory, None for the rest."""
    p = PurePosixPath(rel)
    if p.suffix not in YAML_SUFFIXES or p.name.startswith("."):
        return None
    if len(p.parts) == 1:
        return "shared"
    if len(p.parts) == 2 and p.parts[0] in (GROUPS, HOSTS):
        return p.parts[0]
    return None


def is_inventory(documents: Documents) -> bool:
    return any(kind(rel) in (GROUPS, HOSTS) for rel, _ in documents)


def hosts(documents: Documents, root: str = "") -> list[str]:
    """Every host the inventory names: `hosts/*.yaml` files and the groups' `hosts:` lists."""
    names = {PurePosixPath(rel).stem for rel, _ in documents if kind(rel) == HOSTS}
    for _, members, _ in _groups(documents, root):
        names.update(members)
    return sorted(names)


def select(documents: Documents, host: str, root: str = "") -> list[tuple[str, dict[str, Any]]]:
    """The parsed documents that apply to `host`, in merge order, named `root/rel`.

    `documents` are (path relative to the state directory, text) pairs. A host the inventory
    does not name is an error: applying only the shared files to a mistyped host name would
    hide the mistake.
    """
    shared = sorted((rel, text) for rel, text in documents if kind(rel) == "shared")
    out = [_load(root, rel, text) for rel, text in shared]
    named = False
    for name, members, data in _groups(documents, root):
        if host in members:
            named = True
            out.append((name, {k: v for k, v in data.items() if k != "hosts"}))
    own = sorted(
        rel for rel, _ in documents if kind(rel) == HOSTS and PurePosixPath(rel).stem == host
    )
    if len(own) > 1:
        raise StateError(
            f"{_name(root, own[0])}: {_name(root, own[1])} also describes host {host!r}: "
            "expected one file per host"
        )
    if own:
        named = True
        out.append(_load(root, own[0], dict(documents)[own[0]]))
    if not named:
        known = ", ".join(hosts(documents, root)) or "none"
        raise StateError(
            f"{root or 'state'}: host {host!r} is not in the inventory: expected "
            f"{HOSTS}/{host}.yaml or {host} in a {GROUPS}/*.yaml hosts list (hosts: {known})"
        )
    return out


def state_for(
    documents: Documents,
    host: str,
    root: str = "",
    local: Local | None = None,
    accepted: Accepted | None = None,
) -> State:
    """The validated desired state of one host of an inventory (`accepted`: see `build`)."""
    parsed = select(documents, host, root)
    return build(parsed, {_name(root, rel): text for rel, text in documents}, local, accepted)


def _groups(documents: Documents, root: str) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(name, member hosts, document) of every group, in name order."""
    out = []
    for rel, text in sorted(d for d in documents if kind(d[0]) == GROUPS):
        name = _name(root, rel)
        data = load_yaml(name, text)
        members = data.get("hosts")
        if not isinstance(members, list) or not all(
            isinstance(m, str) and m.strip() for m in members
        ):
            shown = "missing" if members is None else repr(members)
            raise StateError(
                f"{name}: hosts: {shown}: expected the list of host names this group applies to"
            )
        out.append((name, members, data))
    return out


def _load(root: str, rel: str, text: str) -> tuple[str, dict[str, Any]]:
    """A shared or host document; `hosts:` there is a misplaced group list."""
    name = _name(root, rel)
    data = load_yaml(name, text)
    if "hosts" in data:
        raise StateError(
            f"{name}: hosts: only {GROUPS}/*.yaml files list hosts: expected it in a group file"
        )
    return name, data


def _name(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if root else rel
