"""GitOps pull against a real git remote (a bare repository in a temp dir), applied for real
inside lab namespaces."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from reconciler.adapters import auditlog, files
from reconciler.adapters.git import GitError, Repo, redact
from reconciler.errors import MtdError
from reconciler.lab.netns import Lab
from reconciler.services import gitops
from tests.conftest import MTD, ROOT, mtd
from tests.kernel import table_text

GIT_ENV = {
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "fleet admin",
    "GIT_AUTHOR_EMAIL": "admin@example.invalid",
    "GIT_COMMITTER_NAME": "fleet admin",
    "GIT_COMMITTER_EMAIL": "admin@example.invalid",
}
KERNEL_REFUSES = """{"nftables": [
 {"add": {"table": {"family": "inet", "name": {{ table | tojson }}}}},
 {"add": {"set": {"family": "inet", "table": {{ table | tojson }}, "name": "tiny",
   "type": "ipv4_addr", "size": 1, "elem": ["192.0.2.7", "192.0.2.8"]}}}
]}"""


class Remote:
    """A bare repository (the remote) and an author's clone that commits and pushes to it."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "remote.git"
        self.work = root / "author"
        git(root, "init", "-q", "--bare", "-b", "main", str(self.bare))
        git(root, "init", "-q", "-b", "main", str(self.work))

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        for rel, text in files.items():
            p = self.work / rel
            if text is None:
                p.unlink()
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(text)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "--force", str(self.bare), "HEAD:main")
        return git(self.work, "rev-parse", "HEAD").strip()


def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **GIT_ENV, **(env or {})},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def state_doc(tmp_path: Path, **overrides: object) -> str:
    doc: dict[str, object] = {
        "ports": {"range": [1, 20], "services": {"tcp": [1, 2, 3, 4, 5], "udp": [53]}},
        "watched": [{"source": "192.0.2.3", "ignore": {"tcp": [1, 2]}}],
    }
    doc.update(overrides)
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    return Remote(tmp_path)


def pull(lab: Lab, remote: Remote, state_dir: Path, *args: str, role: str = "srv"):
    argv = ["pull", "--once", "--repo", str(remote.bare), "--state-dir", str(state_dir), *args]
    return mtd(*argv, ns=lab, role=role)


def applied_commit(state_dir: Path) -> str:
    return Repo(state_dir / "repo").head() or ""


def in_sync(lab: Lab, state_path: Path, *args: str, role: str = "srv") -> bool:
    """`mtd diff` of the applied commit, with the pull's state directory (its secret)."""
    sd = next(p.parent for p in (state_path, *state_path.parents) if p.name == "repo")
    out = mtd(
        "--state-dir", str(sd), "-s", str(state_path), "diff", "--stat", *args, ns=lab, role=role
    )
    assert out.returncode in (0, 2), out.stderr
    return out.returncode == 0


# --- root-free: the git side alone ------------------------------------------------------------


def test_credentials_in_urls_are_masked():
    assert redact("fatal: unable to access 'https://bob:s3cret@git.example.invalid/x/'") == (
        "fatal: unable to access 'https://***@git.example.invalid/x/'"
    )
    assert redact("ssh://git@example.invalid/x") == "ssh://***@example.invalid/x"
    # One redact for git and Redis: a token as user name, a raw @ in the password.
    assert redact("https://ghp_TOKEN@example.invalid/x.git") == "https://***@example.invalid/x.git"
    assert redact("git fetch https://u:p@ss@example.invalid/x main") == (
        "git fetch https://***@example.invalid/x main"
    )


def test_the_clone_follows_force_pushes(tmp_path: Path, remote: Remote):
    repo = Repo(tmp_path / "clone", timeout=30)
    repo.ensure(str(remote.bare))
    first = remote.commit({"a.yaml": "table: a\n"})
    assert repo.fetch("main") == first
    repo.checkout(first)
    (repo.path / "stray.txt").write_text("left by someone")
    git(remote.work, "reset", "-q", "--hard", "HEAD")
    git(remote.work, "commit", "-q", "--amend", "-m", "rewritten")
    git(remote.work, "push", "-q", "--force", str(remote.bare), "HEAD:main")
    rewritten = git(remote.work, "rev-parse", "HEAD").strip()
    assert rewritten != first and repo.fetch("main") == rewritten
    repo.checkout(rewritten)
    assert repo.head() == rewritten and not (repo.path / "stray.txt").exists()
    with pytest.raises(GitError, match=r"^git fetch .*remote\.git nope: .*nope"):
        repo.fetch("nope")


