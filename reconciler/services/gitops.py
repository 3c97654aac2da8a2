"""GitOps pull: the desired state lives in a git repository and this host converges to it.

One round (`Puller.round`): fetch the branch; when it moved, export the new commit's state
files into a private scratch directory, load them for this host, apply them (one reconcile
pass under the reconcile lock) and only then check the commit out. So the clone's working
tree is always the last commit applied here: `mtd -s <state_dir>/repo/<path>` and the
daemon's other passes read exactly the live desired state, and a bad commit never reaches
it. A commit that fails (validation, template, kernel, signature) is recorded as rejected
with one line naming the commit, file and error, and is not retried; the next commit is.
An unreachable remote changes nothing and is retried with exponential backoff.

What happened is kept in `<state_dir>/pull.json` (for `mtd status`) and in the audit log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from reconciler import defaults
from reconciler.adapters import auditlog, files
from reconciler.adapters.credentials import redact
from reconciler.adapters.git import Entry, GitError, MalformedCommit, Repo
from reconciler.adapters.kernel import Backend
from reconciler.core import audit, diff, inventory, render
from reconciler.core.caches import NONE, Caches
from reconciler.core.state import MAX_DOCUMENT_BYTES, Local, State
from reconciler.core.state import STATE_DIR as DEFAULT_STATE_DIR
from reconciler.errors import MtdError

STATE_DIR = Path(DEFAULT_STATE_DIR)
TEMPLATES = "templates"
BACKOFF_FACTOR = 32  # an unreachable remote is retried at most every 32 intervals


class AfterApplyError(MtdError):
    """The commit is live but checking it out failed: not the commit's fault, so not
    rejected."""


class NotApplied(MtdError):
    """This host cannot take a commit now (its audit log is not writable): nothing changed,
    not the commit's fault, so not rejected; the next round retries."""


@dataclass(frozen=True)
class PullConfig:
    """Where the desired state comes from and where this host keeps its clone."""

    url: str
    branch: str = defaults.BRANCH
    path: str = ""  # the state directory inside the repository; "" is its root
    state_dir: Path = STATE_DIR
    host: str = field(default_factory=socket.gethostname)
    templates: tuple[Path, ...] = ()  # --templates directories, searched before the repo's
    verify_signatures: bool = False
    gpg_home: str | None = None
    interval: float = defaults.PULL_INTERVAL
    timeout: float = defaults.GIT_TIMEOUT  # per git command
    config: tuple[tuple[str, str], ...] = ()  # the host's local configuration documents
    # `mtd pull` run by hand: refuse a commit that would move the port of the SSH session it
    # runs in (docs/operations.md, "No lockouts") unless `force`. A daemon (`mtd run --pull`)
    # has no session.
    session_check: bool = False
    force: bool = False
    caches: Caches = NONE  # what parsing and rendering may reuse (`core.caches`)

    @property
    def clone_dir(self) -> Path:
        return Path(self.state_dir) / "repo"

    @property
    def record_path(self) -> Path:
        return Path(self.state_dir) / "pull.json"

    @property
    def state_path(self) -> Path:
        """The applied desired state (exists once a first commit has been applied)."""
        return self.clone_dir / self.path if self.path else self.clone_dir

    def local(self) -> Local:
        """The host's own settings; what comes from the repository may set none of them."""
        return Local(
            documents=self.config,
            state_dir=str(self.state_dir),
            untrusted=True,
            forbidden=(str(self.clone_dir),),
        )

    def template_dirs(self) -> list[Path]:
        """Template search path of passes between pulls: --templates, the templates the
        round that applied the commit validated (`files.keep_templates`, never the clone:
        it may hold more), the shipped ones (a round uses the new commit's own). The kept
        directory is listed even while absent, so the list stays right after a pull adds
        it (Jinja2 skips a missing directory)."""
        kept = render.RepositoryDir(files.kept_templates(self.state_dir))
        return [*self.templates, kept, *render.template_dirs()]


