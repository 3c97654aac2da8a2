"""Local files: desired-state YAML, the shuffle secret, the epoch, the reconcile lock.

Adapter: with `auditlog` (the audit log), `git` (the clone), `cachedir` (the caches) and
the kernel adapter (sysctls), the only code that reads or writes the host's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import hmac
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reconciler import __version__
from reconciler.adapters.credentials import redact
from reconciler.core import inventory
from reconciler.core.caches import NONE, Caches
from reconciler.core.shuffle import MAX_EPOCH
from reconciler.core.state import Local, State, parse
from reconciler.defaults import YAML_SUFFIXES
from reconciler.errors import MtdError

SECRET_BYTES = 32
DEFAULT_CONFIG = "/etc/mtd/mtd.yaml"


def state_documents(
    path: str | Path, host: str | None = None, skip: Path | None = None
) -> list[tuple[str, str]]:
    """A YAML file, or every YAML file directly in a directory, in name order; `skip` (the
    host's configuration file, which the unit keeps in /etc/mtd with the state) excepted.

    An inventory directory (with groups/ or hosts/, see `inventory`) gives the documents
    that apply to `host` (default: this machine's name), in merge order, as written (a
    group's `hosts:` key included: `load_state` removes it).
    """
    p = Path(path)
    docs = inventory_documents(p)
    if docs is not None:
        texts = {f"{p}/{rel}": text for rel, text in docs}
        return [(name, texts[name]) for name, _ in inventory.select(docs, _host(host), str(p))]
    if p.is_dir():
        files = sorted(
            f
            for f in p.iterdir()
            if f.suffix in YAML_SUFFIXES and f.is_file() and not _same(f, skip)
        )
        if not files:
            raise MtdError(f"{p}: no *.yaml files: expected the desired state here")
    elif p.exists():
        files = [p]
    else:
        raise MtdError(f"{p}: no such file or directory: expected a YAML file or a directory")
    return [(str(f), _read_text(f)) for f in files]


def load_state(
    path: str | Path,
    host: str | None = None,
    local: Local | None = None,
    config: str | Path | None = None,
    kept: Caches = NONE,
) -> State:
    """The desired state; of `host` (default: this machine's name) in an inventory; with
    the host's own settings `local` (see `local_config`), read from `config` (default
    `DEFAULT_CONFIG`), which is not also read as state when it sits in the state directory.
    `kept`: the caches of parsed states and schema verdicts the caller chose to use (found
    by the texts themselves; only recorded by the caller, after the command's checks).
    Errors quote bad values, which may be a URL with a password (`redis.url`): masked here."""
    try:
        docs = inventory_documents(path)
        if docs is not None:
            return inventory.state_for(docs, _host(host), str(path), local, kept.verdicts)
        docs = state_documents(path, skip=Path(config or DEFAULT_CONFIG))
        key = parsed_key(docs, local)
        state = parse(docs, local, kept.verdicts, kept.parsed.get(key))
        return dataclasses.replace(state, parsed_key=key) if state.parsed_json else state
    except MtdError as exc:
        raise type(exc)(*(redact(p) for p in exc.problems)) from None


def _same(a: Path, b: Path | None) -> bool:
    try:
        return b is not None and a.samefile(b)
    except OSError:
        return False


def local_config(path: str | Path | None) -> list[tuple[str, str]]:
    """The host's configuration file as documents for `state.Local`. `None` is the default
    file (`DEFAULT_CONFIG`), which may be absent; a file named explicitly must exist."""
    p = Path(path or DEFAULT_CONFIG)
    try:
        st = p.stat()
    except FileNotFoundError:
        if path is None:
            return []
        raise MtdError(f"{p}: no such configuration file (--config)") from None
    except OSError as exc:
        raise MtdError(f"{p}: cannot read the configuration: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MtdError(f"{p}: not a regular file: expected the host's YAML configuration")
    return [(str(p), _read_text(p))]


def inventory_documents(path: str | Path) -> list[tuple[str, str]] | None:
    """Every state file of an inventory directory as (relative path, text); None when the
    path is not an inventory (a file, or a directory without groups/ or hosts/)."""
    p = Path(path)
    if not p.is_dir():
        return None
    rels = [f.name for f in p.iterdir() if f.is_file()]
    for sub in (inventory.GROUPS, inventory.HOSTS):
        if (p / sub).is_dir():
            rels += [f"{sub}/{f.name}" for f in (p / sub).iterdir() if f.is_file()]
    docs = [(rel, "") for rel in sorted(rels) if inventory.kind(rel)]
    if not inventory.is_inventory(docs):
        return None
    return [(rel, _read_text(p / rel)) for rel, _ in docs]


def inventory_hosts(path: str | Path) -> list[str] | None:
    """The hosts an inventory directory names; None when the path is not an inventory."""
    docs = inventory_documents(path)
    return None if docs is None else inventory.hosts(docs, str(path))


def state_templates(path: str | Path) -> list[Path]:
    """A `templates/` directory kept next to the state files (in the state repository)."""
    t = Path(path) / "templates"
    return [t] if Path(path).is_dir() and t.is_dir() else []


KEPT_TEMPLATES = "repo-templates"  # in the state directory: the applied commit's templates


def kept_templates(state_dir: str | Path) -> Path:
    """Where the applied commit's templates are kept, as its pull round validated them
    (`keep_templates`): what every later render of that commit reads, never the clone."""
    return Path(state_dir) / KEPT_TEMPLATES


def keep_templates(state_dir: str | Path, source: Path | None, commit: str) -> None:
    """Keep a private copy of the templates a round validated (`source`, None: the commit
    has none) for the commit it applied: a directory per commit, and a link to it swapped
    in one rename, so a render reads one commit's whole set or the other's."""
    import shutil

    link = kept_templates(state_dir)
    old = os.readlink(link) if os.path.islink(link) else None
    target = None
    try:
        if source is not None and source.is_dir():
            target = f".{KEPT_TEMPLATES}-{commit}"
            dest = Path(state_dir) / target
            shutil.rmtree(dest, ignore_errors=True)
            private_dir(dest)
            for f in sorted(source.iterdir()):
                if f.is_file() and not f.is_symlink():
                    write_private(dest / f.name, f.read_bytes())
            tmp = link.with_name(f".{KEPT_TEMPLATES}.tmp")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(target, tmp)
            os.replace(tmp, link)
        elif old is not None or link.exists():
            os.unlink(link)
    except OSError as exc:
        raise MtdError(
            f"{link}: cannot keep the commit's templates: {exc.strerror or exc}"
        ) from None
    if old is not None and old != target and "/" not in old:
        shutil.rmtree(Path(state_dir) / old, ignore_errors=True)


def _host(host: str | None) -> str:
    return host or socket.gethostname()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MtdError(f"{path}: cannot read: {exc}") from None


def private_dir(directory: str | Path) -> None:
    """Create `directory` and each missing level above it 0700: `mkdir(parents=True)` would
    give the levels above the umask's mode (a `cache/` readable by all, say)."""
    missing: list[Path] = []
    d = Path(directory)
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for level in reversed(missing):
        level.mkdir(mode=0o700, exist_ok=True)


def open_own(path: str | Path, flags: int, what: str, mode: int = 0o600) -> int:
    """Open one of mtd's own files: never through a symbolic link (the file itself or its
    directory), its directory created private when missing; a failure is one line (but
    `FileExistsError` of an `O_EXCL` create is the caller's to handle)."""
    p = Path(path)
    try:
        private_dir(p.parent)
    except OSError as exc:
        raise MtdError(f"{p}: cannot create its directory: {exc.strerror or exc}") from None
    if os.path.islink(p.parent):
        raise MtdError(f"{p}: {p.parent} is a symbolic link: expected a directory")
    try:
        return os.open(p, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        raise MtdError(f"{p}: cannot open the {what}: it exists") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MtdError(f"{p}: {what} is a symbolic link: expected a regular file") from None
        raise MtdError(f"{p}: cannot open the {what}: {exc.strerror or exc}") from None


def load_secret(path: str | Path, *, create: bool = False) -> bytes:
    """The shuffle key. With `create` (only `apply`, `rotate` and `run`: the commands that
    change the table) a missing one is made with 32 random bytes and mode 0600; read-only
    commands never write, and say in one line that there is no secret yet."""
    p = Path(path)
    if create:
        try:
            fd = open_own(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "secret file")
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(SECRET_BYTES))  # what secrets.token_bytes reads
    elif not p.exists() and not p.is_symlink():
        raise MtdError(f"{p}: no secret file yet: `mtd apply` creates it (this command only reads)")
    return read_private_key(p, "secret file")


def secret_problem(path: str | Path, loaded: bytes) -> str | None:
    """Why the secret file no longer holds the secret a daemon loaded; None when it does."""
    try:
        current = read_private_key(path, "secret file")
    except MtdError as exc:
        return exc.problems[0]
    if not hmac.compare_digest(current, loaded):
        return f"{path}: the secret file changed since it was loaded"
    return None


def daemon_status_path(epoch_file: str | Path) -> Path:
    """What a running `mtd run` wants `mtd status` to show (next to the epoch file)."""
    return Path(epoch_file).with_name("daemon.json")


def read_daemon_status(epoch_file: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(daemon_status_path(epoch_file).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def read_private_key(path: str | Path, what: str, *, strip: bool = False) -> bytes:
    """A key file only its owner may read, holding at least 16 bytes; never echoed.

    A key readable by anyone else is refused rather than silently fixed, so that a leak is
    noticed. Never read through a symbolic link. With `strip`, surrounding whitespace is
    not part of the key.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MtdError(f"{p}: no such {what}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MtdError(f"{p}: {what} is a symbolic link: expected a regular file") from None
        raise MtdError(f"{p}: cannot read the {what}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise MtdError(f"{p}: {what} is not a regular file")
        if st.st_mode & 0o077:
            raise MtdError(
                f"{p}: {what} has mode {stat.S_IMODE(st.st_mode):04o}: expected 0600 "
                f"(run: chmod 600 {p})"
            )
        try:
            key = f.read(1 << 16)
        except OSError as exc:
            raise MtdError(f"{p}: cannot read the {what}: {exc.strerror}") from None
    key = key.strip() if strip else key
    if len(key) < 16:
        raise MtdError(f"{p}: {what} holds {len(key)} bytes: expected at least 16")
    return key


def read_epoch(path: str | Path) -> int:
    """The local epoch; 0 before the first rotation."""
    p = Path(path)
    try:
        with os.fdopen(os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as f:
            data = json.loads(f.read(4096))
        epoch = data["epoch"]
        if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
            raise ValueError
        return epoch
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise MtdError(
            f'{p}: unreadable epoch file: expected {{"epoch": N}} with 0 <= N <= {MAX_EPOCH} '
            "(2**40; see docs/fleet.md, Recovering the fleet epoch)"
        ) from None


def write_epoch(path: str | Path, epoch: int) -> None:
    """Atomically (write then rename), so a crash never leaves a torn epoch file."""
    if not 0 <= epoch <= MAX_EPOCH:
        raise MtdError(
            f"{path}: epoch {epoch}: past the ceiling {MAX_EPOCH} (2**40; see docs/fleet.md, "
            "Recovering the fleet epoch)"
        )
    write_atomic(path, json.dumps({"epoch": epoch}) + "\n")


def write_atomic(path: str | Path, text: str, mode: int = 0o644, *, sync: bool = True) -> None:
    """Write a temporary file of our own (never through a link), then rename it over;
    `sync`: on disk before the rename (state that must survive a crash, not a cache)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a crash; unlink never follows a link
    fd = open_own(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "file", mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        raise MtdError(f"{p}: cannot write: {exc.strerror or exc}") from None


def write_private(path: Path, data: bytes) -> None:
    """A file only this user can reach (its directories made 0700)."""
    private_dir(path.parent)
    path.write_bytes(data)


def read_json(path: str | Path) -> Any:
    """A JSON file's value; None when it is missing or unreadable (callers start fresh)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def scratch_dir(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A private temporary directory under `parent`, removed when the block ends."""
    import shutil  # with tempfile, only here: not on every command's start-up
    import tempfile

    private_dir(parent)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reconcile_lock(
    epoch_file: str | Path, *, shared: bool = False
) -> contextlib.AbstractContextManager[None]:
    """One reconcile at a time per host (daemon, CLI, pull), even across processes.

    `shared`: for read-only commands, which must write nothing: they wait for a pass in
    progress, but create no lock file (none means no writer has ever run here).
    """
    path = Path(epoch_file).with_name("lock")
    return read_lock(path) if shared else file_lock(path)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive flock on `path`, released when the block ends or the process dies."""
    fd = open_own(path, os.O_RDWR | os.O_CREAT, "lock file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def parsed_key(docs: list[tuple[str, str]], local: Local | None) -> str:
    """What a parse depends on: mtd's version and every document's name and text."""
    every = [*(local.documents if local else ()), *docs]
    text = f"{__version__}\0{every!r}"
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def read_lock(path: str | Path) -> Iterator[None]:
    """A shared flock on `path` if it exists (and can be opened); nothing otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def sysctl_record(epoch_file: str | Path) -> Path:
    """Where the values mtd replaced are kept, so `mtd down` can put them back."""
    return Path(epoch_file).with_name("sysctls.json")


def remember_sysctls(record: Path, previous: dict[str, str]) -> None:
    """Add the values found before mtd first changed them; a value already kept stays (the
    first one is the host's own)."""
    if not previous:
        return
    kept = read_sysctl_record(record)
    if previous.keys() <= kept.keys():
        return
    write_atomic(record, json.dumps(previous | kept, sort_keys=True) + "\n", mode=0o600)


def read_sysctl_record(record: Path) -> dict[str, str]:
    try:
        data = json.loads(record.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        raise MtdError(
            f'{record}: unreadable: expected {{"net/ipv4/fwmark_reflect": "0", ...}}'
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and k.startswith("net/") and ".." not in k and isinstance(v, str)
        for k, v in data.items()
    ):
        raise MtdError(f"{record}: expected net/* sysctl names and their previous values")
    return data


def restore_sysctls(
    record: Path, values: dict[str, str], root: str = "/proc/sys"
) -> dict[str, str] | None:
    """Put back the values `record` kept, where a sysctl still has the value mtd set (else
    someone else changed it since: left alone). None when there is no record: mtd never
    changed them here."""
    kept = read_sysctl_record(record)
    if not record.exists():
        return None
    restored = {}
    for name, previous in kept.items():
        p = Path(root, name)
        try:
            if p.read_text().strip() == values.get(name):
                p.write_text(previous)
                restored[name] = previous
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise MtdError(
                f"sysctl {name.replace('/', '.')}={previous}: cannot restore: {exc.strerror}"
            ) from None
    record.unlink()
    return restored