def test_a_timed_out_git_command_is_one_line(tmp_path: Path, remote: Remote):
    remote.commit({"a.yaml": ""})
    repo = Repo(tmp_path / "clone", timeout=1e-4)
    with pytest.raises(GitError, match=r"timed out after 0\.0001 s$"):
        repo.ensure(str(remote.bare))


def test_a_bad_commit_is_named_by_its_paths_in_the_repository(tmp_path: Path, remote: Remote):
    sha = remote.commit({"fleet/mtd/base.yaml": state_doc(tmp_path, ports={"range": [1]})})
    puller = gitops.Puller(
        gitops.PullConfig(url=str(remote.bare), path="fleet/mtd", state_dir=tmp_path / "sd")
    )
    puller.repo.ensure(str(remote.bare))
    assert puller.repo.fetch("main") == sha
    with pytest.raises(MtdError) as exc, puller.candidate(sha):
        pass
    assert exc.value.problems == [
        "fleet/mtd/base.yaml:2: ports: missing key: 'services' is a required property",
        "fleet/mtd/base.yaml:3: ports.range: [1]: expected [low, high]",
    ]
    assert [p.name for p in (tmp_path / "sd").iterdir()] == ["repo"]  # scratch copy removed
    empty = remote.commit({"fleet/mtd/base.yaml": None, "fleet/other.txt": "x"})
    puller.repo.fetch("main")
    with pytest.raises(MtdError, match=r"^fleet/mtd/: no \*\.yaml files"), puller.candidate(empty):
        pass


def test_an_unreachable_remote_keeps_state_and_backs_off(tmp_path: Path):
    cfg = gitops.PullConfig(
        url=str(tmp_path / "gone.git"), state_dir=tmp_path / "sd", interval=2, timeout=30
    )
    puller = gitops.Puller(cfg)
    delays = []
    for _ in range(4):
        outcome = puller.round(nft=None)
        assert outcome.status == "unreachable" and "does not appear to be a git repository" in (
            outcome.message
        )
        delays.append(puller.next_delay())
    assert [o for o in delays if o < 2] == [] and delays[-1] >= 8  # 2 * 2**3 / 2 at least
    rec = gitops.read_record(cfg.record_path)
    assert rec["unreachable"]["failures"] == 4 and "applied" not in rec
    assert gitops.Puller(cfg).failures == 4  # a restart keeps backing off


# --- the whole pull, applied in a lab namespace ----------------------------------------------


