"""What an operator reads about a running host: `mtd status` in text says what `--json`
knows (the daemon, Redis, the last pass, a pending revert), `mtd fleet status` shows a
daemon stopped on purpose as `stopped`, a fresh Redis is filled in without a warning, and
SIGTERM ends `mtd run` within the second the unit promises."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from reconciler.cli import daemon_status
from reconciler.core import fleet
from reconciler.lab.netns import Lab
from tests.conftest import mtd, write_state
from tests.redis_fixtures import needs_redis
from tests.test_watch_redis import Daemons

NOW = 1_800_000_000.0


def _record(**kw: object) -> bytes:
    rec = {"host": "web1", "epoch": 3, "fleet_epoch": 3, "commit": None, "head": None,
           "pull_rejected": False, "in_sync": True, "result": "ok", "error": None,
           "version": "0.1.0", "time": NOW} | kw  # fmt: skip
    return json.dumps(rec).encode()


def test_a_daemon_stopped_on_purpose_is_stopped_not_silent():
    stopped = {"web1": _record(stopped=True)}
    (row,) = fleet.classify(stopped, {"web1": None}, 3)
    assert (row.status, row.why, row.converged) == ("stopped", "mtd run stopped on purpose", False)
    (row,) = fleet.classify({"web1": _record()}, {"web1": None}, 3)
    assert row.status == "silent"
    # a live record wins (started again), and `stopped` must be a boolean
    (row,) = fleet.classify(stopped, {"web1": _record()}, 3)
    assert row.status == "ok"
    (row,) = fleet.classify({"web1": _record(stopped="yes")}, {"web1": None}, 3)
    assert (row.status, row.why) == ("invalid", "stopped 'yes': expected true or false")
    text = fleet.table([fleet.classify(stopped, {"web1": None}, 3)[0]], 3, NOW)
    assert text[-1] == (
        "recap: ok=0 changed=0 behind=0 rejected=0 silent=0 stopped=1 (fleet epoch 3, 1 hosts)"
    )


def test_status_lines_of_a_daemon_gone_or_damaged():
    assert daemon_status.daemon_lines({}, False, NOW) == [
        "mtd run: not running on this state (no daemon.json)"
    ]
    assert daemon_status.daemon_lines({"pid": 999999}, False, NOW) == [
        "mtd run: not running (pid 999999 of daemon.json has exited without removing it)"
    ]
    last = {"result": "error", "epoch": 2, "time": NOW - 30, "error": "e\nf"}
    hostile = {"pid": 5, "started": "x", "redis": {"where": "a\x1b[2Jb", "last_trigger": 7},
               "last_pass": last}  # fmt: skip
    assert daemon_status.daemon_lines(hostile, True, NOW) == [
        "mtd run: pid 5, running since ?",
        "redis: not connected to a?[2Jb; no trigger since the start",
        "last pass: error at epoch 2, 2027-01-15 07:59:30 UTC (30 s ago): e?f",
    ]


def _lines(out: str) -> list[str]:
    return out.splitlines()


@pytest.mark.netns
@needs_redis
def test_status_fleet_status_and_a_fresh_redis_with_a_real_daemon(tmp_path: Path):
    from tests.test_bus_hostile import unix_redis

    with unix_redis(tmp_path / "r") as r, Lab(prefix="mtdst") as lab:
        d = Daemons(lab, tmp_path, r.url)
        lab.add_server("a")
        state = d.state("a")
        (tmp_path / "a" / "epoch").write_text('{"epoch": 3}\n')  # a host ahead of a new Redis
        d.start("a")

        def status(*args: str) -> str:
            out = mtd("-s", str(state), "--templates", str(tmp_path / "tpl"), "status", *args,
                      ns=lab, role="a")  # fmt: skip
            assert out.returncode == 0, out.stderr
            return out.stdout

        d.wait("a", lambda e: "not set (a new Redis" in e.get("message", ""))
        logs = (tmp_path / "a.log").read_text()
        assert "mtd:epoch not set (a new Redis, or one that restarted without its data): put " \
               "back epoch 3, this host's" in logs  # fmt: skip
        assert "was at epoch 0" not in logs and '"level":"warning"' not in logs
        doc = json.loads(status("--json"))
        daemon = doc["daemon"]
        assert daemon["running"] is True and daemon["redis"]["connected"] is True
        assert daemon["last_pass"]["result"] == "changed" and daemon["last_pass"]["epoch"] == 3
        text = _lines(status())
        pid = daemon["pid"]
        assert text[2].startswith(f"mtd run: pid {pid}, running since ")
        assert text[3].startswith("redis: connected to unix://***@") and text[3].endswith(
            "; no trigger since the start"
        )
        assert text[4].startswith("last pass: changed at epoch 3, ")
        # SIGTERM: stopped within a second, and shown so to the fleet
        proc = d.procs.pop("a")
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        took = time.monotonic() - start
        assert proc.returncode == 0 and took < 1.0, took
        ci = write_state(tmp_path / "ci.yaml", redis=d.redis)
        out = mtd("-s", str(ci), "fleet", "status", "--json")
        assert out.returncode == 2
        (host,) = json.loads(out.stdout)["hosts"]
        assert (host["status"], host["why"]) == ("stopped", "mtd run stopped on purpose")
        assert "mtd run: not running on this state (no daemon.json)" in status()

        # a pending `apply --confirm` revert (a first apply in a namespace of its own)
        lab.add_server("c")
        (tmp_path / "c").mkdir()
        other = write_state(tmp_path / "c" / "state.yaml")
        armed = mtd("-s", str(other), "apply", "--confirm", "300", ns=lab, role="c")
        assert armed.returncode == 0, armed.stderr
        out = mtd("-s", str(other), "status", ns=lab, role="c")
        (line,) = [x for x in _lines(out.stdout) if x.startswith("pending revert:")]
        assert line.startswith("pending revert: mtd apply --confirm puts table inet mtd of before")
        assert line.endswith(" s unless `mtd confirm` runs")
        pending = json.loads(mtd("-s", str(other), "status", "--json", ns=lab, role="c").stdout)
        assert set(pending["pending_revert"]) == {"table", "deadline", "armed"}
        assert mtd("-s", str(other), "confirm", ns=lab, role="c").returncode == 0
