"""`make demo` is the first thing a newcomer runs: it must work and leave nothing behind."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.redis_fixtures import needs_redis

pytestmark = [pytest.mark.netns, needs_redis]


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_demo_tells_the_whole_story_and_cleans_up():
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler.lab.demo"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=240)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    for expected in ("trigger start", "trigger redis", "was changed outside mtd by nft",
                     "epoch 1, in sync", "Lab removed"):  # fmt: skip
        assert expected in out.stdout, out.stdout
    views = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("trusted   192.0.2.2  ")]
    assert views and all("1,2,3,4,5" in ln for ln in views)  # the trusted view never moves
    # One view per source: what nmap finds from each address is where mtd says it is.
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("   untrusted 192.0.2.5")]
    assert len(rows) == 4, out.stdout
    for row in rows:
        told = {int(m.split("->")[1]) for m in row[3:]}
        assert set(map(int, row[2].split(","))) == told and len(told) == 5, row
    assert "before the trip: 1,2,3,4,5 " in out.stdout
    after = out.stdout.split("after: ", 1)[1].split()[0]
    assert after != "1,2,3,4,5" and len(after.split(",")) == 5
    assert any(ln.split()[:2] == ["198.51.100.9", "tripwire"] for ln in out.stdout.splitlines())
    assert not {ns for ns in namespaces() if ns.startswith(f"mtd{proc.pid}x")}  # lab removed