@pytest.mark.netns
def test_pull_applies_good_commits_and_never_a_bad_one(lab: Lab, remote: Remote, tmp_path: Path):
    sd = tmp_path / "sd"
    applied = sd / "repo" / "mtd"

    def step(
        expect_rc: int, expect_commit: str, *args: str, changed: bool
    ) -> subprocess.CompletedProcess:
        before = table_text(lab)
        out = pull(lab, remote, sd, "--path", "mtd", *args)
        assert out.returncode == expect_rc, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        assert applied_commit(sd) == expect_commit
        assert in_sync(lab, applied)  # the live table is the last good commit's
        assert (table_text(lab) != before) == changed
        return out

    first = remote.commit({"mtd/state.yaml": state_doc(tmp_path)}, "first")
    out = step(0, first, changed=True)
    assert out.stdout.splitlines()[-1].startswith("changed: table inet mtd epoch 0: ")
    assert out.stdout.rstrip().endswith(f"commit {first[:12]}")
    assert "+ element src4 { 192.0.2.3 }" in out.stdout  # the diff is shown
    assert "~ map tcp4: +" in out.stdout and "192.0.2.3 . 3 :" not in out.stdout  # no mapping
    assert step(0, first, changed=False).stdout.startswith(f"ok: commit {first[:12]} is applied")

    watched = [{"source": "192.0.2.3", "ignore": {"tcp": [1, 2]}}, {"source": "192.0.2.2"}]
    second = remote.commit({"mtd/state.yaml": state_doc(tmp_path, watched=watched)}, "add")
    step(0, second, changed=True)
    assert "192.0.2.2" in table_text(lab)
    ranged = state_doc(
        tmp_path, watched=watched, ports={"range": [1, 40], "services": {"tcp": [1, 2, 3]}}
    )
    third = remote.commit({"mtd/state.yaml": ranged}, "range")
    step(0, third, changed=True)

    bad_schema = remote.commit({"mtd/state.yaml": ranged.replace("- 40", "- 99999")}, "bad schema")
    out = step(1, third, changed=False)
    assert out.stderr.splitlines() == [
        f"mtd: error: commit {bad_schema[:12]}: mtd/state.yaml:4: ports.range[1]: 99999: "
        "expected at most 65535"
    ]
    status = json.loads(
        mtd("-s", str(applied), "status", "--json", "--state-dir", str(sd), ns=lab).stdout
    )
    assert status["in_sync"] and status["pull"]["applied"] == third
    assert status["pull"]["rejected"] == bad_schema and not status["pull"]["healthy"]
    assert "99999" in status["pull"]["error"]
    step(1, third, changed=False)  # the same bad head again: still never applied

    carried = remote.commit(
        {"mtd/templates/mine.json.j2": "{% if %}", "mtd/state.yaml": ranged + "template: mine\n"}
    )
    out = step(1, third, changed=False)  # templates come from the host unless it allows them
    assert out.stderr == (
        f"mtd: error: commit {carried[:12]}: mtd/templates/mine.json.j2: a template in the "
        "state repository: expected none (this host takes templates from its own directories; "
        "its local configuration may allow the repository's: repository_templates: true)\n"
    )
    config = tmp_path / "mtd.yaml"
    config.write_text("repository_templates: true\n")
    bad_template = remote.commit({"mtd/templates/mine.json.j2": "{% if %} "})
    out = step(1, third, "--config", str(config), changed=False)
    assert (
        f"commit {bad_template[:12]}: mtd/templates/mine.json.j2:1: template syntax" in out.stderr
    )
    refused = remote.commit({"mtd/templates/mine.json.j2": KERNEL_REFUSES})
    out = step(1, third, "--config", str(config), changed=False)
    assert f"commit {refused[:12]}: nftables refused rendered command 1 (add set tiny)" in (
        out.stderr
    )

    fixed = remote.commit({"mtd/templates/mine.json.j2": None, "mtd/state.yaml": ranged + "\n"})
    step(0, fixed, changed=False)  # same desired state as `third`: applied, nothing to change

    git(remote.work, "reset", "-q", "--hard", first)
    rewritten = remote.commit({"mtd/state.yaml": state_doc(tmp_path) + "# rewritten\n"}, "force")
    step(0, rewritten, changed=True)
    assert "192.0.2.2" not in table_text(lab)

    remote.bare.rename(tmp_path / "moved.git")
    out = step(1, rewritten, changed=False)
    assert "remote.git main: " in out.stderr and "keeping the current state" in out.stderr
    remote.bare.parent.joinpath("moved.git").rename(remote.bare)
    assert step(0, rewritten, changed=False).stdout.startswith("ok: ")
    assert gitops.read_record(sd / "pull.json")["unreachable"] is None

    entries = auditlog.entries(sd / "audit.jsonl")
    assert [(e["commit"], e["result"]) for e in entries] == [
        (first, "changed"),
        (second, "changed"),
        (third, "changed"),
        (bad_schema, "rejected"),
        (carried, "rejected"),
        (bad_template, "rejected"),
        (refused, "rejected"),
        (fixed, "ok"),
        (rewritten, "changed"),
    ]
    assert {e["origin"] for e in entries} == {"pull"}
    history = mtd("--state-dir", str(sd), "-s", str(applied), "history", ns=lab)
    assert history.returncode == 0 and len(history.stdout.splitlines()) == 1 + 9  # a header
    # What 192.0.2.2 saw while `third` was live, from that commit's state (it is not in the
    # current one), confirmed by the recorded fingerprint.
    at = mtd(
        "-s", str(applied), "history", "--state-dir", str(sd), "--source", "192.0.2.2",
        "--mapping-at", entries[2]["time"], ns=lab,
    )  # fmt: skip
    assert at.returncode == 0, at.stderr
    assert f"of commit {third[:12]}" in at.stdout and "tcp 3 -> " in at.stdout


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.netns
def test_the_pull_loop_follows_the_branch(lab: Lab, remote: Remote, tmp_path: Path):
    sd = tmp_path / "sd"
    first = remote.commit({"state.yaml": state_doc(tmp_path)})
    argv = [*MTD, "pull", "--repo", str(remote.bare), "--state-dir", str(sd), "--interval", "0.2"]
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        proc = lab.spawn("srv", argv, cwd=ROOT, stdout=out, stderr=err)
    wait_for(lambda: applied_commit(sd) == first)
    bad = remote.commit({"state.yaml": "ports: nope\n"})
    wait_for(
        lambda: (gitops.read_record(sd / "pull.json").get("rejected") or {}).get("commit") == bad
    )
    good = remote.commit({"state.yaml": state_doc(tmp_path) + "# good\n"})
    wait_for(lambda: applied_commit(sd) == good)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)
    errors = (tmp_path / "err").read_text().splitlines()
    assert errors == [
        f"mtd: error: commit {bad[:12]}: state.yaml:1: ports: 'nope': expected object"
    ]
    assert in_sync(lab, sd / "repo")


