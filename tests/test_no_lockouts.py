"""No lockouts, on a real kernel (README: No lockouts): the SSH-session check of `apply`,
`rotate` and `pull`, and `apply --confirm` / `mtd confirm`, whose detached watcher puts the
table of before back in one transaction even when the session that started it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.core import diff
from reconciler.lab.netns import Lab
from tests.conftest import MTD, ROOT, write_state
from tests.kernel import plant_secret
from tests.test_gitops import Remote, state_doc

pytestmark = pytest.mark.netns

# 198.51.100.0/24 is watched; 22 is a service: a session from inside comes in on 22.
INSIDE = "198.51.100.7 50022 198.51.100.1 22"
OUTSIDE = "192.0.2.9 50022 192.0.2.1 22"
SERVICES = {"tcp": [1, 2, 22], "udp": [53]}


@pytest.fixture
def srv() -> Iterator[Lab]:
    with Lab() as lab:
        lab.add_server()
        yield lab


def states(tmp_path: Path) -> tuple[Path, Path]:
    """A: only 192.0.2.3 watched; B: 198.51.100.0/24 watched too (it moves its port 22)."""
    ports = {"range": [1, 40], "services": SERVICES}
    a = write_state(tmp_path / "a.yaml", ports=ports, watched=[{"source": "192.0.2.3"}])
    b = write_state(
        tmp_path / "b.yaml",
        ports=ports,
        watched=[{"source": "192.0.2.3"}, {"source": "198.51.100.0/24"}],
    )
    _secret_that_moves_22(b)
    return a, b


def _secret_that_moves_22(state: Path) -> None:
    """A secret under which port 22 moves for 198.51.100.0/24 at the first epochs: a service
    may be drawn to its own port at an epoch, which would leave the session check nothing to
    refuse."""
    from reconciler.adapters import files
    from reconciler.core import shuffle

    loaded = files.load_state(state)
    label = next(w.label for w in loaded.watched if w.label.startswith("198.51.100."))

    def moves_22(secret: bytes) -> bool:
        return all(
            shuffle.compute(loaded, secret, e).moves[(label, "tcp")][22] != 22 for e in range(6)
        )

    plant_secret(state, moves_22, "port 22 moved at every early epoch")


def run(lab: Lab, tmp_path: Path, *args: str, ssh: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SSH_CONNECTION": ssh, "MTD_STATE_DIR": str(tmp_path)}
    return lab.run("srv", [*MTD, *args], cwd=ROOT, env=env, timeout=120)


def listing(lab: Lab) -> diff.Table:
    out = lab.run("srv", ["nft", "-j", "list", "table", "inet", "mtd"])
    if out.returncode != 0:
        return diff.MISSING
    return diff.live([o for o in json.loads(out.stdout)["nftables"] if "metainfo" not in o])


def same(a: diff.Table, b: diff.Table) -> bool:
    return not diff.diff(a, b)


def audit(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(what: Callable[[], bool], timeout: float = 60.0) -> None:
    """Until `what()` holds: the machine is shared, so no fixed sleep, only a far bound."""
    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_session_check_refuses_in_one_line_and_force_overrides(srv: Lab, tmp_path: Path) -> None:
    a, b = states(tmp_path)
    assert run(srv, tmp_path, "apply", "-s", str(a), ssh=INSIDE).returncode == 0  # stays at 22
    before = listing(srv)
    for cmd in (["apply", "-s", str(b)], ["rotate", "-s", str(b)]):
        out = run(srv, tmp_path, *cmd, ssh=INSIDE)
        assert out.returncode == 1, out
        assert out.stderr.count("\n") == 1 and out.stdout == ""
        assert "198.51.100.7" in out.stderr and "tcp port 22" in out.stderr
        assert "trusted" in out.stderr and "--force" in out.stderr
        assert same(listing(srv), before)  # nothing changed
    assert run(srv, tmp_path, "apply", "-s", str(b), ssh=OUTSIDE).returncode == 0  # not watched
    out = run(srv, tmp_path, "rotate", "-s", str(b), ssh=INSIDE)  # moves it again: refused
    assert out.returncode == 1 and "locked out" in out.stderr
    # sudo resets the environment: the check finds the session in a parent process.
    env = {**os.environ, "SSH_CONNECTION": INSIDE, "MTD_STATE_DIR": str(tmp_path)}
    sudo = ["sh", "-c", 'env -u SSH_CONNECTION "$@"; exit $?', "sh"]
    out = srv.run("srv", [*sudo, *MTD, "rotate", "-s", str(b)], cwd=ROOT, env=env)
    assert out.returncode == 1 and "locked out" in out.stderr, out
    out = run(srv, tmp_path, "rotate", "-s", str(b), "--force", ssh=INSIDE)
    assert out.returncode == 0, out.stderr
    last = audit(tmp_path)[-1]
    assert last["force"] is True and last["epoch"] == 1
    assert "force" not in audit(tmp_path)[-2]


def test_pull_refuses_and_retries(srv: Lab, tmp_path: Path) -> None:
    remote = Remote(tmp_path)
    remote.commit({"mtd.yaml": state_doc(tmp_path, ports={"range": [1, 40], "services": SERVICES},
                   watched=[{"source": "198.51.100.0/24"}])})  # fmt: skip
    sd = tmp_path / "sd"
    argv = ["pull", "--once", "--repo", str(remote.bare), "--state-dir", str(sd)]
    out = run(srv, tmp_path, *argv, ssh=INSIDE)
    assert out.returncode == 1 and "locked out" in out.stderr and "retries" in out.stderr
    assert listing(srv) is diff.MISSING
    record = sd / "pull.json"
    assert not record.exists() or "rejected" not in record.read_text()  # not the commit's fault
    out = run(srv, tmp_path, *argv, "--force", ssh=INSIDE)
    assert out.returncode == 0, out.stderr
    assert [e["force"] for e in audit(sd) if e["origin"] == "pull"] == [True]


def test_confirm_reverts_atomically_even_when_the_session_dies(srv: Lab, tmp_path: Path) -> None:
    a, b = states(tmp_path)
    assert run(srv, tmp_path, "apply", "-s", str(a)).returncode == 0
    before = listing(srv)
    # The apply runs in a process group of its own, killed (hang-up, then SIGKILL) once the
    # new table is live: as when the SSH connection that ran it drops.
    env = {**os.environ, "SSH_CONNECTION": "", "MTD_STATE_DIR": str(tmp_path)}
    script = f"{' '.join(MTD)} apply -s {b} --confirm 2 --force && exec sleep 600"
    proc = srv.spawn("srv", ["sh", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                     text=True)  # fmt: skip
    assert proc.stdout is not None
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    assert lines[0].startswith("changed:") and lines[1].startswith("pending:"), lines
    record = json.loads((tmp_path / "confirm.json").read_text())
    applied = listing(srv)
    assert not same(applied, before)
    os.killpg(proc.pid, signal.SIGHUP)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    wait_for(lambda: audit(tmp_path)[-1]["origin"] == "revert")
    wait_for(lambda: gone(record["pid"]))
    assert same(listing(srv), before)  # the table of before, exactly
    last = audit(tmp_path)[-1]
    first = audit(tmp_path)[0]
    assert last["result"] == "reverted" and last["fingerprint"] == first["fingerprint"]
    assert not (tmp_path / "confirm.json").exists()
    out = run(srv, tmp_path, "confirm", "-s", str(a))
    assert out.returncode == 1 and "put back" in out.stderr
    assert run(srv, tmp_path, "diff", "-s", str(a)).returncode == 0  # in sync with A again


def test_confirm_keeps_the_new_table(srv: Lab, tmp_path: Path) -> None:
    _, b = states(tmp_path)
    out = run(srv, tmp_path, "apply", "-s", str(b), "--confirm", "60")  # no table before
    assert out.returncode == 0 and "pending:" in out.stdout, out.stderr
    applied = listing(srv)
    pid = json.loads((tmp_path / "confirm.json").read_text())["pid"]
    out = run(srv, tmp_path, "confirm", "-s", str(b))
    assert out.returncode == 0 and out.stdout.startswith("confirmed:"), out
    wait_for(lambda: gone(pid))  # the watcher saw its record go
    assert same(listing(srv), applied)
    out = run(srv, tmp_path, "confirm", "-s", str(b))
    assert out.returncode == 0 and "nothing to confirm" in out.stdout
    # From no table: the revert removes it.
    assert run(srv, tmp_path, "down", "-s", str(b)).returncode == 0
    assert run(srv, tmp_path, "apply", "-s", str(b), "--confirm", "1").returncode == 0
    wait_for(lambda: audit(tmp_path)[-1]["origin"] == "revert")
    assert listing(srv) is diff.MISSING
    assert audit(tmp_path)[-1]["result"] == "down"
