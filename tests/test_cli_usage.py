"""The CLI as users type it: shared options before or after the command's name, `$MTD_STATE`,
one declaration per option group, an example in every `--help`, and `make diff`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from reconciler.adapters import files
from reconciler.cli.common import cli, load_commands
from reconciler.lab.netns import Lab
from tests.conftest import MTD, ROOT, mtd, write_state

load_commands()  # commands are registered when first looked up; these tests read them all

SHARED = {"state_path", "templates", "debug", "host"}
NO_STATE = {"schema", "import-seed", "pull"}  # commands whose state comes from elsewhere
PULL = {"branch", "subdir", "state_dir", "verify_signatures", "gpg_home", "git_timeout"}


def params(name: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in command(name).params if p.name}


def command(name: str) -> click.Command:
    """`apply`, or a group's subcommand as `fleet status`."""
    group, _, sub = name.partition(" ")
    found = cli.commands[group]
    return found.commands[sub] if sub and isinstance(found, click.Group) else found


def commands() -> list[str]:
    """Every command users run: a group's subcommands, not the group itself."""
    out = []
    for name, found in cli.commands.items():
        if isinstance(found, click.Group):
            out += [f"{name} {sub}" for sub in found.commands]
        else:
            out.append(name)
    return out


def inventory(root: Path) -> Path:
    """Hosts web1 and web2; web2 watches a second source, so the two differ."""
    root.mkdir()
    write_state(root / "base.yaml", table="mtdusage")
    (root / "groups").mkdir()
    (root / "groups" / "web.yaml").write_text("hosts: [web1, web2]\n")
    (root / "hosts").mkdir()
    (root / "hosts" / "web2.yaml").write_text("watched: [{source: 203.0.113.9}]\n")
    files.load_secret(root / "secret", create=True)  # provisioned: diff only reads it
    return root


def test_every_command_that_reads_a_state_takes_the_shared_options():
    for name in commands():
        if name not in NO_STATE:
            assert params(name).keys() >= SHARED, name
            assert "-s" in params(name)["state_path"].opts, name
    assert {"templates", "debug", "host"} <= params("pull").keys()


@pytest.mark.parametrize(
    "argv",
    [
        ["-s", "{s}", "validate"],
        ["validate", "-s", "{s}"],
        ["validate", "--state", "{s}"],
        ["-s", "/nonexistent", "validate", "-s", "{s}"],  # the last one typed wins
    ],
)
def test_state_before_or_after_the_command(state_file: Path, argv: list[str]):
    out = mtd(*[a.format(s=state_file) for a in argv])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ok: {state_file}:")


def test_mtd_state_is_the_fallback_of_either_place(state_file: Path):
    def with_env(value: str, *argv: str) -> subprocess.CompletedProcess:
        env = os.environ | {"MTD_STATE": value}
        return subprocess.run(
            [*MTD, *argv], env=env, capture_output=True, text=True, check=False, cwd=ROOT
        )

    assert with_env(str(state_file), "validate").returncode == 0
    files.load_secret(state_file.parent / "secret", create=True)  # render only reads it
    assert with_env(str(state_file), "render", "--epoch", "1").returncode == 0
    assert with_env("/nonexistent", "-s", str(state_file), "validate").returncode == 0
    assert with_env("/nonexistent", "validate", "-s", str(state_file)).returncode == 0
    out = with_env("/nonexistent", "validate")
    assert out.returncode == 1 and out.stderr.startswith("mtd: error: /nonexistent: ")


def test_help_names_mtd_state_at_the_top_and_in_each_command():
    runner = CliRunner()
    for argv in ([], ["apply"], ["diff"], ["run"]):
        out = runner.invoke(cli, [*argv, "--help"], prog_name="mtd")
        assert out.exit_code == 0 and "MTD_STATE" in out.output, argv


def test_templates_and_host_after_the_command(tmp_path: Path):
    state = inventory(tmp_path / "fleet")
    custom = tmp_path / "tpl"
    custom.mkdir()
    shutil.copy(ROOT / "templates" / "maps.json.j2", custom / "mine.json.j2")
    (state / "hosts" / "web1.yaml").write_text("template: mine\n")
    out = mtd("validate", "--state", str(state), "--host", "web1", "--templates", str(custom))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok: web1: 4 watched sources, template mine\n"
    assert mtd("--templates", str(custom), "validate", "-s", str(state)).returncode == 0
    out = mtd("validate", "-s", str(state), "--host", "web1")  # without the directory
    assert out.returncode == 1 and "mine" in out.stderr and out.stderr.count("\n") == 1


def test_every_command_shows_an_example():
    runner = CliRunner()
    for name in [None, *cli.commands, *commands()]:
        argv = [*name.split(), "--help"] if name else ["--help"]
        out = runner.invoke(cli, argv, prog_name="mtd")
        assert out.exit_code == 0, name
        assert re.search(rf"Examples:\n +mtd {name or ''}", out.output), name


def test_the_pull_options_are_declared_once_for_pull_and_run():
    pull, run = params("pull"), params("run")
    assert pull.keys() >= PULL and run.keys() >= PULL
    for name in PULL:
        assert pull[name].opts == run[name].opts and pull[name].default == run[name].default
    # run --pull hands them over: a bad value is refused by the same declaration
    out = mtd("run", "--pull", "file:///nonexistent", "--git-timeout", "0")
    assert out.returncode == 2 and "--git-timeout" in out.stderr


@pytest.mark.netns
def test_apply_and_diff_as_users_type_them_and_make_diff(tmp_path: Path):
    state = inventory(tmp_path / "fleet")
    make = ["make", "-s", "-C", str(ROOT), "-o", "setup", "diff", f"STATE={state}", "HOST=web2"]
    with Lab(prefix="mtdcli") as lab:
        lab.add_server()
        out = mtd("diff", "--state", str(state), "--host", "web2", ns=lab)
        assert out.returncode == 2 and "203.0.113.9" in out.stdout, out.stderr
        out = lab.run("srv", make)  # pending changes: a preview, not a make error
        assert out.returncode == 0 and "203.0.113.9" in out.stdout, out.stderr
        out = mtd("apply", "-s", str(state), "--host", "web2", ns=lab)
        assert out.returncode == 0 and out.stdout.startswith("changed: table inet mtdusage")
        assert mtd("diff", "--state", str(state), "--host", "web2", ns=lab).returncode == 0
        assert mtd("-s", str(state), "diff", "--host", "web1", ns=lab).returncode == 2
        assert lab.run("srv", make).returncode == 0
        broken = [*make[:-2], f"STATE={tmp_path / 'nonexistent'}"]
        out = lab.run("srv", broken)
        assert out.returncode != 0 and "nonexistent" in out.stderr