@pytest.mark.netns
def test_the_daemon_pulls_alongside_its_other_triggers(lab: Lab, remote: Remote, tmp_path: Path):
    """`mtd run --pull`: pulls run in the daemon's one worker loop, so they never overlap a
    Redis or drift pass; Redis being unreachable does not stop them."""
    sd = tmp_path / "sd"
    first = remote.commit({"state.yaml": state_doc(tmp_path)})
    argv = [*MTD, "run", "--pull", str(remote.bare), "--pull-interval", "0.2", "--state-dir",
            str(sd), "--drift-interval", "0.5", "--reconnect-max", "0.5", "--log-json"]  # fmt: skip
    with (tmp_path / "err").open("w") as err:
        proc = lab.spawn("srv", argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: applied_commit(sd) == first)
        assert in_sync(lab, sd / "repo")
        bad = remote.commit({"state.yaml": "watched: [{source: nope}]\n"})
        wait_for(lambda: bad[:12] in (tmp_path / "err").read_text())
        assert applied_commit(sd) == first and in_sync(lab, sd / "repo")
        more = [{"source": "192.0.2.3", "ignore": {"tcp": [1, 2]}}, {"source": "192.0.2.9"}]
        good = remote.commit({"state.yaml": state_doc(tmp_path, watched=more)})
        wait_for(lambda: applied_commit(sd) == good)
        wait_for(lambda: "192.0.2.9" in table_text(lab))
        assert in_sync(lab, sd / "repo")
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0


@pytest.mark.netns
def test_check_shows_the_change_and_applies_nothing(lab: Lab, remote: Remote, tmp_path: Path):
    sd = tmp_path / "sd"
    remote.commit({"state.yaml": state_doc(tmp_path)})
    files.load_secret(sd / "secret", create=True)  # --check only reads it
    out = pull(lab, remote, sd, "--check")
    assert out.returncode == 0, out.stderr
    assert "+ table mtd" in out.stdout and out.stdout.splitlines()[-1].startswith("would change")
    assert "absent" in table_text(lab) and applied_commit(sd) == ""
    assert "applied" not in gitops.read_record(sd / "pull.json")


@pytest.mark.netns
def test_two_hosts_get_their_own_merged_state(lab: Lab, remote: Remote, tmp_path: Path):
    lab.add_server("srv2")
    base = state_doc(tmp_path)
    remote.commit(
        {
            "base.yaml": base,
            "groups/edge.yaml": "hosts: [h2]\nwatched: [{source: 2001:db8::3}]\n",
            "hosts/h1.yaml": "watched: [{source: 192.0.2.3}, {source: 198.51.100.0/24}]\n",
            "hosts/h2.yaml": "ports: {range: [1, 30]}\n",
        }
    )
    for host, role in (("h1", "srv"), ("h2", "srv2")):
        out = pull(lab, remote, tmp_path / host / "sd", "--host", host, role=role)
        assert out.returncode == 0, out.stderr
    h1 = lab.sh("srv", "nft list table inet mtd")
    h2 = lab.sh("srv2", "nft list table inet mtd")
    assert "192.0.2.3" in h1 and "198.51.100.0/24" in h1 and "2001:db8::3" not in h1
    assert "2001:db8::3" in h2 and "192.0.2.3" not in h2
    for host, role in (("h1", "srv"), ("h2", "srv2")):
        assert in_sync(lab, tmp_path / host / "sd" / "repo", "--host", host, role=role)
    assert not in_sync(lab, tmp_path / "h1" / "sd" / "repo", "--host", "h2", role="srv")
    assert auditlog.entries(tmp_path / "h2" / "sd" / "audit.jsonl")[0]["host"] == "h2"


