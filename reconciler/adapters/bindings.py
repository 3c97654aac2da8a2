"""The libnftables Python bindings, whichever copy is installed, loaded at first use.

Debian's `python3-nftables` matches the system's libnftables (the Debian package and `make
setup` put that one module on their venv's path); `pip install pip-nftables` (or the `nftables`
extra of a source install) brings a packaged copy of the same module that lacks `set_dry_run`
and the JSON schema file. Both load the system's `libnftables.so.1`. When the module or the
library is missing, the user gets one line saying what to install, not a traceback: the pip
command names this interpreter, so it installs into the venv mtd runs in (`mtd` on PyPI is
another project: the message never names it).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from functools import cache
from types import ModuleType
from typing import Any

from reconciler.errors import NftError

SONAME = "libnftables.so.1"
INSTALL_BINDINGS = (
    f"{sys.executable} -m pip install pip-nftables (the venv mtd runs in; pipx: pipx inject mtd "
    "pip-nftables), or apt install python3-nftables (Debian's python3); either needs libnftables1"
)
INSTALL_LIBRARY = "apt install libnftables1 (dnf install nftables on Fedora/RHEL)"


@cache
def module() -> ModuleType:
    """The `nftables` module, once it is known to load the system's libnftables."""
    try:
        import nftables
    except ModuleNotFoundError as exc:
        if exc.name != "nftables":
            raise
        raise NftError(
            f"the libnftables Python bindings (module nftables) are missing: {INSTALL_BINDINGS}"
        ) from None
    if not hasattr(nftables, "Nftables"):
        raise NftError(
            f"module nftables at {getattr(nftables, '__file__', '?')} is not the libnftables "
            f"bindings: {INSTALL_BINDINGS}"
        )
    try:
        ctypes.CDLL(SONAME)
    except OSError as exc:
        raise NftError(f"cannot load {SONAME} ({exc}): {INSTALL_LIBRARY}") from None
    return nftables


def context() -> Any:
    """A new libnftables context; `set_dry_run` added where the bindings lack it."""
    ctx = module().Nftables(sofile=SONAME)
    if not hasattr(ctx, "set_dry_run"):  # pip-nftables 1.0.2: the library has it
        set_dry_run = ctypes.CDLL(SONAME).nft_ctx_set_dry_run
        set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        set_dry_run.restype = None
        handle = ctx._Nftables__ctx  # the context pointer both copies keep
        ctx.set_dry_run = lambda on: set_dry_run(handle, bool(on))
    return ctx


# All that libnftables' JSON schema says (its schema.json, as shipped with nftables since
# 0.9.x): an object whose `nftables` is an array of objects ("minitems" is no keyword).
LIBNFTABLES_SCHEMA = {
    "$schema": "http://json-schema.org/schema#",
    "description": "libnftables JSON API schema",
    "type": "object",
    "properties": {
        "nftables": {"type": "array", "minitems": 0, "items": {"type": "object"}},
    },
    "required": ["nftables"],
}


def json_validate(doc: dict[str, Any]) -> None:
    """libnftables' JSON schema check. When the bindings ship that schema as it has always
    been, or none, its one rule is checked here: the bindings' validator imports jsonschema,
    which was most of a short `mtd apply` that changes the table, and walks every element.
    Any other schema file goes through the bindings' validator."""
    nft = module()
    schema = os.path.join(os.path.dirname(nft.__file__ or ""), "schema.json")
    if os.path.exists(schema) and not _known_schema(schema):
        _validator().json_validate(doc)
        return
    commands = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(commands, list) or not all(isinstance(c, dict) for c in commands):
        raise ValueError(f"{json.dumps(doc)[:80]}: expected {{'nftables': [objects]}}")


@cache
def _known_schema(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return bool(json.load(f) == LIBNFTABLES_SCHEMA)
    except (OSError, ValueError):
        return False


@cache
def _validator() -> Any:
    """A context used only for `json_validate` (it never runs a command, so caches nothing)."""
    return context()
