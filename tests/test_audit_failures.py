"""An audit log that cannot be written: checked before the table changes, and when writing
still fails after the change, reported as "applied, audit failed", distinctly and once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.adapters import files
from reconciler.lab.netns import Lab
from reconciler.services import gitops
from tests.conftest import ROOT, log_events, mtd, write_state
from tests.kernel import table_text
from tests.test_gitops import Remote, applied_commit, state_doc, wait_for

pytestmark = pytest.mark.netns
BROKEN = [sys.executable, str(ROOT / "tests" / "audit_broken.py")]


def broken(lab: Lab, mode: str, *args: str) -> subprocess.CompletedProcess:
    return lab.run("srv", [*BROKEN, mode, *args], cwd=ROOT)


def test_apply_refuses_to_change_what_it_cannot_record(lab: Lab, tmp_path: Path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    state = write_state(tmp_path / "s.yaml", audit_log=str(blocker / "audit.jsonl"))
    for args in (["apply"], ["rotate"]):
        out = mtd("-s", str(state), *args, ns=lab)
        assert out.returncode == 1 and out.stdout == "", out
        assert out.stderr.startswith(
            f"mtd: error: {blocker}/audit.jsonl: cannot write the audit log: "
        )
        assert out.stderr.endswith(": nothing changed\n") and len(out.stderr.splitlines()) == 1
        assert "absent" in table_text(lab)
    assert not (tmp_path / "epoch").exists()  # rotate did not move the epoch either
    assert not (tmp_path / "secret").exists()  # nor create a secret for nothing
    files.load_secret(tmp_path / "secret", create=True)
    out = mtd("-s", str(state), "apply", "--check", ns=lab)  # a preview records nothing
    assert out.returncode == 0, out.stderr


def test_applied_but_not_recorded_is_exit_3(lab: Lab, tmp_path: Path):
    state = write_state(tmp_path / "s.yaml")
    out = broken(lab, "write", "-s", str(state), "apply")
    assert out.returncode == 3, out
    assert out.stdout.startswith("changed: table inet mtd epoch 0")
    assert out.stderr.startswith("mtd: error: applied, audit failed: ")
    assert "No space left on device" in out.stderr and len(out.stderr.splitlines()) == 1
    assert "absent" not in table_text(lab)
    out = broken(lab, "write", "-s", str(state), "apply")  # nothing to change: nothing to record
    assert out.returncode == 0 and out.stdout.startswith("ok:"), out
    out = broken(lab, "write", "-s", str(state), "rotate")
    assert out.returncode == 3 and out.stdout.startswith("changed: table inet mtd epoch 1"), out


def test_a_pull_whose_audit_fails_is_applied_once_and_never_flip_flops(lab: Lab, tmp_path: Path):
    """Before: the commit was live but not checked out, so the daemon's drift pass restored
    the previous one and the next round applied it again, forever."""
    remote = Remote(tmp_path)
    sd = tmp_path / "sd"
    first = remote.commit({"state.yaml": state_doc(tmp_path)})
    argv = [*BROKEN, "write", "run", "--pull", str(remote.bare), "--pull-interval", "0.2",
            "--state-dir", str(sd), "--drift-interval", "0.3", "--reconnect-max", "0.5",
            "--log-json"]  # fmt: skip
    log = tmp_path / "run.log"
    with log.open("w") as err:
        proc = lab.spawn("srv", argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: applied_commit(sd) == first)
        more = [{"source": "192.0.2.3", "ignore": {"tcp": [1, 2]}}, {"source": "192.0.2.9"}]
        second = remote.commit({"state.yaml": state_doc(tmp_path, watched=more)})
        wait_for(lambda: applied_commit(sd) == second)
        wait_for(lambda: "192.0.2.9" in table_text(lab))
        # Several drift checks (0.3 s) and pull rounds (0.2 s) later, clocked by the rounds
        # themselves: each one rewrites pull.json (the state has no Redis, so no reconnects).
        seen: set[int] = set()

        def rounds() -> bool:
            seen.add((sd / "pull.json").stat().st_mtime_ns)
            return len(seen) > 5

        wait_for(rounds)
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    events = log_events(log.read_text())
    pulls = [e for e in events if e.get("event") == "pull"]
    assert [e["result"] for e in pulls] == ["applied", "applied"], pulls
    assert all("applied, audit failed" in e["message"] for e in pulls)
    assert all(e["level"] == "error" for e in pulls)
    assert not [e for e in events if e.get("event") == "drift"]
    assert not [e for e in events if "next round retries" in e.get("message", "")]
    rec = gitops.read_record(sd / "pull.json")
    assert rec["applied"]["commit"] == second and "No space left" in rec["applied"]["audit_error"]
    assert "192.0.2.9" in table_text(lab)


def test_a_pull_that_cannot_record_is_not_applied_nor_rejected(lab: Lab, tmp_path: Path):
    remote = Remote(tmp_path)
    sd = tmp_path / "sd"
    commit = remote.commit({"state.yaml": state_doc(tmp_path)})
    argv = ["pull", "--once", "--repo", str(remote.bare), "--state-dir", str(sd)]
    out = broken(lab, "check", *argv)
    assert out.returncode == 1, out
    assert "Read-only file system: nothing changed" in out.stderr
    assert f"commit {commit[:12]} not applied; the next round retries" in out.stderr
    assert "absent" in table_text(lab)
    assert not gitops.read_record(sd / "pull.json").get("rejected")
    out = mtd(*argv, ns=lab)  # once the log is writable, the same commit applies
    assert out.returncode == 0, out.stderr
    assert applied_commit(sd) == commit