@contextlib.contextmanager
def gnupg(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """A signing key (its own GNUPGHOME) and a keyring holding only its public part."""
    if not shutil.which("gpg"):
        pytest.skip("gpg is not installed (make deb installs gnupg)")
    signer, keyring = tmp_path / "signer", tmp_path / "keyring"
    for home in (signer, keyring):
        home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(signer)}
    run = {"capture_output": True, "text": True, "timeout": 60, "check": True}
    try:
        subprocess.run(
            ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "mtd test", "ed25519"],
            env=env,
            **run,
        )
        fpr = next(
            ln.split(":")[9]
            for ln in subprocess.run(
                ["gpg", "--with-colons", "--list-keys"], env=env, **run
            ).stdout.splitlines()
            if ln.startswith("fpr:")
        )
        public = subprocess.run(["gpg", "--export", fpr], env=env, capture_output=True, check=True)
        subprocess.run(
            ["gpg", "--batch", "--import"],
            input=public.stdout,
            env={**os.environ, "GNUPGHOME": str(keyring)},
            capture_output=True,
            timeout=60,
            check=True,
        )
        yield (
            {"GNUPGHOME": str(signer), "GIT_CONFIG_PARAMETERS": f"'user.signingkey={fpr}'"},
            (keyring),
        )
    finally:
        for home in (signer, keyring):
            subprocess.run(
                ["gpgconf", "--kill", "all"],
                env={**os.environ, "GNUPGHOME": str(home)},
                capture_output=True,
                timeout=30,
                check=False,
            )


@pytest.mark.netns
def test_only_signed_commits_are_applied_when_asked(lab: Lab, remote: Remote, tmp_path: Path):
    sd = tmp_path / "sd"
    verify = ["--verify-signatures", "--gpg-home"]
    with gnupg(tmp_path) as (sign_env, keyring):
        unsigned = remote.commit({"state.yaml": state_doc(tmp_path)})
        out = pull(lab, remote, sd, *verify, str(keyring))
        assert out.returncode == 1
        assert out.stderr == (
            f"mtd: error: commit {unsigned[:12]}: signature: not signed: expected a signature "
            "from the keyring\n"
        )
        assert "absent" in table_text(lab)
        (remote.work / "state.yaml").write_text(state_doc(tmp_path) + "# signed\n")
        git(remote.work, "commit", "-q", "-S", "-am", "signed", env=sign_env)
        git(remote.work, "push", "-q", str(remote.bare), "HEAD:main")
        signed = git(remote.work, "rev-parse", "HEAD").strip()
        out = pull(lab, remote, sd, *verify, str(keyring))
        assert out.returncode == 0, out.stderr
        assert applied_commit(sd) == signed and "inet mtd" in table_text(lab)
        empty = tmp_path / "empty-keyring"
        empty.mkdir(mode=0o700)
        other = pull(lab, remote, tmp_path / "sd2", *verify, str(empty))
        assert other.returncode == 1
        assert "signature: signed by a key not in the keyring" in other.stderr


@pytest.mark.parametrize(
    "name", ["mtd/templates/maps.json.j2\nmtd: applied", "mtd/x\u2028y.yaml", "mtd/doc/a\rb.txt"]
)
def test_a_name_that_would_break_a_line_is_refused_in_one_line(
    tmp_path: Path, remote: Remote, name: str
):
    """Every error names its file: a name holding a line break (git takes any byte but NUL
    and /) made one problem two lines in pull.json, the log and `mtd status`, a forged one
    among them."""
    sha = remote.commit({"mtd/state.yaml": state_doc(tmp_path), name: "{}"})
    puller = gitops.Puller(
        gitops.PullConfig(url=str(remote.bare), path="mtd", state_dir=tmp_path / "sd")
    )
    puller.repo.ensure(str(remote.bare))
    assert puller.repo.fetch("main") == sha
    with pytest.raises(MtdError) as exc, puller.candidate(sha):
        pass
    assert len(exc.value.problems) == 1 and exc.value.problems[0].isprintable(), exc.value.problems
    assert "expected names of printable characters" in exc.value.problems[0]
