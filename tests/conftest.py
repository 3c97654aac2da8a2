"""Shared fixtures. Tests that touch the kernel run only inside namespaces they create."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, find, settings
from hypothesis import strategies as st

from reconciler.lab.netns import Lab, standard_lab

# The suite shares its machine: input generation and examples may be slow without anything
# being wrong, and no test may depend on speed.
settings.register_profile("shared", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shared")

ROOT = Path(__file__).resolve().parent.parent
# The machine is shared and its load varies: a test never depends on speed, Hypothesis' too.
# Under CI (`CI` set) the examples are derandomised, so a red run replays exactly.
settings.register_profile(
    "mtd",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
)
settings.load_profile("mtd")
MTD = [sys.executable, "-m", "reconciler"]
# Not an SSH session, whoever runs the suite: `apply`, `rotate` and `pull` would otherwise
# check that session's port against each test's state (README: No lockouts). Set empty, the
# variable also stops the search through parent processes.
os.environ["SSH_CONNECTION"] = ""


@pytest.fixture(scope="session", autouse=True)
def _hypothesis_unicode_tables() -> None:
    """Build hypothesis' unicode tables once, before any test is timed.

    The first `st.text()` of a process on a machine without `.hypothesis/unicode_data`
    spends about a second building them, inside that test's first draw: its `too_slow`
    health check then fails on a cold machine only. Warming here keeps every property test
    checking exactly what it checks. (A fixture, not a plugin hook: hypothesis warns about
    storage used while plugins load.)
    """
    find(
        st.text(min_size=1),
        lambda _: True,
        settings=settings(database=None, suppress_health_check=list(HealthCheck)),
    )


HOST_DIRS = (Path("/var/lib/mtd"), Path("/etc/mtd"))  # an installed mtd's: never the suite's


def _host_snapshot() -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.lstat().st_mtime_ns, p.lstat().st_size)
        for d in HOST_DIRS
        if d.exists()
        for p in [d, *d.rglob("*")]
    }


@pytest.fixture(autouse=True)
def _host_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests keep to temp dirs and namespaces: one that writes where an installed mtd keeps
    its files (its default paths) fails, named, instead of changing this machine."""
    before = _host_snapshot()
    yield
    after = _host_snapshot()
    changed = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
    assert not changed, f"{request.node.nodeid} wrote into {changed}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    needs = [i for i in items if "netns" in i.keywords]
    if needs and (os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip")):
        skip = pytest.mark.skip(reason="needs root, nft and ip (run `make test` as root)")
        for item in needs:
            item.add_marker(skip)


def log_events(text: str) -> list[dict]:
    """The JSON lines of a daemon's log file, read while it may be writing: a last line
    without its newline is still being written, and is left for the next read."""
    done = text[: text.rfind("\n") + 1]
    return [json.loads(x) for x in done.splitlines() if x.startswith("{")]


def write_state(path: Path, **overrides: object) -> Path:
    """A valid desired state, like the proof of concept's example, with `overrides` on top."""
    doc: dict[str, object] = {
        "table": "mtd",
        "secret_file": str(path.parent / "secret"),
        "ports": {"range": [1, 20], "services": {"tcp": [1, 2, 3, 4, 5], "udp": [53]}},
        "watched": [
            {"source": "192.0.2.3", "ignore": {"tcp": [1, 2]}},
            {"source": "2001:db8::3", "ignore": {"tcp": [1, 2]}},
            {"source": "198.51.100.0/24"},
            {"source": "2001:db8:bad::/48"},
        ],
    }
    doc.update(overrides)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return write_state(tmp_path / "state.yaml")


def mtd(*args: str, ns: Lab | None = None, role: str = "srv") -> subprocess.CompletedProcess:
    """Run the real CLI, inside a lab namespace when given one."""
    argv = [*MTD, *args]
    if ns is not None:
        return ns.run(role, argv, cwd=ROOT)
    return subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with standard_lab() as lab:
        yield lab


@pytest.fixture(autouse=True, scope="session")
def _own_state_dir(tmp_path_factory: pytest.TempPathFactory):
    """`--state-dir` of every mtd a test runs, unless the test names one: its caches (and
    any file it keeps there) in a temp dir, never an installed mtd's /var/lib/mtd. Session
    wide, so that module fixtures that run mtd before any test's own fixtures have it too."""
    if "MTD_STATE_DIR" in os.environ:
        yield
        return
    os.environ["MTD_STATE_DIR"] = str(tmp_path_factory.mktemp("state-dir"))
    try:
        yield
    finally:
        os.environ.pop("MTD_STATE_DIR", None)


@pytest.fixture(autouse=True)
def _test_state_dir(
    _own_state_dir: None, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
):
    """Each test its own state directory, so no test finds another's caches or files."""
    if os.environ.get("MTD_STATE_DIR", "").startswith(str(tmp_path_factory.getbasetemp())):
        monkeypatch.setenv("MTD_STATE_DIR", str(tmp_path_factory.mktemp("state-dir")))
