"""An operator's day without root: what README promises about the CLI, make and the daemon's
metrics, checked claim by claim (issue 14)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from reconciler.services.daemon import Metrics
from tests.conftest import MTD, ROOT, mtd


@pytest.mark.parametrize(
    "args", [["diff", "--epoch", "-5"], ["render", "--epoch", "-1"]], ids=["diff", "render"]
)
def test_negative_epochs_are_refused_in_one_line(state_file: Path, args: list[str]):
    out = mtd("-s", str(state_file), *args)
    assert out.returncode == 1  # not 2: for `diff` that means "changes pending"
    assert out.stderr == f"mtd: error: --epoch {args[2]}: expected an epoch of 0 or more\n"
    assert not out.stdout


@pytest.mark.parametrize(
    ("target", "args"),
    [("bench", "ARGS=--quick"), ("bench-quick", ""), ("bench-quick", "ARGS=--runs 2")],
)
def test_make_bench_passes_its_arguments(target: str, args: str):
    out = subprocess.run(
        ["make", "-n", target, *([args] if args else [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    last = out.stdout.strip().splitlines()[-1]
    assert last.endswith("benchmarks/bench.py --quick" + (" --runs 2" if "runs" in args else ""))


def test_pull_metrics_only_with_pull():
    without = generate_latest(Metrics().registry).decode()
    assert "mtd_reconciles_total" in without
    for name in ("mtd_pulls_total", "mtd_pull_head_rejected", "mtd_pull_fetch_failures"):
        assert name not in without
    with_pull = generate_latest(Metrics(pull=True).registry).decode()
    for name in ("mtd_pulls_total", "mtd_pull_head_rejected", "mtd_pull_fetch_failures"):
        assert name in with_pull


def test_pull_once_says_nothing_of_a_next_try(tmp_path: Path):
    gone = tmp_path / "gone.git"
    out = mtd("pull", "--repo", str(gone), "--state-dir", str(tmp_path / "sd"), "--once")
    assert out.returncode == 1
    assert out.stderr.startswith("mtd: error: ") and len(out.stderr.splitlines()) == 1
    assert "keeping the current state" in out.stderr and "next try" not in out.stderr


def test_a_continuous_pull_says_what_it_follows(tmp_path: Path):
    gone, sd = tmp_path / "gone.git", tmp_path / "sd"
    argv = [*MTD, "pull", "--repo", str(gone), "--state-dir", str(sd), "--interval", "30"]
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "next try in" not in (tmp_path / "err").read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert (tmp_path / "out").read_text() == (
        f"mtd pull: following {gone} branch main every 30 s (clone and pull.json in {sd})\n"
    )
    (line,) = (tmp_path / "err").read_text().splitlines()
    assert "keeping the current state" in line and line.endswith(" s")
