"""Messages that say what to do: each with its exact text and exit code.

Not root or no CAP_NET_ADMIN (one line, for every command that needs nftables, before any
file is made), an audit log of the wrong mode, `rotate`'s count of what it drew, a failed
first `apply` leaving a fresh state directory as it was, an unknown template, `tripwire.for`
as a duration, SIGTERM within a second even while Redis is away. (A lost secret under a
live table: tests/test_secret_lifecycle.py.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.lab.netns import Lab
from tests.conftest import MTD, ROOT, mtd, write_state
from tests.test_operator_kernel import REFUSED

SETPRIV = shutil.which("setpriv")
needs_setpriv = pytest.mark.skipif(SETPRIV is None, reason="needs setpriv (util-linux)")
NFT_COMMANDS = [
    ["apply"], ["rotate"], ["diff"], ["status"], ["down"], ["apply", "--check"],
    ["watch", "add", "192.0.2.7", "--local"], ["run"],
]  # fmt: skip


@pytest.fixture
def public(tmp_path: Path) -> Iterator[Path]:
    """A directory anyone may read (a state another user can load), removed after."""
    d = Path(tempfile.mkdtemp(prefix="mtd-msg-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _drop(*argv: str, user: bool) -> subprocess.CompletedProcess:
    """`argv` without CAP_NET_ADMIN: as root without it, or as user nobody."""
    if user:
        prefix = [SETPRIV or "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        prefix = [SETPRIV or "setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, cwd=ROOT, check=False)


@needs_setpriv
@pytest.mark.parametrize("user", [False, True], ids=["root-without-cap", "not-root"])
@pytest.mark.parametrize("args", NFT_COMMANDS, ids=lambda a: "-".join(a[:2]))
def test_without_cap_net_admin_one_line_and_no_file_made(public: Path, args: list[str], user: bool):
    state = write_state(public / "s.yaml", secret_file=str(public / "sd" / "secret"))
    out = _drop(*MTD, "-s", str(state), "--state-dir", str(public / "sd"), *args, user=user)
    name = "mtd " + " ".join(a for a in args[:2] if not a.startswith("-") and "." not in a)
    if user:
        want = (
            f"mtd: error: {name}: not root: nftables needs CAP_NET_ADMIN: run it as root "
            f"(sudo {name})\n"
        )
    else:
        want = (
            f"mtd: error: {name}: root without CAP_NET_ADMIN (a container, or a unit that "
            "drops it): nftables needs it: grant it (AmbientCapabilities=CAP_NET_ADMIN, or "
            "--cap-add NET_ADMIN)\n"
        )
    assert (out.returncode, out.stderr, out.stdout) == (1, want, "")
    assert not (public / "sd").exists()  # no audit log, lock, cache or secret made


@pytest.mark.netns
def test_an_audit_log_of_the_wrong_mode_says_what_fixes_it(lab: Lab, tmp_path: Path):
    log = tmp_path / "audit.jsonl"
    log.write_text("")
    log.chmod(0o644)
    state = write_state(tmp_path / "s.yaml")
    out = mtd("-s", str(state), "apply", ns=lab)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (
        f"mtd: error: {log}: cannot write the audit log: mode 0644: expected 0600, the audit "
        f"log is private (run: chmod 600 {log}): nothing changed\n"
    )
    assert "absent" in lab.sh("srv", "nft list table inet mtd 2>&1 || echo absent")
    log.chmod(0o600)
    assert mtd("-s", str(state), "apply", ns=lab).returncode == 0


@pytest.mark.netns
def test_rotate_counts_what_it_drew_for_buckets(lab: Lab, tmp_path: Path):
    state = write_state(
        tmp_path / "s.yaml",
        watched=[{"source": "0.0.0.0/0", "per_source": True}, {"source": "192.0.2.3"}],
        buckets=4,
    )
    assert mtd("-s", str(state), "apply", ns=lab).returncode == 0
    out = mtd("-s", str(state), "rotate", ns=lab)
    assert out.returncode == 0, out.stderr
    # 192.0.2.3 moves its 5 tcp and 1 udp ports; each of 4 buckets the same 6
    line = out.stdout.rsplit(" (", 1)[0]
    assert line == (
        "changed: table inet mtd epoch 1: 30 mappings drawn anew (6 for watched entries, 24 in "
        "4 buckets for per_source and dynamic sources), table replaced without reading it"
    )


@pytest.mark.netns
def test_a_failed_first_apply_leaves_a_fresh_state_directory_as_it_was(lab: Lab, tmp_path: Path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "refused.json.j2").write_text(REFUSED)
    fresh = tmp_path / "var" / "lib" / "mtd"
    state = write_state(tmp_path / "s.yaml", template="refused", secret_file=str(fresh / "secret"))
    out = mtd("-s", str(state), "--templates", str(templates), "--state-dir", str(fresh),
              "apply", ns=lab)  # fmt: skip
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("mtd: error: nftables refused rendered command 1 (add set tiny)")
    assert not (tmp_path / "var").exists()  # no secret, audit log, lock, cache, nor their dirs
    fresh.mkdir(parents=True)  # an empty directory made by someone: kept, and left empty
    out = mtd("-s", str(state), "--templates", str(templates), "--state-dir", str(fresh),
              "apply", ns=lab)  # fmt: skip
    assert out.returncode == 1 and list(fresh.iterdir()) == []


def test_an_unknown_template_names_those_that_exist(tmp_path: Path):
    state = write_state(tmp_path / "s.yaml", template="mpas")
    out = mtd("-s", str(state), "validate")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (
        f"mtd: error: template 'mpas': no mpas.json.j2 in {ROOT / 'templates'}: expected one of "
        "classic, maps, or a directory holding mpas.json.j2 given with --templates DIR\n"
    )


@pytest.mark.parametrize(
    ("given", "seconds", "error"),
    [
        ("1h", 3600, None), ("10m", 600, None), (90, 90, None),
        ("1x", None, "tripwire.for: '1x': expected SECONDS or a number with s, m, h or d "
                     "(3600, 10m, 1h, 2d)"),
        ("31d", None, "tripwire.for: '31d': expected 1 second to 30 days"),
    ],
)  # fmt: skip
def test_tripwire_for_takes_durations_as_mtd_watch_does(
    tmp_path: Path, given: object, seconds: int | None, error: str | None
):
    state = write_state(
        tmp_path / "s.yaml",
        watched=[{"source": "0.0.0.0/0", "per_source": True}],
        tripwire={"tcp": [23], "for": given},
    )
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o600)
    out = mtd("-s", str(state), "render")
    if error is not None:
        (line,) = out.stderr.splitlines()
        assert out.returncode == 1 and line.startswith("mtd: error: ") and line.endswith(error)
        return
    assert out.returncode == 0, out.stderr
    timeouts = {int(t) for t in re.findall(r'"timeout": ?(\d+)', out.stdout)}
    assert timeouts == {seconds}


@pytest.mark.netns
def test_sigterm_ends_mtd_run_within_a_second_even_while_redis_is_away(lab: Lab, tmp_path: Path):
    # Redis at an address whose packets are dropped: connecting hangs until its timeout.
    lab.sh("srv", "nft add table ip away; nft add chain ip away o "
                  "'{ type filter hook output priority 0; }'; "
                  "nft add rule ip away o ip daddr 192.0.2.200 drop")  # fmt: skip
    state = write_state(tmp_path / "s.yaml", redis={"url": "redis://192.0.2.200:6379/0"})
    for settle in ("start", "loop"):
        log = (tmp_path / f"{settle}.log").open("w")
        proc = lab.spawn("srv", [*MTD, "-s", str(state), "run", "--log-json"],
                         stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)  # fmt: skip
        want = '"event":"start"' if settle == "start" else '"event":"reconcile"'
        deadline = time.monotonic() + 20
        while want not in (tmp_path / f"{settle}.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        took = time.monotonic() - start
        log.close()
        assert took < 1.0, (settle, took)
    lab.sh("srv", "nft delete table ip away")
    assert json.loads((tmp_path / "loop.log").read_text().splitlines()[-1])["event"] == "stop"
    assert os.path.exists(state)