OutcomeStatus = Literal["applied", "unchanged", "rejected", "unreachable"]


@dataclass
class Outcome:
    """One round: `applied`, `unchanged`, `rejected` or `unreachable`.

    `new` is False when the round only found what the previous one already reported (the
    same rejected commit, a remote still unreachable): nothing to log again.
    """

    status: OutcomeStatus
    commit: str | None
    message: str
    new: bool = True
    problems: list[str] = field(default_factory=list)
    result: Any = None  # reconcile.Result of an applied (or checked) commit
    state: State | None = None  # the desired state now applied
    audit_error: str | None = None  # applied, but its audit line could not be written

    @property
    def ok(self) -> bool:
        return self.status in ("applied", "unchanged")


class Puller:
    """Pull rounds against one repository and branch; keeps the backoff between rounds."""

    def __init__(self, config: PullConfig) -> None:
        config = dataclasses.replace(config, path=check_path(config.path))
        self.config = config
        self.repo = Repo(config.clone_dir, timeout=config.timeout)
        unreachable = read_record(config.record_path).get("unreachable") or {}
        self.failures = int(unreachable.get("failures", 0))
        self.show_mapping = False  # what `show` gets: map element changes or their counts

    def next_delay(self) -> float:
        """Seconds until the next round: the interval, or, while the remote is unreachable,
        a doubling delay (capped, with jitter so a fleet does not retry in lockstep)."""
        interval = self.config.interval
        if self.failures == 0:
            return interval
        # redis-py's equal-jitter backoff, as the bus uses (only its pure backoff module)
        from redis.backoff import EqualJitterBackoff

        backoff = EqualJitterBackoff(cap=interval * BACKOFF_FACTOR, base=interval)
        return max(interval, backoff.compute(self.failures))

    def round(
        self,
        nft: Backend,
        *,
        check: bool = False,
        show: Callable[[str], None] | None = None,
        secret: bytes | None = None,
    ) -> Outcome:
        """Fetch; when the branch moved, validate, apply (or only report with `check`) and
        record the new commit. Takes the reconcile lock for the apply: do not hold it.
        `secret`: the one `mtd run` loaded (default: read, or created, from the state's)."""
        with files.file_lock(self.config.state_dir / "pull.lock"):
            return self._round(nft, check=check, show=show, secret=secret)

    def _round(
        self,
        nft: Backend,
        *,
        check: bool,
        show: Callable[[str], None] | None,
        secret: bytes | None = None,
    ) -> Outcome:
        cfg = self.config
        rec = read_record(cfg.record_path)
        rec["remote"] = {"url": redact(cfg.url), "branch": cfg.branch, "path": cfg.path}
        rec["host"] = cfg.host
        try:
            self.repo.ensure(cfg.url, only=cfg.path)
            head = self.repo.fetch(cfg.branch)
        except MalformedCommit as exc:
            if exc.commit is None:  # the remote's tip unknown: as if unreachable
                return self._unreachable(rec, exc)
            return self._malformed(rec, exc, exc.commit, check=check)
        except GitError as exc:
            return self._unreachable(rec, exc)
        self.failures = 0
        rec["unreachable"] = None
        rec["head"] = head
        applied = (rec.get("applied") or {}).get("commit")
        rejected = rec.get("rejected") or {}
        # A commit applied by an earlier version has no kept templates (`keep_templates`):
        # it is validated and applied again once, so later renders read what a round read.
        kept = (rec.get("applied") or {}).get("kept_templates")
        if not check and head == applied and self.repo.head() == head and kept:
            _write_record(cfg.record_path, rec)
            return Outcome("unchanged", head, f"ok: commit {head[:12]} is applied", new=False)
        if not check and head == rejected.get("commit"):
            return self._rejected_before(rec, head)
        problems: list[str] = []
        try:
            state, result, audit_error = self._apply(
                head, nft, check=check, show=show, secret=secret
            )
        except (AfterApplyError, NotApplied):
            raise
        except MtdError as exc:
            problems = [f"commit {head[:12]}: {p}" for p in exc.problems] or [
                f"commit {head[:12]}: rejected"
            ]
        except Exception as exc:  # nothing in a commit may crash the puller (or the daemon)
            problems = [f"commit {head[:12]}: internal error: {type(exc).__name__}: {exc}"]
        if problems:
            return self._rejected(rec, head, problems, check=check)
        if check:
            return Outcome("applied", head, f"{result.line()} commit {head[:12]}", result=result)
        rec["applied"] = {
            "commit": head,
            "time": audit.timestamp(auditlog.now()),
            "epoch": result.epoch,
            "result": result.status,
            "fingerprint": result.fingerprint,
            "audit_error": audit_error,
            "kept_templates": True,
        }
        _write_record(cfg.record_path, rec)
        message = f"{result.line()} commit {head[:12]}"
        return Outcome(
            "applied",
            head,
            f"{message}; {audit_error}" if audit_error else message,
            result=result,
            state=state,
            audit_error=audit_error,
            problems=[audit_error] if audit_error else [],
        )

    def _unreachable(self, rec: dict[str, Any], exc: GitError) -> Outcome:
        """The remote could not be read: keep the state, back off (`next_delay`)."""
        self.failures += 1
        since = (rec.get("unreachable") or {}).get("since") or audit.timestamp(auditlog.now())
        rec["unreachable"] = {"since": since, "error": str(exc), "failures": self.failures}
        _write_record(self.config.record_path, rec)
        return Outcome(
            "unreachable", None, f"{exc} (keeping the current state)", new=self.failures == 1
        )

    def _malformed(
        self, rec: dict[str, Any], exc: MalformedCommit, head: str, *, check: bool
    ) -> Outcome:
        """The tip itself holds an object git refuses: that commit is rejected, once (the
        remote was reached: no back-off), and the next commit pushed is fetched."""
        self.failures = 0
        rec["unreachable"] = None
        rec["head"] = head
        if not check and (rec.get("rejected") or {}).get("commit") == head:
            return self._rejected_before(rec, head)
        return self._rejected(rec, head, [f"commit {head[:12]}: {exc}"], check=check)

    def _rejected_before(self, rec: dict[str, Any], head: str) -> Outcome:
        """A commit rejected by an earlier round: said again, never tried again."""
        _write_record(self.config.record_path, rec)
        rejected = rec["rejected"]
        return Outcome(
            "rejected",
            head,
            rejected.get("error", f"commit {head[:12]}: rejected"),
            new=False,
            problems=list(rejected.get("problems") or []),
        )

    def _rejected(
        self, rec: dict[str, Any], head: str, problems: list[str], *, check: bool
    ) -> Outcome:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        message = problems[0] + more
        if check:
            return Outcome("rejected", head, message, problems=problems)
        rec["rejected"] = {
            "commit": head,
            "time": audit.timestamp(auditlog.now()),
            "error": message,
            "problems": problems[:20],
        }
        _write_record(self.config.record_path, rec)
        self._audit_rejection(head, message)
        return Outcome("rejected", head, message, problems=problems)

    def _apply(
        self,
        commit: str,
        nft: Backend,
        *,
        check: bool,
        show: Callable[[str], None] | None,
        secret: bytes | None = None,
    ) -> tuple[State, Any, str | None]:
        """The commit's state and pass result, and why its audit line failed, if it did.

        The order keeps a commit either rejected, not applied, or live and checked out:
        never live but not checked out because of the audit log (the daemon's next pass
        would then restore the previous commit, and the next round re-apply this one)."""
        from reconciler.services.reconcile import (  # late: imports the nftables bindings
            Audit,
            PassOutcome,
            PassRequest,
            provision_secret,
            run_pass,
        )

        cfg = self.config
        if cfg.verify_signatures:
            self.repo.verify_commit(commit, cfg.gpg_home)
        retries = f"commit {commit[:12]} not applied; the next round retries"

        def secret_for(state: State) -> bytes:
            if secret is not None:
                return secret
            if check:  # --check: read it, never create it
                return files.load_secret(state.secret_file)
            try:
                return provision_secret(state, nft)
            except MtdError as exc:
                raise NotApplied(*exc.problems, retries) from None

        def taken(state: State, templates: list[Path], out: PassOutcome) -> None:
            if check:
                return
            try:
                kept = next((d for d in templates if isinstance(d, render.RepositoryDir)), None)
                files.keep_templates(cfg.state_dir, kept, commit)
                self.repo.checkout(commit)
            except MtdError as exc:
                raise AfterApplyError(
                    *exc.problems, f"commit {commit[:12]} is live; the next round retries"
                ) from None

        with self.candidate(commit) as (state, templates):
            if not check:
                try:
                    auditlog.check_writable(state.audit_log)
                except MtdError as exc:
                    raise NotApplied(*exc.problems, retries) from None
            outcome = run_pass(
                PassRequest(
                    state,
                    nft,
                    secret=functools.partial(secret_for, state),
                    check=check,
                    session=(
                        functools.partial(self._session_check, commit, state, nft=nft)
                        if cfg.session_check and not check
                        else None
                    ),
                    templates=templates,
                    caches=cfg.caches,
                    taken=functools.partial(taken, state, templates),
                    audit=Audit("pull", cfg.host, commit, always=True, tolerate=True),
                )
            )
        result, audit_error = outcome.result, outcome.audit_error
        if show:
            for line in diff.brief(result.changes, show_mapping=self.show_mapping):
                show(line)
        return state, result, audit_error

    def _session_check(
        self, commit: str, state: State, secret: bytes, epoch: int, *, nft: Backend
    ) -> bool:
        """The SSH-session check (`services.lockout`); the applied commit's state (the
        checkout) tells where the session's client finds its port now. A refusal is not the
        commit's fault: it is not applied, and the next round (or a --force) tries again."""
        from reconciler.services import lockout

        cfg = self.config
        earlier = []
        with contextlib.suppress(MtdError):
            if cfg.state_path.exists():
                earlier.append(
                    files.load_state(cfg.state_path, cfg.host, cfg.local(), kept=cfg.caches)
                )
        try:
            return lockout.check(
                state, secret, epoch, nft, host=cfg.host, force=cfg.force, earlier=earlier
            )
        except MtdError as exc:
            raise NotApplied(
                *exc.problems, f"commit {commit[:12]} not applied; the next round retries"
            ) from None

    @contextlib.contextmanager
    def candidate(self, commit: str, host: str | None = None) -> Iterator[tuple[State, list[Path]]]:
        """`with puller.candidate(sha) as (state, templates)`: the commit's desired state for
        this host, from a private scratch copy; errors name files as in the repository."""
        cfg = self.config
        with files.scratch_dir(cfg.state_dir, ".candidate-") as tmp:
            yield from self._candidate(commit, host, tmp)

    def _candidate(
        self, commit: str, host: str | None, tmp: Path
    ) -> Iterator[tuple[State, list[Path]]]:
        cfg = self.config
        try:
            carried = export(self.repo, commit, cfg.path, tmp)
            state = files.load_state(tmp, host or cfg.host, cfg.local(), kept=cfg.caches)
            if carried and not state.repository_templates:
                raise MtdError(
                    f"{carried[0]}: a template in the state repository: expected none (this "
                    "host takes templates from its own directories; its local configuration "
                    "may allow the repository's: repository_templates: true)"
                )
            kept = [render.RepositoryDir(d) for d in files.state_templates(tmp)]
            templates = [*cfg.templates, *kept, *render.template_dirs()]
            yield state, templates
        except MtdError as exc:
            prefix = cfg.path.strip("/") + "/" if cfg.path.strip("/") else ""
            lines = [
                p.replace(f"{tmp}/", prefix).replace(str(tmp), prefix or ".") for p in exc.problems
            ]
            raise exc.reworded(lines) from None

    def state_at(self, commit: str, host: str | None = None) -> State:
        """The desired state a host had at `commit` (for `mtd history --mapping-at`)."""
        with self.candidate(commit, host) as (state, _):
            return state

    def _audit_rejection(self, commit: str, message: str) -> None:
        """A rejected commit goes to the audit log of the state still applied, if any."""
        try:
            cfg = self.config
            state = files.load_state(cfg.state_path, cfg.host, cfg.local(), kept=cfg.caches)
        except MtdError:
            return
        try:
            auditlog.record(
                state.audit_log,
                host=self.config.host,
                origin="pull",
                epoch=None,
                result="rejected",
                fingerprint=None,
                commit=commit,
                error=message,
            )
        except MtdError:
            return  # the rejection is in pull.json and the log line: nothing changed


