"""The only module that talks to libnftables (through the bindings `adapters.bindings` loads).

Everything here takes and returns plain JSON-shaped data. Writes are one transaction: the
owned table is created if missing, deleted and re-created with its content, so the live
ruleset is either the old table or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from reconciler.adapters import bindings
from reconciler.core.bulk import dumps
from reconciler.errors import NftError

FAMILY = "inet"
_CANONICAL_CACHE: dict[str, list[dict[str, Any]]] = {}
_LIBC = ctypes.CDLL(None)  # the C library mtd runs on, for malloc_trim


class Nft:
    """libnftables with JSON output, bound to the caller's network namespace.

    One libnftables context is kept while the calls are small: closing its netlink socket
    waits for the kernel (about 10 ms, most of a small rotation). After a big call the
    context is freed and its heap handed back to the system: it caches every element it has
    seen (about 2 KB each), which at a million elements a daemon would otherwise keep.
    """

    KEEP_BYTES = 1 << 20  # calls moving more text than this free their context

    def __init__(self) -> None:
        bindings.module()  # at first use: one line saying what to install, if missing
        self._ctx: Any = None
        self.commits = 0  # transactions committed: the monitor tells them from others'

    def _cmd(self, text: str, *, dry_run: bool = False) -> tuple[int, str, str]:
        """One libnftables call: a command line or a JSON document."""
        if self._ctx is None:
            self._ctx = bindings.context()
            self._ctx.set_json_output(True)
            self._ctx.set_handle_output(False)
        self._ctx.set_dry_run(dry_run)
        rc, out, err = self._ctx.cmd(text)
        if len(text) + len(out) > self.KEEP_BYTES:
            self._ctx = None  # frees the context and its cache
            if hasattr(_LIBC, "malloc_trim"):  # glibc keeps freed heap otherwise
                _LIBC.malloc_trim(0)
        return rc, out, err

    def list_table(self, name: str) -> list[dict[str, Any]] | None:
        """The owned table as listed by the kernel, or None when it does not exist."""
        rc, out, err = self._cmd(f"list table {FAMILY} {name}")
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(f"list table {FAMILY} {name}: {_first_error(err)}")
        return [o for o in json.loads(out)["nftables"] if "metainfo" not in o]

    def counters(self, name: str) -> dict[str, int] | None:
        """Packets of each named counter of the owned table (None: no table). Objects only:
        libnftables fetches no set elements for this, so it costs the same at any size."""
        rc, out, err = self._cmd(f"list counters table {FAMILY} {name}")
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(f"list counters table {FAMILY} {name}: {_first_error(err)}")
        return {
            o["counter"]["name"]: int(o["counter"].get("packets", 0))
            for o in json.loads(out)["nftables"]
            if "counter" in o
        }

    def list_tables(self) -> list[tuple[str, str]]:
        """(family, name) of every table in this namespace (not their content)."""
        rc, out, err = self._cmd("list tables")
        if rc != 0:
            raise NftError(f"list tables: {_first_error(err)}")
        return [
            (o["table"]["family"], o["table"]["name"])
            for o in json.loads(out)["nftables"]
            if "table" in o
        ]

    def replace_table(
        self,
        name: str,
        commands: Sequence[dict[str, Any]],
        *,
        flush_ruleset: bool = False,
        check: bool = False,
    ) -> None:
        """Swap the owned table for `commands` in one transaction (or only check it)."""
        batch = replace_batch(name, commands, flush_ruleset=flush_ruleset)
        self.run(batch, check=check, first=len(batch) - len(commands))

    def delete_table(self, name: str) -> bool:
        """Remove the owned table on purpose (`mtd down`); False when it was not there."""
        try:
            self.run([{"delete": {"table": {"family": FAMILY, "name": name}}}])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return False
            raise
        return True

    def run(
        self, commands: Sequence[dict[str, Any]], *, check: bool = False, first: int = 0
    ) -> None:
        """One libnftables transaction. On failure nothing changed and the error names the
        first command the kernel refused (numbered from `commands[first]`, the rendered
        document, when a batch starts with commands mtd adds itself).

        No dry run before the real run: the batch is one kernel transaction, so a refused
        command leaves everything as it was (a dry run would double the cost).
        """
        doc = {"nftables": list(commands)}
        try:
            bindings.json_validate(doc)
        except Exception as exc:  # the bindings raise jsonschema's own errors
            raise NftError(f"libnftables JSON schema: {str(exc).splitlines()[0]}") from None
        # Compact JSON: what the bindings' `json_cmd` sends, minus the spaces; element
        # lists written by string formatting (see `bulk.dumps`).
        rc, _, err = self._cmd(dumps(doc), dry_run=check)
        if rc != 0:
            raise NftError(self._blame(commands, err, first))
        if not check:
            self.commits += 1

    def _blame(self, commands: Sequence[dict[str, Any]], err: str, first: int) -> str:
        """Bisect with dry runs for the first command whose prefix fails: errors from the
        kernel do not say which command of a batch they belong to."""
        lo, hi = 0, len(commands)  # commands[:hi] fails; commands[:lo] passes
        while hi - lo > 1:
            mid = (lo + hi) // 2
            rc, _, _ = self._cmd(dumps({"nftables": list(commands[:mid])}), dry_run=True)
            lo, hi = (mid, hi) if rc == 0 else (lo, mid)
        bad = hi - 1
        where = f"rendered command {bad - first}" if bad >= first else "command"
        return f"nftables refused {where} ({describe(commands[bad])}): {_first_error(err)}"


def replace_batch(
    name: str, commands: Sequence[dict[str, Any]], *, flush_ruleset: bool = False
) -> list[dict[str, Any]]:
    """Create-if-missing, delete, re-create: valid whether or not the table exists."""
    table = {"table": {"family": FAMILY, "name": name}}
    head: list[dict[str, Any]] = [{"flush": {"ruleset": None}}] if flush_ruleset else []
    return [*head, {"add": table}, {"delete": table}, *commands]


def describe(cmd: dict[str, Any]) -> str:
    """`add map tcp4`: enough to find the command in the rendered document."""
    (verb, body), *_ = cmd.items()
    if not isinstance(body, dict) or not body:
        return verb
    (kind, obj), *_ = body.items()
    name = obj.get("name") or obj.get("chain") if isinstance(obj, dict) else None
    return f"{verb} {kind} {name}" if name else f"{verb} {kind}"


def _first_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    for line in lines:
        if "Error:" in line:
            return line.split("Error:", 1)[1].strip()
    return lines[0].strip() if lines else "unknown error"


def canonical(commands: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """What the kernel lists back for `commands`: their one canonical form.

    Templates may write an expression in any form libnftables accepts; the kernel lists it in
    one form only. Loading the (element-free, so small) document into a scratch network
    namespace and listing it back gives that form without touching the host's ruleset.
    Cached, since the skeleton is the same from one rotation to the next.
    """
    text = json.dumps({"name": name, "commands": list(commands)}, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _CANONICAL_CACHE:
        # nft itself first: no interpreter to start, a tenth of the time.
        batch = json.dumps({"nftables": replace_batch(name, commands)})
        proc = _scratch(["sh", "-c", _LOAD_AND_LIST, "sh", name], batch)
        if proc.returncode == 0:
            listing = [o for o in json.loads(proc.stdout)["nftables"] if "metainfo" not in o]
        else:  # mtd's own loader says which rendered command the kernel refused
            proc = _scratch([sys.executable, "-m", "reconciler.adapters.kernel"], text)
            if proc.returncode != 0:
                raise NftError(
                    proc.stderr.strip().splitlines()[-1]
                    if proc.stderr.strip()
                    else f"scratch namespace failed with exit code {proc.returncode}"
                )
            listing = json.loads(proc.stdout)
        _CANONICAL_CACHE.clear()  # one skeleton is live at a time; keep memory flat
        _CANONICAL_CACHE[key] = listing
    return _CANONICAL_CACHE[key]


_LOAD_AND_LIST = 'nft -j -f - && exec nft -j list table inet "$1"'


def _scratch(argv: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    """Run argv in a new, empty network namespace that disappears with it."""
    return subprocess.run(
        ["unshare", "--net", *argv], input=stdin, capture_output=True, text=True, check=False
    )


def _scratch_main() -> None:
    """Runs inside `unshare --net`: load the commands, print the table as listed."""
    request = json.load(sys.stdin)
    nft = Nft()
    try:
        nft.run(replace_batch(request["name"], request["commands"]))
    except NftError as exc:
        sys.exit(f"cannot load the rendered ruleset: {exc}")
    json.dump(nft.list_table(request["name"]) or [], sys.stdout)


if __name__ == "__main__":
    _scratch_main()
