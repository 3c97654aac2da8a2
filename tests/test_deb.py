"""The Debian package, as an operator meets it: `apt install ./mtd_*.deb` gives the command,
man pages, completion, the unit (disabled), the example state and the fail2ban action as
conffiles; the example validates and applies (in a namespace); `apt purge` takes back all it
added and leaves the packages as they were. Runs when MTD_DEB names a built package
(`make package-test`); it refuses to run where mtd is installed or /etc/mtd exists."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.lab.netns import Lab
from tests.conftest import ROOT

DEB = os.environ.get("MTD_DEB", "")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not DEB, reason="MTD_DEB names no package (make package-test)"),
]
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-y", "-q"]
ADDED = [
    "/usr/bin/mtd",
    "/usr/lib/mtd",
    "/usr/share/man/man8/mtd.8.gz",
    "/usr/share/man/man5/mtd.yaml.5.gz",
    "/usr/share/bash-completion/completions/mtd",
    "/lib/systemd/system/mtd.service",
    "/etc/mtd",
    "/etc/fail2ban/action.d/mtd.conf",
    "/usr/share/doc/mtd",
]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "SSH_CONNECTION": ""}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=600)
    assert out.returncode == 0 or not check, f"{argv}: {out.stdout[-1500:]}{out.stderr[-1500:]}"
    return out


def installed() -> set[str]:
    out = sh("dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n").stdout
    return {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["ii"]}


@pytest.fixture
def package() -> Iterator[list[str]]:
    """The package installed, and the packages it pulled in (apt's lock keeps anyone else's
    install out of that window); all purged afterwards, even on failure."""
    if sh("dpkg-query", "-W", "mtd", check=False).returncode == 0 or Path("/etc/mtd").exists():
        pytest.skip("mtd is installed here, or /etc/mtd exists: not this machine's to change")
    before = installed()
    pulled: list[str] = []
    try:
        sh(*APT, "install", str(Path(DEB).resolve()))
        pulled += sorted(installed() - before - {"mtd"})
        yield pulled
    finally:
        sh(*APT, "purge", "mtd", *pulled, check=False)


def test_install_use_and_purge(package: list[str], tmp_path: Path):
    assert sh("sh", "-c", "command -v mtd").stdout.strip() == "/usr/bin/mtd"
    assert sh("mtd", "--version").stdout.startswith("mtd, version ")
    assert sh("man", "-w", "8", "mtd").stdout.strip() == "/usr/share/man/man8/mtd.8.gz"
    assert sh("man", "-w", "5", "mtd.yaml").stdout.strip() == "/usr/share/man/man5/mtd.yaml.5.gz"
    rendered = sh("man", "--warnings=all", "8", "mtd", check=False)
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
    script = "source /usr/share/bash-completion/completions/mtd && complete -p mtd"
    assert "_mtd_completion mtd" in sh("bash", "-c", script).stdout
    assert sh("systemctl", "is-enabled", "mtd.service", check=False).stdout.strip() == "disabled"
    conffiles = sh("dpkg-query", "-W", "-f=${Conffiles}", "mtd").stdout
    assert "/etc/mtd/state.yaml" in conffiles and "/etc/fail2ban/action.d/mtd.conf" in conffiles
    unit = Path("/lib/systemd/system/mtd.service").read_text()
    assert "ExecStart=/usr/bin/mtd --state /etc/mtd run " in unit
    verify = sh("systemd-analyze", "verify", "/lib/systemd/system/mtd.service", check=False)
    assert verify.returncode == 0 and "mtd.service" not in verify.stderr, verify.stderr
    assert Path("/usr/share/doc/mtd/README.md").exists()  # the unit's Documentation=
    docs = sorted(p.name for p in Path("/usr/share/doc/mtd/docs").glob("*.md"))
    assert docs == sorted(p.name for p in (ROOT / "docs").glob("*.md"))  # README's links
    action = Path("/etc/fail2ban/action.d/mtd.conf").read_text()
    assert action == (ROOT / "contrib/fail2ban/action.d/mtd.conf").read_text()

    # Its own venv: none of the system's site packages but the two modules it takes.
    path = sh("/usr/lib/mtd/bin/python", "-c", "import sys; print(sys.path)").stdout
    assert "dist-packages" not in path and "/usr/lib/mtd/system-modules" in path
    typo = sh("mtd", "aply", check=False)
    assert typo.returncode == 2 and "Did you mean 'apply'?" in typo.stderr

    state_dir = tmp_path / "state"
    ok = subprocess.run(
        ["mtd", "validate", "--state-dir", str(state_dir)], cwd="/", capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout.startswith("ok: /etc/mtd: "), ok.stderr
    with Lab(prefix="mtddeb") as lab:
        lab.add_server()
        env = {**os.environ, "SSH_CONNECTION": ""}

        def mtd(*args: str) -> subprocess.CompletedProcess:
            argv = ["mtd", "-s", "/etc/mtd", "--state-dir", str(state_dir), *args]
            return lab.run("srv", argv, cwd="/", env=env, timeout=120)

        applied = mtd("apply")
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.startswith("changed: table inet mtd")
        assert mtd("apply", "--check").stdout.startswith("ok: table inet mtd")
        assert "table inet mtd" in lab.sh("srv", "nft list tables")
        assert mtd("down").stdout.startswith("changed: table inet mtd removed")

    sh(*APT, "purge", "mtd", *package)
    assert not {"mtd", *package} & installed()
    left = [p for p in ADDED if os.path.lexists(p)]
    assert not left, f"apt purge left {left}"