def export(repo: Repo, commit: str, path: str, dest: Path) -> list[str]:
    """Write the commit's state files (and its templates/ directory) below `path` to `dest`;
    returns every file of the tree under templates/ (in sub-folders and dotfiles too)."""
    base = path.strip("/")
    parts = PurePosixPath(base).parts if base else ()
    for i in range(len(parts)):  # the state directory itself, and each one above it
        above = "/".join(parts[: i + 1])
        entry = repo.entry(commit, above)
        if entry is not None and entry.mode != "040000":
            raise MtdError(
                f"{above}: not a directory (mode {entry.mode}): expected the state directory "
                "(symbolic links are refused: the checkout would differ from what was validated)"
            )
    wanted, carried = [], []
    tree = repo.files(commit, base)  # what the (sparse) checkout writes, once applied
    _check_checkout(tree)
    for entry in tree:
        rel = entry.path[len(base) + 1 :] if base else entry.path
        if entry.mode in ("120000", "160000"):
            # A link (to a directory, too) or a submodule: the checkout would show other
            # content than the blobs validated here.
            raise MtdError(
                f"{entry.path}: a {'symbolic link' if entry.mode == '120000' else 'submodule'} "
                f"(mode {entry.mode}): expected only regular files in the state directory"
            )
        if {"..", ".", ""} & set(rel.split("/")):  # git's fsck refuses these too
            raise MtdError(f"{entry.path!r}: a path out of the state directory: expected a name")
        if rel.split("/")[0] == TEMPLATES:
            carried.append(entry.path)
        if not (inventory.kind(rel) or _is_template(rel)):
            continue
        if not entry.is_file:
            raise MtdError(f"{entry.path}: not a regular file (mode {entry.mode}): expected one")
        if entry.size is not None and entry.size > MAX_DOCUMENT_BYTES:
            raise MtdError(
                f"{entry.path}: {entry.size} bytes: expected at most {MAX_DOCUMENT_BYTES} "
                "in a state file or template"
            )
        wanted.append((rel, entry))
    if not any(inventory.kind(rel) for rel, _ in wanted):
        where = f"{base}/" if base else "the repository root"
        raise MtdError(f"{where}: no *.yaml files: expected the desired state here")
    total = sum(e.size or 0 for _, e in wanted)
    if total > MAX_EXPORT_BYTES:
        where = f"{base}/" if base else "the repository root"
        raise MtdError(
            f"{where}: {len(wanted)} state files and templates of {total} bytes in all: "
            f"expected at most {MAX_EXPORT_BYTES} (the same blob under many names is read "
            "once per name)"
        )
    for (rel, _), blob in zip(wanted, repo.blobs([e.oid for _, e in wanted]), strict=True):
        files.write_private(dest / rel, blob)
    return carried


