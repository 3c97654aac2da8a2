"""The kernel backend: the interface the services use, and its libnftables implementation.

`Backend` is what the reconcile pass, the daemon and a pull round need from the kernel;
`Nft` is the real one (the bindings `adapters.bindings` loads on first use, so that
commands that never touch the kernel start fast), and `adapters.fake.FakeKernel` an
in-memory one for tests. Everything takes and returns plain JSON-shaped data. Writes are one
transaction: the owned table is created if missing, deleted and re-created with its content,
so the live ruleset is either the old table or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from reconciler.adapters import bindings
from reconciler.core.bulk import dumps
from reconciler.errors import KernelError

if TYPE_CHECKING:
    import subprocess

FAMILY = "inet"
_NOT_FOUND = "No such file or directory"


# The RSTs the host sends for moved stateless probes must carry the probe's mark, so the
# output chain rewrites only those (and no other invalid packet).
SYSCTLS = {"net/ipv4/fwmark_reflect": "1", "net/ipv6/fwmark_reflect": "1"}


# Where the ruleset stands (`Backend.mark`): which ruleset, and its generation.
Mark = tuple[str, int]


class Backend(Protocol):
    """What mtd needs from the kernel, and nothing else: the caches that save a listing or
    a scratch namespace wrap a backend (`adapters.caching`). Every method raises
    `KernelError` on failure."""

    def list_table(self, name: str) -> list[dict[str, Any]] | None:
        """The owned table as the kernel lists it, or None when it does not exist."""
        ...

    def replace_table(
        self,
        name: str,
        commands: Sequence[dict[str, Any]],
        *,
        flush_ruleset: bool = False,
        check: bool = False,
    ) -> None:
        """Swap the owned table for `commands` in one transaction (or only check it); a
        refusal names the command by its index in `commands` and changes nothing."""
        ...

    def patch_table(
        self,
        name: str,
        batch: Sequence[dict[str, Any]],
        commands: Sequence[dict[str, Any]],
        *,
        check: bool = False,
    ) -> None:
        """Apply `batch` (`core.patch`: flushes and re-adds inside the existing owned table)
        in one transaction, after which the table is what `commands` make, as if
        `replace_table(name, commands)` had run. A refusal changes nothing."""
        ...

    def delete_table(self, name: str) -> bool:
        """Remove the owned table; False when it was not there."""
        ...

    def list_tables(self) -> list[tuple[str, str]]:
        """(family, name) of every table (`ownership: ruleset` says what it flushes)."""
        ...

    def canonical(self, commands: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
        """The listing `commands` (element-free) would have once loaded: the kernel's one
        form of every expression, which the diff compares against."""
        ...

    def set_sysctls(self, values: Mapping[str, str]) -> dict[str, str]:
        """Network sysctls the ruleset relies on, in the backend's namespace; returns the
        previous value of each one changed (so `mtd down` can put it back)."""
        ...

    def restore_sysctls(self, values: Mapping[str, str]) -> None:
        """Put back what `set_sysctls` replaced, best effort: after a refused change, which
        must leave the namespace as it found it."""
        ...

    def run(self, commands: Sequence[dict[str, Any]], *, check: bool = False) -> None:
        """Any batch inside the owned table, in one transaction (an event-driven repair);
        a refusal changes nothing."""
        ...

    def list_set(self, table: str, name: str) -> list[Any] | None:
        """The elements of one set of the owned table (a dynamic set: a few, not the
        maps' million), or None when the table or the set does not exist."""
        ...

    def mark(self) -> Mark | None:
        """Where the ruleset stands: which ruleset (this boot and network namespace) and its
        generation, or None when that cannot be told. Every transaction committed, mtd's or
        any process's, moves the generation by exactly one; nothing else moves it (a
        listing, a check, a refusal), and it does not come back short of 2^32 commits
        (`caching` rests on this)."""
        ...

    def version(self) -> str:
        """What the listing form of the same commands depends on besides them (libnftables
        and the kernel release): while it is the same, so is `canonical`'s answer."""
        ...


class Nft:
    """libnftables with JSON output, bound to the caller's network namespace.

    One libnftables context is kept while the calls are small: closing its netlink socket
    waits for the kernel (about 10 ms, most of a small rotation). After a big call the
    context is freed and its heap handed back to the system: it caches every element it has
    seen (about 2 KB each), which at a million elements a daemon would otherwise keep.

    It keeps nothing else: `caching.CachingBackend` around it keeps canonical forms and the
    last commit, for the next call and the next process.
    """

    KEEP_BYTES = 1 << 20  # calls moving more text than this free their context

    def __init__(self) -> None:
        bindings.module()  # at first use: one line saying what to install, if missing
        self._ctx: Any = None
        self.commits = 0  # transactions committed: the monitor tells them from others'

    def sibling(self) -> Nft:
        """Another libnftables context for another thread (one context is not shared)."""
        return Nft()

    def abandon(self) -> None:
        """At the end of a process that ran one command: never free the context. Freeing
        one that cached a transaction costs 10-15 ms (its elements, the netlink socket);
        the process's exit hands all of it back anyway. The daemon does not call this."""
        if self._ctx is not None:
            self._ctx.nft_ctx_free = lambda _ctx: None  # what the bindings' __del__ calls

    def _context(self) -> Any:
        if self._ctx is None:
            self._ctx = bindings.context()
            self._ctx.set_json_output(True)
            self._ctx.set_handle_output(False)
        return self._ctx

    def _cmd(self, text: str, *, dry_run: bool = False) -> tuple[int, str, str]:
        """One libnftables call: a command line or a JSON document."""
        ctx = self._context()
        ctx.set_dry_run(dry_run)
        rc, out, err = ctx.cmd(text)
        if len(text) + len(out) > self.KEEP_BYTES:
            self._ctx = None  # frees the context and its cache
            libc = _libc()
            if hasattr(libc, "malloc_trim"):  # glibc keeps freed heap otherwise
                libc.malloc_trim(0)
        return rc, out, err

    def list_table(self, name: str) -> list[dict[str, Any]] | None:
        rc, out, err = self._cmd(f"list table {FAMILY} {name}")
        if rc != 0:
            exc = kernel_error(err, context=f"list table {FAMILY} {name}")
            if exc.not_found:
                return None
            raise exc
        return [o for o in json.loads(out)["nftables"] if "metainfo" not in o]

    def counters(self, name: str) -> dict[str, int] | None:
        """Packets of each named counter of the owned table (None: no table, or no counter).
        By a netlink dump of counter objects (a scrape every few seconds must cost little:
        `monitor.counters`); through libnftables, which caches the whole ruleset first, only
        when that is refused."""
        from reconciler.adapters import monitor

        with contextlib.suppress(OSError):
            return monitor.counters(name)
        rc, out, err = self._cmd(f"list counters table {FAMILY} {name}")
        if rc != 0:
            exc = kernel_error(err, context=f"list counters table {FAMILY} {name}")
            if exc.not_found:
                return None
            raise exc
        return {
            o["counter"]["name"]: int(o["counter"].get("packets", 0))
            for o in json.loads(out)["nftables"]
            if "counter" in o
        }

    def list_set(self, table: str, name: str) -> list[Any] | None:
        rc, out, err = self._cmd(f"list set {FAMILY} {table} {name}")
        if rc != 0:
            exc = kernel_error(err, context=f"list set {FAMILY} {table} {name}")
            if exc.not_found:
                return None
            raise exc
        for o in json.loads(out)["nftables"]:
            if "set" in o:
                return list(o["set"].get("elem") or [])
        return None

    def list_tables(self) -> list[tuple[str, str]]:
        """(family, name) of every table in this namespace (not their content)."""
        rc, out, err = self._cmd("list tables")
        if rc != 0:
            raise kernel_error(err, context="list tables")
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
        batch = replace_batch(name, commands, flush_ruleset=flush_ruleset)
        self.run(batch, check=check, first=len(batch) - len(commands))

    def patch_table(
        self,
        name: str,
        batch: Sequence[dict[str, Any]],
        commands: Sequence[dict[str, Any]],
        *,
        check: bool = False,
    ) -> None:
        self.run(batch, check=check)

    def mark(self) -> Mark | None:
        return ruleset_mark()

    def version(self) -> str:
        return _platform()

    def delete_table(self, name: str) -> bool:
        try:
            self.run([{"delete": {"table": {"family": FAMILY, "name": name}}}])
        except KernelError as exc:
            if exc.not_found:
                return False
            raise
        return True

    def set_sysctls(self, values: Mapping[str, str]) -> dict[str, str]:
        return set_sysctls(values)

    def restore_sysctls(self, values: Mapping[str, str]) -> None:
        restore_values(values)

    def run(
        self, commands: Sequence[dict[str, Any]], *, check: bool = False, first: int = 0
    ) -> None:
        """One libnftables transaction. On failure nothing changed and the `KernelError`
        names the first command the kernel refused: its index counts from `commands[first]`
        (the rendered document, when a batch starts with commands mtd adds itself).

        No dry run before the real run: the batch is one kernel transaction, so a refused
        command leaves everything as it was (a dry run would double the cost).
        """
        doc = {"nftables": list(commands)}
        try:
            bindings.json_validate(doc)
        except Exception as exc:  # the bindings raise jsonschema's own errors
            raise KernelError(str(exc).splitlines()[0], context="libnftables JSON schema") from None
        # Compact JSON: what the bindings' `json_cmd` sends, minus the spaces; element
        # lists written by string formatting (see `bulk.dumps`).
        rc, _, err = self._cmd(dumps(doc), dry_run=check)
        if rc != 0:
            raise self._blame(commands, err, first)
        if not check:
            self.commits += 1

    def _blame(self, commands: Sequence[dict[str, Any]], err: str, first: int) -> KernelError:
        """Bisect with dry runs for the first command whose prefix fails: errors from the
        kernel do not say which command of a batch they belong to."""
        lo, hi = 0, len(commands)  # commands[:hi] fails; commands[:lo] passes
        while hi - lo > 1:
            mid = (lo + hi) // 2
            rc, _, _ = self._cmd(dumps({"nftables": list(commands[:mid])}), dry_run=True)
            lo, hi = (mid, hi) if rc == 0 else (lo, mid)
        bad = hi - 1
        facts = kernel_error(err)
        return KernelError(
            facts.reason,
            index=bad - first if bad >= first else None,
            command=describe(commands[bad]),
            not_found=facts.not_found,
        )

    def canonical(self, commands: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
        """Templates may write an expression in any form libnftables accepts; the kernel lists
        it in one form only. Loading the (element-free, so small) document into a scratch
        network namespace and listing it back gives that form without touching the host's
        ruleset. Worth keeping (`caching`): the skeleton is the same from one rotation to the
        next."""
        text = json.dumps({"name": name, "commands": list(commands)}, sort_keys=True)
        return _learn(text, name, commands)


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)  # the C library mtd runs on, for malloc_trim


@cache
def _platform() -> str:
    """What the kernel's listing form depends on besides the commands: the libnftables
    library (path, size, time) and the kernel release."""
    bindings.module()  # loads the library, so it is in the maps
    lib = ""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libnftables" in line:
                    lib = line.split()[-1]
                    break
        st = os.stat(lib) if lib else None
        lib = f"{lib}:{st.st_size}:{st.st_mtime_ns}" if st else "unknown"
    except OSError:
        lib = "unknown"
    return f"{lib}\0{os.uname().release}"


SO_NETNS_COOKIE = 71  # asm-generic/socket.h; other values on some architectures
_COOKIE_MACHINES = ("x86_64", "aarch64", "riscv64")


def ruleset_mark() -> Mark | None:
    """(`BOOT:NETNS`, generation) of the caller's ruleset, or None when any part cannot be
    read (an older kernel, another architecture). The namespace by its cookie, never reused
    within a boot, unlike its inode."""
    import socket

    from reconciler.adapters import monitor

    if os.uname().machine not in _COOKIE_MACHINES:
        return None
    try:
        boot = _boot_id()
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, monitor.NETLINK_NETFILTER) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        if len(raw) != 8 or not boot:
            return None
        return f"{boot}:{int.from_bytes(raw, sys.byteorder)}", monitor.generation()
    except (OSError, ValueError, struct.error):  # a short or odd netlink reply too
        return None


