"""The only module that runs git: a local clone that follows one branch of a remote.

Shell module. Every command runs without a terminal (`GIT_TERMINAL_PROMPT=0`, a session of
its own), with a time limit, and fails as one `GitError` line with any password in a URL
masked. The checkout is always detached at a fetched commit, so a force-push or a rewritten
history is just another commit to check out: there is no local branch to merge into.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler import defaults
from reconciler.adapters import files
from reconciler.adapters.credentials import redact
from reconciler.errors import GitError

TIMEOUT = defaults.GIT_TIMEOUT
_FOREGROUND = ("-c", "gc.autoDetach=false", "-c", "maintenance.autoDetach=false")
_SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")


_FSCK = "fsck error"  # what git says of an object its fsck refuses, whatever the check


class MalformedCommit(GitError):
    """The branch's tip holds an object git's fsck refuses (`commit`: its id, if known)."""

    def __init__(self, message: str, *, commit: str | None) -> None:
        super().__init__(message)
        self.commit = commit


@dataclass(frozen=True)
class Entry:
    """One file of a commit's tree."""

    path: str
    mode: str
    oid: str
    size: int | None = None  # bytes of a blob, when listed with sizes

    @property
    def is_file(self) -> bool:
        return self.mode in ("100644", "100755")


class Repo:
    """A clone at `path` with one remote, `origin`."""

    def __init__(self, path: str | Path, timeout: float = TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def git(
        self,
        *args: str,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        what: str | None = None,
    ) -> bytes:
        """Run `git -C path ARGS`; stdout as bytes, or a `GitError` naming what failed."""
        what = what or f"git {args[0]}"
        rc, out, err = self._run(args, input, env, what)
        if rc != 0:
            raise GitError(f"{what}: {_one_line(err)}")
        return out

    def _run(
        self,
        args: Sequence[str],
        input: bytes | None,
        env: Mapping[str, str] | None,
        what: str,
    ) -> tuple[int, bytes, str]:
        full = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", **(env or {})}
        # A session of its own: no terminal for ssh to prompt on, and a timeout also stops the
        # helpers git started (ssh, https). Housekeeping runs in the foreground, inside the
        # time limit, never as a process left behind.
        try:
            proc = subprocess.Popen(
                ["git", "-C", str(self.path), *_FOREGROUND, *args],
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise GitError(f"{what}: git is not installed (apt-get install git)") from None
        try:
            out, err = proc.communicate(input, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise GitError(f"{what}: timed out after {self.timeout:g} s") from None
        return proc.returncode, out, err.decode(errors="replace")

    def ensure(self, url: str, only: str = "") -> None:
        """A clone whose origin is `url` (created empty; `fetch` fills it), whose checkout
        writes each blob byte for byte and, with `only`, that directory alone."""
        if not (self.path / ".git").is_dir():
            files.private_dir(self.path)
            self.git("init", "-q", what=f"git init {self.path}")
            self.git("remote", "add", "origin", url, what="git remote add")
        elif self.url() != url:
            self.git("remote", "set-url", "origin", url, what="git remote set-url")
        info = self.path / ".git" / "info"
        info.mkdir(mode=0o700, exist_ok=True)
        _keep_text(info / "attributes", _ATTRIBUTES)
        if _keep_text(info / "sparse-checkout", _sparse(only)):
            self.git("config", "core.sparseCheckout", "true", what="git config")

    def url(self) -> str | None:
        try:
            return self.git("remote", "get-url", "origin").decode().strip()
        except GitError:
            return None

    def fetch(self, branch: str) -> str:
        """Fetch `branch` (forced: a rewritten history replaces the old one); its commit.

        Objects are checked (`fetch.fsckObjects`): a malformed tree (a `..` or `.git` name)
        is refused. One anywhere in the history would refuse every later fetch too, and
        hold the fleet at its commit until someone rewrote the history: then only the tip
        is fetched (`--depth 1`, the clone shallow from there on). A malformed tip itself
        is `MalformedCommit`, named, so a round rejects that commit and takes the next."""
        ref = f"refs/remotes/origin/{branch}"
        what = f"git fetch {redact(self.url() or 'origin')} {branch}"
        args = [
            "-c",
            "fetch.fsckObjects=true",
            "fetch",
            "--quiet",
            "--prune",
            "--no-tags",
            "--no-recurse-submodules",
        ]
        spec = ["origin", f"+refs/heads/{branch}:{ref}"]
        rc, _, err = self._run([*args, *spec], None, None, what)
        if rc != 0 and _FSCK in err:
            rc, _, err = self._run([*args, "--depth", "1", *spec], None, None, what)
            if rc != 0 and _FSCK in err:
                raise MalformedCommit(
                    f"{what}: {_one_line(err)}: expected only objects git's fsck accepts (no "
                    "tree entry named .git or ..)",
                    commit=self._remote_tip(branch, what),
                )
        if rc != 0:
            raise GitError(f"{what}: {_one_line(err)}")
        return self.resolve(ref)

    def _remote_tip(self, branch: str, what: str) -> str | None:
        """The commit `branch` points at on the remote, without fetching any object."""
        rc, out, _ = self._run(["ls-remote", "origin", f"refs/heads/{branch}"], None, None, what)
        tip = out.decode(errors="replace").split("\t", 1)[0].strip() if rc == 0 else ""
        return tip if _SHA.match(tip) else None

    def resolve(self, rev: str) -> str:
        out = self.git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", what=rev)
        return out.decode().strip()

    def head(self) -> str | None:
        """The checked-out commit; None in a fresh clone."""
        try:
            return self.resolve("HEAD")
        except GitError:
            return None

    def checkout(self, commit: str) -> None:
        """Detached, forced, and without stray files: the working tree is exactly `commit`."""
        self.git(
            "checkout", "--quiet", "--detach", "--force", commit, what=f"git checkout {commit}"
        )
        self.git("clean", "-q", "-ffdx", what="git clean")

    def files(self, commit: str, under: str = "") -> list[Entry]:
        """Every file of `commit` below `under` (the whole tree when empty)."""
        args = ["ls-tree", "-r", "-l", "-z", "--full-tree", commit]
        if under:
            args += ["--", under.rstrip("/") + "/"]
        out = self.git(*args, what=f"git ls-tree {commit[:12]}")
        entries = []
        for item in out.decode(errors="surrogateescape").split("\0"):
            if item:
                meta, path = item.split("\t", 1)
                mode, _, oid, size = meta.split()
                entries.append(Entry(path, mode, oid, int(size) if size.isdigit() else None))
        return entries

    def entry(self, commit: str, path: str) -> Entry | None:
        """The tree entry at `path` itself (not its content); None when absent."""
        out = self.git(
            "ls-tree", "-z", "--full-tree", commit, "--", path.rstrip("/"),
            what=f"git ls-tree {commit[:12]}",
        )  # fmt: skip
        for item in out.decode(errors="surrogateescape").split("\0"):
            if item:
                meta, name = item.split("\t", 1)
                mode, _, oid = meta.split(" ")
                if name == path.rstrip("/"):
                    return Entry(name, mode, oid)
        return None

    def blobs(self, oids: Sequence[str]) -> list[bytes]:
        """The content of each object, in order, from one `git cat-file --batch`."""
        if not oids:
            return []
        out = self.git("cat-file", "--batch", input="".join(f"{o}\n" for o in oids).encode())
        blobs, pos = [], 0
        for oid in oids:
            end = out.index(b"\n", pos)
            header = out[pos:end].decode().split(" ")
            if len(header) != 3:
                raise GitError(f"git cat-file: {oid}: {' '.join(header[1:])}")
            size = int(header[2])
            blobs.append(out[end + 1 : end + 1 + size])
            pos = end + 1 + size + 1
        return blobs

    def verify_commit(self, commit: str, gnupghome: str | None = None) -> None:
        """git's own signature check against the keyring in `gnupghome`."""
        what = "signature"  # the caller names the commit
        env = {"GNUPGHOME": gnupghome} if gnupghome else None
        rc, _, err = self._run(["verify-commit", "--raw", commit], None, env, what)
        if rc == 0:
            return
        # --raw gives gpg's status lines: say why in gpg's own words.
        status = dict(
            (ln.split(" ")[1], ln) for ln in err.splitlines() if ln.startswith("[GNUPG:] ")
        )
        for key, why in (
            ("BADSIG", "bad signature"),
            ("NO_PUBKEY", "signed by a key not in the keyring"),
            ("EXPKEYSIG", "signed by an expired key"),
            ("REVKEYSIG", "signed by a revoked key"),
            ("ERRSIG", "signature cannot be checked"),
        ):
            if key in status:
                raise GitError(f"{what}: {why}: expected a good signature from the keyring")
        if not err.strip():
            raise GitError(f"{what}: not signed: expected a signature from the keyring")
        raise GitError(f"{what}: {_one_line(err)}")

    def is_commit(self, rev: str) -> bool:
        if not _SHA.match(rev):
            return False
        try:
            self.resolve(rev)
        except GitError:
            return False
        return True


# A commit's own .gitattributes may not make its checkout differ from the blobs mtd
# validated (line ends, `working-tree-encoding`, `ident`, filters): the clone's
# info/attributes outranks every .gitattributes, and unsets them all.
_ATTRIBUTES = "* -text -eol -crlf -ident -filter -working-tree-encoding\n"


def _sparse(only: str) -> str:
    """The sparse-checkout pattern of one directory, every character taken literally (the
    whole tree when empty): the checkout writes nothing a round did not check."""
    name = only.strip("/")
    if not name:
        return "/*\n"
    return "/" + "".join(c if c.isalnum() or c == "/" else "\\" + c for c in name) + "/\n"


def _keep_text(path: Path, text: str) -> bool:
    """Write `text` unless the file already holds it; whether it was written."""
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    files.write_private(path, text.encode())
    return True


def _one_line(err: str) -> str:
    """git's most telling stderr line (`fatal: ...` first), credentials masked."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    for prefix in ("fatal:", "error:"):
        for ln in lines:
            if ln.startswith(prefix):
                return redact(ln.removeprefix(prefix).strip())
    return redact(lines[-1]) if lines else "failed"