# Bounds of what a round reads and the checkout writes, checked before anything is
# applied: a checkout that fails after the apply would leave the commit live but never
# recorded, retried every round. Generous for a state repository.
MAX_EXPORT_BYTES = 2 * MAX_DOCUMENT_BYTES  # state files and templates, read in memory
MAX_TREE_FILES = 100_000  # files the checkout writes
MAX_TREE_BYTES = 1 << 30  # and their bytes, on the disk of /var/lib/mtd
NAME_MAX, PATH_MAX = 255, 3_800  # bytes; PATH_MAX leaves room for the clone's own path


def _check_checkout(tree: list[Entry]) -> None:
    """Every name the checkout would write fits the file system, and the whole fits the
    bounds above."""
    if len(tree) > MAX_TREE_FILES:
        raise MtdError(
            f"{len(tree)} files: expected at most {MAX_TREE_FILES} in the state directory"
        )
    total = 0
    for entry in tree:
        if not entry.path.isprintable():  # git takes any byte but NUL and / in a name
            raise MtdError(
                f"{_short(repr(entry.path))}: a name with a line break or a control character: "
                "expected names of printable characters (an error names its file in one line)"
            )
        raw = entry.path.encode(errors="surrogateescape")
        longest = max(len(part) for part in raw.split(b"/"))
        if longest > NAME_MAX or len(raw) > PATH_MAX:
            what = f"a name of {longest} bytes" if longest > NAME_MAX else f"{len(raw)} bytes"
            limit = f"{NAME_MAX} per name" if longest > NAME_MAX else f"{PATH_MAX} in all"
            raise MtdError(
                f"{entry.path[:60]!r}...: {what}: expected at most {limit} (the checkout "
                "could not write it)"
            )
        total += entry.size or 0
    if total > MAX_TREE_BYTES:
        raise MtdError(
            f"{len(tree)} files of {total} bytes in all: expected at most {MAX_TREE_BYTES} "
            "in the state directory"
        )


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def _is_template(rel: str) -> bool:
    p = PurePosixPath(rel)
    return len(p.parts) == 2 and p.parts[0] == TEMPLATES and not p.name.startswith(".")