@cache
def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def kernel_error(err: str, *, context: str | None = None) -> KernelError:
    """libnftables' error text parsed once: its reason, and whether an object was missing."""
    return KernelError(_first_error(err), not_found=_NOT_FOUND in err, context=context)


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


def restore_values(values: Mapping[str, str], root: str = "/proc/sys") -> None:
    """Best effort: put sysctls of the caller's namespace back after a failed command."""
    for name, value in values.items():
        with contextlib.suppress(OSError):
            Path(root, name).write_text(value)


def set_sysctls(values: Mapping[str, str], root: str = "/proc/sys") -> dict[str, str]:
    """Set network sysctls of the caller's namespace; a family the kernel lacks is skipped.
    Returns the previous value of each one changed; a failure puts those back first."""
    changed: dict[str, str] = {}
    for name, value in values.items():
        p = Path(root, name)
        try:
            before = p.read_text().strip()
            if before != value:
                p.write_text(value)
                changed[name] = before
        except FileNotFoundError:
            continue
        except OSError as exc:
            for done, old in changed.items():
                with contextlib.suppress(OSError):
                    Path(root, done).write_text(old)
            raise KernelError(
                exc.strerror or str(exc), context=f"sysctl {name.replace('/', '.')}={value}"
            ) from None
    return changed


