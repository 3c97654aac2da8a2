"""Installing mtd the way Python users do: the built wheel in a plain venv, with or without
the `nftables` extra, and one line saying what to install when the bindings are missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.adapters import files
from reconciler.lab.netns import Lab
from tests.conftest import ROOT, write_state

# Runs the CLI with the bindings or the library made unloadable, as on a machine without them.
WITHOUT = """
import sys
from reconciler.adapters import bindings
if sys.argv[1] == "module":
    sys.modules["nftables"] = None
elif sys.argv[1] == "impostor":  # another package's module of the same name
    import types
    sys.modules["nftables"] = types.ModuleType("nftables")
else:
    bindings.SONAME = "libnftables.so.0-not-installed"
sys.argv[0:2] = ["mtd"]
from reconciler.cli import main
main()
"""


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("mtd: error: "), out.stderr
    return out.stderr


@pytest.mark.parametrize("command", ["apply", "diff", "status", "down"])
def test_missing_bindings_say_what_to_install(state_file: Path, command: str):
    files.load_secret(state_file.parent / "secret", create=True)  # diff, status only read it
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT, "module", command, "-s", str(state_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    line = one_error_line(out)
    assert "apt install python3-nftables" in line
    assert f"{sys.executable} -m pip install pip-nftables " in line and "mtd[" not in line


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("library", "cannot load libnftables.so.0-not-installed"),
        ("impostor", "module nftables at ? is not the libnftables bindings"),
    ],
)
def test_a_missing_libnftables_or_other_module_says_what_to_install(
    state_file: Path, case: str, expected: str
):
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT, case, "apply", "-s", str(state_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    line = one_error_line(out)
    assert expected in line and "install" in line


# Kept between runs, as pip's own cache is: installs then need no index.
WHEELHOUSE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtd-tests"


# Where a pip install puts the man pages and the completion script, under the venv's prefix.
SHARED_DATA = {
    "share/man/man8/mtd.8": "man/mtd.8",
    "share/man/man5/mtd.yaml.5": "man/mtd.yaml.5",
    "share/bash-completion/completions/mtd": "man/mtd.bash-completion",
}


def glob_one(root: Path, pattern: str) -> Path:
    (found,) = root.glob(pattern)
    return found


def pip(*args: str, check: bool = True) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert out.returncode == 0 or not check, out.stderr[-2000:]
    return out.returncode == 0


def install(python: str, spec: str) -> None:
    """Into the venv of `python`, from the wheelhouse, filled from the index when it lacks
    something."""
    local = ["install", "-q", "--no-compile", "--no-index", "--find-links", str(WHEELHOUSE)]
    if not pip("--python", python, *local, spec, check=False):
        pip("download", "-q", "-d", str(WHEELHOUSE), spec)
        pip("--python", python, *local, spec)


@pytest.mark.netns
def test_the_wheel_in_a_plain_venv_validates_and_applies(tmp_path: Path):
    pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT))
    (wheel,) = tmp_path.glob("mtd-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python, cli = str(venv / "bin" / "python"), str(venv / "bin" / "mtd")
    state = write_state(tmp_path / "state.yaml", table="mtdwheel")
    install(python, str(wheel))
    with Lab(prefix="mtdpkg") as lab:
        lab.add_server()

        def run(*args: str) -> subprocess.CompletedProcess:
            return lab.run("srv", [cli, *args, "-s", str(state)], cwd=tmp_path, timeout=120)

        # no system site packages: the venv sees no bindings until the extra brings them
        assert run("validate").returncode == 0
        # the example, the unit, the fail2ban action, man pages and completion come along
        share = glob_one(venv, "lib/python3*/site-packages/reconciler/share")
        example = share / "example/state.yaml"
        assert example.read_text() == (ROOT / "desired_state/mtd.yaml").read_text()
        assert (share / "systemd/mtd.service").read_text().startswith("# mtd reconcile daemon")
        assert (share / "fail2ban/action.d/mtd.conf").exists()
        for installed, source in SHARED_DATA.items():
            assert (venv / installed).read_text() == (ROOT / source).read_text(), installed
        shipped = lab.run("srv", [cli, "validate", "-s", str(example)], cwd=tmp_path)
        assert shipped.returncode == 0, shipped.stderr
        line = one_error_line(run("apply"))
        assert f"{python} -m pip install pip-nftables " in line and "python3-nftables" in line
        install(python, "pip-nftables")  # what the line says, from the wheelhouse
        out = run("apply")
        assert out.returncode == 0 and out.stdout.startswith("changed: table inet mtdwheel")
        assert run("apply", "--check").stdout.startswith("ok: table inet mtdwheel")
        assert run("diff").returncode == 0
        assert run("down").stdout.startswith("changed: table inet mtdwheel removed")