def check_path(path: str) -> str:
    """`mtd/`, `./mtd` -> `mtd`; "" or "." is the repository root."""
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts:
        raise MtdError(f"--path {path!r}: expected a directory inside the repository")
    return "" if str(p) == "." else str(p)


def read_record(path: str | Path) -> dict[str, Any]:
    """pull.json; a missing or unreadable one is a fresh start (the next round re-applies)."""
    data = files.read_json(path)
    return data if isinstance(data, dict) else {}


def _write_record(path: Path, rec: dict[str, Any]) -> None:
    files.write_atomic(path, json.dumps(rec, indent=1, sort_keys=True) + "\n")


def summary(rec: Mapping[str, Any]) -> dict[str, Any]:
    """What `mtd status` shows of pull.json: applied commit, rejected head, remote trouble."""
    applied = rec.get("applied") or {}
    rejected = rec.get("rejected") or {}
    head = rec.get("head")
    unreachable = rec.get("unreachable") or None
    head_rejected = head is not None and head == rejected.get("commit")
    return {
        "remote": rec.get("remote"),
        "head": head,
        "applied": applied.get("commit"),
        "applied_at": applied.get("time"),
        "rejected": rejected.get("commit"),
        "rejected_at": rejected.get("time"),
        "error": rejected.get("error") if head_rejected else None,
        "unreachable": unreachable,
        "healthy": bool(head) and head == applied.get("commit") and not unreachable,
    }


def summary_lines(rec: Mapping[str, Any]) -> list[str]:
    s = summary(rec)
    remote = s["remote"] or {}
    where = f"{remote.get('url')} {remote.get('branch')}" + (
        f" ({remote['path']}/)" if remote.get("path") else ""
    )
    applied = (
        f"commit {s['applied'][:12]} applied {s['applied_at']}"
        if s["applied"]
        else "nothing applied"
    )
    out = [f"pull: {where}: {applied}"]
    if s["error"]:
        out.append(f"pull: head rejected since {s['rejected_at']}: {s['error']}")
    if s["unreachable"]:
        u = s["unreachable"]
        out.append(
            f"pull: remote unreachable since {u.get('since')} ({u.get('failures')} tries): "
            f"{u.get('error')}"
        )
    return out
