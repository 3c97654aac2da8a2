"""Start-up without timing (timings drift): what a short command imports. `mtd apply` loads
only its own command module, and once its caches are warm (README: Performance) neither
PyYAML nor jsonschema nor Jinja2, which were most of its start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from reconciler.cli.common import COMMAND_MODULES, cli, load_commands
from tests.conftest import MTD, ROOT, write_state

# Never imported by `apply` (nor `apply --check`, `diff`, `status`) once the caches are warm.
HEAVY = (
    "yaml",
    "jsonschema",
    "referencing",
    "jinja2",
    "reconciler.core.sandbox",
    "reconciler.cli.fleet",
    "reconciler.cli.fleet_status",
    "reconciler.cli.pull",
    "reconciler.cli.history",
    "reconciler.cli.watch",
    "reconciler.cli.tools",
    "reconciler.cli.mapping",
    "reconciler.services.daemon",
    "reconciler.services.gitops",
    "reconciler.adapters.bus",
    "reconciler.adapters.git",
    "redis",
    "prometheus_client",
    "deepdiff",
    "subprocess",  # the scratch namespace (cached) and the confirm watcher only
    "secrets",  # os.urandom is what it reads
)


def imported(stderr: str) -> set[str]:
    """Module names from `python -X importtime`'s report."""
    out = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            out.add(line.rsplit("|", 1)[1].strip())
    return out


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)


def test_every_command_is_found_in_the_module_named_for_it():
    load_commands()
    assert set(COMMAND_MODULES) == set(cli.commands)
    for name, command in cli.commands.items():
        callback = command.callback
        assert callback is not None
        assert callback.__module__ == f"reconciler.cli.{COMMAND_MODULES[name]}", name
        assert isinstance(command, click.Command)


def test_the_command_line_alone_imports_no_command_module():
    code = "import sys, reconciler.cli; print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    modules = set(out.stdout.split())
    assert "reconciler.cli.common" in modules
    assert not heavy(modules) and "reconciler.cli.host" not in modules


def test_validate_loads_only_its_module(tmp_path: Path):
    state = write_state(tmp_path / "s.yaml")
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "reconciler", "-s", str(state), "validate"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    modules = imported(out.stderr)
    assert "reconciler.cli.host" in modules and "jsonschema" in modules  # nothing cached yet
    assert not [m for m in heavy(modules) if m.startswith("reconciler.cli.")]


@pytest.mark.netns
def test_a_second_apply_imports_neither_jsonschema_nor_jinja(lab, tmp_path: Path):
    state = write_state(tmp_path / "s.yaml")
    first = lab.run("srv", [*MTD, "-s", str(state), "apply"], cwd=ROOT)
    assert first.returncode == 0, first.stderr
    runs = [(["apply"], False), (["apply", "--check"], False), (["diff"], False)]
    runs += [(["status"], False), (["apply"], True)]  # True: the table deleted, re-created
    for args, changes in runs:
        if changes:
            lab.sh("srv", "nft delete table inet mtd")
        argv = [sys.executable, "-X", "importtime", *MTD[1:], "-s", str(state), *args]
        out = lab.run("srv", argv, cwd=ROOT)
        assert out.returncode == 0, (args, out.stderr[-2000:])
        modules = imported(out.stderr)
        assert "reconciler.cli.host" in modules and "nftables" in modules, args
        assert heavy(modules) == [], args
    # A changed state is validated (and rendered) again: the caches never hide a change. The
    # table's name alone is a placeholder of the rendered text: change what the rules say.
    write_state(
        tmp_path / "s.yaml",
        table="mtd2",
        ports={"range": [1, 20], "services": {"tcp": [1, 2, 3, 4], "udp": [53]}},
    )
    argv = [sys.executable, "-X", "importtime", *MTD[1:], "-s", str(state), "apply", "--check"]
    out = lab.run("srv", argv, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert {"yaml", "jsonschema", "jinja2"} <= imported(out.stderr)
    assert "table inet mtd2" in out.stdout, out.stdout[-2000:]


DOCUMENTS = [
    {"nftables": []},
    {"nftables": [{"add": {"table": {"family": "inet", "name": "t"}}}]},
    {},
    {"nftables": {}},
    {"nftables": [1]},
    {"nftables": [{}, "x"]},
    {"other": [], "nftables": [{}]},
]


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_the_libnftables_schema_check_agrees_with_the_bindings_validator(doc):
    """`bindings.json_validate` checks the shipped schema's one rule without jsonschema:
    the same verdict as the bindings' own validator, on valid and invalid documents."""
    from reconciler.adapters import bindings

    try:
        module = bindings.module()
    except Exception as exc:  # no bindings here: nothing to compare with
        pytest.skip(str(exc))
    schema = Path(module.__file__ or "").with_name("schema.json")
    if not schema.exists():
        pytest.skip("the bindings ship no schema.json")
    assert bindings._known_schema(str(schema))
    try:
        bindings._validator().json_validate(doc)
        theirs = True
    except Exception:
        theirs = False
    try:
        bindings.json_validate(doc)
        ours = True
    except ValueError:
        ours = False
    assert ours == theirs


def test_a_mistyped_command_is_still_given_a_suggestion():
    out = subprocess.run([*MTD, "aply"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 2
    assert "No such command 'aply'. Did you mean 'apply'?" in out.stderr
