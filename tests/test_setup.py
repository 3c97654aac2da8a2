"""The venv `make setup` makes: exactly the locked versions, none of the host's Python packages
but the libnftables bindings, and a second `make setup` changes nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import ROOT

VENV = ROOT / ".venv"
pytestmark = pytest.mark.skipif(
    Path(sys.prefix) != VENV, reason="runs in the venv `make setup` makes"
)


def pins(lock: Path) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\\n]+)", lock.read_text(), re.M)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


def test_the_venv_holds_the_locked_versions_and_nothing_of_the_hosts():
    installed = {
        re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
        for d in metadata.distributions()
    }
    locked = pins(ROOT / "requirements/dev.lock")
    assert {name: installed.get(name) for name in locked} == locked
    packages = ("dist-packages", "site-packages")
    outside = [p for p in sys.path if p.endswith(packages) and not p.startswith(str(VENV))]
    assert not outside
    import nftables  # Debian's bindings, through the one link the venv holds

    assert Path(nftables.__file__).parent.parent == VENV / "system-modules"
    assert sorted(p.name for p in (VENV / "system-modules").iterdir()) == ["nftables"]


def test_the_dev_lock_keeps_the_runtime_locks_versions():
    runtime, dev = pins(ROOT / "requirements/runtime.lock"), pins(ROOT / "requirements/dev.lock")
    assert {name: dev.get(name) for name in runtime} == runtime


def test_a_second_make_setup_changes_nothing():
    stamp = VENV / ".installed"
    before = stamp.stat().st_mtime_ns
    out = subprocess.run(
        ["make", "-s", "setup"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr
    assert stamp.stat().st_mtime_ns == before
