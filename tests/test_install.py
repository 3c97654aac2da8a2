"""README's install steps, followed in a temporary root: `make install` puts the command
where the unit runs it and the state where mtd looks for it, and systemd accepts the unit."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "No matching distribution")


def test_make_install_then_the_unit_runs_what_is_installed(tmp_path: Path):
    dirs = {
        "OPT": tmp_path / "opt/mtd",
        "BINDIR": tmp_path / "usr/local/bin",
        "ETC": tmp_path / "etc/mtd",
        "UNITDIR": tmp_path / "etc/systemd/system",
        "DOCDIR": tmp_path / "usr/share/doc/mtd",
        "MANDIR": tmp_path / "usr/local/share/man",
        "COMPLETIONDIR": tmp_path / "usr/local/share/bash-completion/completions",
    }
    out = subprocess.run(
        ["make", "-s", "install", *(f"{k}={v}" for k, v in dirs.items())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if out.returncode != 0 and any(word in out.stderr for word in OFFLINE):
        pytest.skip(f"pip cannot reach the package index: {out.stderr.strip()[-200:]}")
    assert out.returncode == 0, out.stdout + out.stderr
    mtd = dirs["BINDIR"] / "mtd"
    assert os.access(mtd, os.X_OK) and mtd.resolve() == (dirs["OPT"] / "bin/mtd").resolve()
    assert (dirs["ETC"] / "state.yaml").read_text() == (ROOT / "desired_state/mtd.yaml").read_text()
    assert (dirs["DOCDIR"] / "README.md").exists()
    for page in (ROOT / "docs").glob("*.md"):  # where README's links lead
        assert (dirs["DOCDIR"] / "docs" / page.name).read_text() == page.read_text()
    assert (dirs["MANDIR"] / "man8/mtd.8").read_text() == (ROOT / "man/mtd.8").read_text()
    assert (dirs["COMPLETIONDIR"] / "mtd").exists()
    # Its own venv: no system site packages, only Debian's nftables bindings and PyYAML.
    python = dirs["OPT"] / "bin/python"
    path = subprocess.run(
        [python, "-c", "import sys, nftables, yaml; print(sys.path, nftables.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "dist-packages'" not in path and f"{dirs['OPT']}/system-modules/nftables/" in path

    # The installed command, run from anywhere, finds its state where the unit puts it.
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    ok = subprocess.run(
        [mtd, "-s", dirs["ETC"], "validate"], cwd=elsewhere, capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok: {dirs['ETC']}:"), ok.stderr
    if not Path("/etc/mtd").exists():  # this machine has no installed state: says where
        lost = subprocess.run([mtd, "validate"], cwd=elsewhere, capture_output=True, text=True)
        assert lost.returncode == 1
        assert "looked for ./desired_state and /etc/mtd" in lost.stderr

    unit = dirs["UNITDIR"] / "mtd.service"
    assert f"ExecStart={mtd} --state {dirs['ETC']} run " in unit.read_text()
    # A second install keeps the operator's state.
    (dirs["ETC"] / "state.yaml").write_text("# mine\n" + (dirs["ETC"] / "state.yaml").read_text())
    again = subprocess.run(
        ["make", "-s", "install", *(f"{k}={v}" for k, v in dirs.items())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    assert (dirs["ETC"] / "state.yaml").read_text().startswith("# mine\n")
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze for the last step")
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr
    assert "mtd.service" not in verify.stderr, verify.stderr


@pytest.mark.parametrize("opt", ["", "relative/dir", "/", "EXISTING"])
def test_make_install_never_replaces_what_is_not_its_venv(tmp_path: Path, opt: str):
    """OPT is replaced whole on every install: only a venv may be, nothing else."""
    keep = tmp_path / "data"
    keep.mkdir()
    (keep / "file").write_text("mine")
    # where a mistake would land, a DESTDIR in tmp_path; the existing directory as it is
    where = [] if opt == "EXISTING" else [f"DESTDIR={tmp_path / 'root'}"]
    opt = str(keep) if opt == "EXISTING" else opt
    out = subprocess.run(
        ["make", "-s", "install", f"OPT={opt}", *where],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode != 0 and ("absolute directory" in out.stderr or "no venv" in out.stderr)
    assert (keep / "file").read_text() == "mine" and not (tmp_path / "root").exists()