_LOAD_AND_LIST = 'nft -j -f - && exec nft -j list table inet "$1"'


def _learn(text: str, name: str, commands: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Load `commands` into a scratch namespace and list them back."""
    # nft itself first: no interpreter to start, a tenth of the time.
    batch = json.dumps({"nftables": replace_batch(name, commands)})
    proc = _scratch(["sh", "-c", _LOAD_AND_LIST, "sh", name], batch)
    if proc.returncode == 0:
        return [o for o in json.loads(proc.stdout)["nftables"] if "metainfo" not in o]
    # mtd's own loader says which command the kernel refused, as JSON facts
    proc = _scratch([sys.executable, "-m", "reconciler.adapters.kernel"], text)
    if proc.returncode == 0:
        return json.loads(proc.stdout)
    try:
        facts = json.loads(proc.stderr.strip().splitlines()[-1])
        raise KernelError(
            facts["reason"],
            index=facts["index"],
            command=facts["command"],
            not_found=facts["not_found"],
            context=facts["context"],
        )
    except (ValueError, KeyError, TypeError, IndexError):
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        raise KernelError(
            last or f"exit code {proc.returncode}", context="scratch namespace"
        ) from None


def _scratch(argv: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    """Run argv in a new, empty network namespace that disappears with it."""
    import subprocess  # once per skeleton (cached): not in every command's start-up

    return subprocess.run(
        ["unshare", "--net", *argv], input=stdin, capture_output=True, text=True, check=False
    )


def _scratch_main() -> None:
    """Runs inside `unshare --net`: load the commands, print the table as listed, or the
    refusal's facts as one JSON line on stderr."""
    request = json.load(sys.stdin)
    nft = Nft()
    try:
        nft.replace_table(request["name"], request["commands"])
    except KernelError as exc:
        facts = {
            "reason": exc.reason,
            "index": exc.index,
            "command": exc.command,
            "not_found": exc.not_found,
            "context": exc.context,
        }
        sys.stderr.write(json.dumps(facts) + "\n")
        sys.exit(3)
    json.dump(nft.list_table(request["name"]) or [], sys.stdout)


if __name__ == "__main__":
    _scratch_main()
