"""`mtd run` keeps the secret it loaded: a secret file that disappears or changes is an
error in the log and in `mtd status`, never a new mapping (before: a deleted secret was
silently regenerated, giving a new mapping at the same epoch and a diverged fleet). Only an
explicit reload (SIGHUP) takes a new secret."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters import files
from reconciler.lab.netns import Lab
from tests.conftest import MTD, ROOT, log_events, mtd, write_state
from tests.kernel import table_text

pytestmark = pytest.mark.netns
Event = dict[str, Any]


def test_a_daemon_keeps_its_secret_until_told(tmp_path: Path):
    lab = Lab()
    proc = None
    try:
        lab.add_server("srv")
        (tmp_path / "srv").mkdir()
        # Redis is a unix socket that is not there: unreachable, retried every <= 0.5 s,
        # which also clocks the test (drift checks every 0.3 s are logged only when they act).
        state = write_state(
            tmp_path / "srv" / "state.yaml", redis={"url": f"unix://{tmp_path}/no.sock"}
        )
        secret = tmp_path / "srv" / "secret"
        log = tmp_path / "run.log"
        argv = [*MTD, "-s", str(state), "run", "--log-json", "--drift-interval", "0.3",
                "--reconnect-max", "0.5"]  # fmt: skip
        with log.open("w") as out:
            proc = lab.spawn("srv", argv, stdout=subprocess.DEVNULL, stderr=out, cwd=ROOT)

        def events() -> list[Event]:
            return log_events(log.read_text())

        def wait(pred: Callable[[Event], bool], since: int = 0) -> Event:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for ev in events()[since:]:
                    if pred(ev):
                        return ev
                assert proc is not None and proc.poll() is None, log.read_text()
                time.sleep(0.05)
            raise AssertionError(log.read_text())

        def some_drift_checks_later() -> int:
            mark = len(events())
            for _ in range(3):
                wait(lambda e: e.get("event") == "redis", len(events()))
            return mark

        def status() -> str:
            out = mtd("-s", str(state), "status", ns=lab)
            assert out.returncode == 0, out.stderr
            return out.stdout

        wait(lambda e: e.get("event") == "reconcile" and e.get("origin") == "start")
        assert secret.exists()  # created at the first start
        before = table_text(lab)
        status_file = files.daemon_status_path(tmp_path / "srv" / "epoch")

        secret.unlink()
        ev = wait(lambda e: e.get("event") == "secret")
        assert ev["level"] == "error" and f"{secret}: no such secret file" in ev["message"]
        assert "still using the secret loaded at start" in ev["message"]
        mark = some_drift_checks_later()
        assert not secret.exists()  # never regenerated
        assert table_text(lab) == before  # the same mapping, enforced
        assert json.loads(status_file.read_text())["secret_problem"].endswith("no such secret file")

        secret.write_bytes(os.urandom(32))
        secret.chmod(0o600)
        ev = wait(lambda e: e.get("event") == "secret", mark + 1)
        assert "the secret file changed since it was loaded" in ev["message"]
        mark = some_drift_checks_later()
        assert table_text(lab) == before
        assert [e for e in events()[mark:] if e.get("event") == "secret"] == []  # logged once
        shown = status()
        assert "out of sync" in shown  # the file's secret is not the one enforced...
        assert "changed since it was loaded: still using the secret loaded at start" in shown

        mark = len(events())
        proc.send_signal(signal.SIGHUP)  # ...until a reload takes it
        wait(lambda e: "new secret loaded" in e.get("message", ""), mark)
        ev = wait(lambda e: e.get("event") == "reconcile" and e.get("origin") == "manual", mark)
        assert ev["result"] == "changed" and ev["epoch"] == 0
        assert table_text(lab) != before
        assert "in sync" in status() and "mtd run (pid" not in status()
        assert not [e for e in events() if e.get("event") == "drift"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not status_file.exists()
        assert secret.read_bytes().hex() not in log.read_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        lab.close()


def test_a_lost_secret_is_not_regenerated_under_a_live_table(lab: Lab, tmp_path: Path):
    """apply, rotate and run create a secret only where no mapping is live yet."""
    state = write_state(tmp_path / "s.yaml")
    secret = tmp_path / "secret"
    assert mtd("-s", str(state), "apply", ns=lab).returncode == 0
    before = table_text(lab)
    secret.unlink()
    for args in (["apply"], ["rotate"], ["run", "--redis-timeout", "0.1"], ["status"]):
        out = mtd("-s", str(state), *args, ns=lab)
        assert out.returncode == 1, out
        assert out.stderr == (
            f"mtd: error: {secret}: no secret file, but table inet mtd is live: the secret was "
            "lost: restore it from a backup, or start a new mapping on purpose with mtd down, "
            "then mtd apply\n"
        )
        assert not secret.exists() and table_text(lab) == before
    assert mtd("-s", str(state), "down", ns=lab).returncode == 0
    out = mtd("-s", str(state), "apply", ns=lab)  # on purpose: a new secret, a new mapping
    assert out.returncode == 0 and secret.exists(), out.stderr
