"""The documentation's reference tables against the code, so they cannot drift: the commands
and their options (click), the metrics (the daemon's Prometheus registry), the template
variables (the render context), the layout (the package's folders) and the desired state's
keys (schema.json). Each table is read from the page it lives on; each failure names the page
and the row to add or fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest

from reconciler.cli.common import cli, load_commands
from reconciler.core import render, shuffle
from reconciler.core.state import parse
from reconciler.services.daemon import Metrics
from tests.conftest import ROOT, write_state

load_commands()  # commands are registered when first looked up; these tests read them all

COMMANDS, METRICS, CONFIGURATION, DEVELOPMENT = (
    f"docs/{name}.md" for name in ("commands", "operations", "configuration", "development")
)
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
CODE = re.compile(r"`((?:[^`\\]|\\.)+)`")  # a code span; `\|` is a pipe inside a table


def table(page: str, header: str) -> list[list[str]]:
    """The rows of the table on `page` whose header row is `header`, as lists of cells."""
    lines = [line.strip() for line in (ROOT / page).read_text().splitlines()]
    assert header in lines, f"{page}: no table with the header {header!r}"
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def spans(cell: str) -> list[str]:
    return [s.replace("\\|", "|") for s in CODE.findall(cell)]


def test_every_command_has_a_row_and_each_row_names_real_options():
    documented: set[str] = set()
    for row in table(COMMANDS, "| command | what it does | exit code |"):
        for usage in (s for s in spans(row[0]) if s.startswith("mtd ")):
            name, *args = usage.split()[1:]
            assert name in cli.commands, f"{COMMANDS} names `mtd {name}`, which does not exist"
            documented.add(name)
            command = cli.commands[name]
            if isinstance(command, click.Group):  # `mtd fleet status`: a group's subcommand
                assert args and args[0] in command.commands, f"{COMMANDS}: `mtd {name} {args[:1]}`"
                command = command.commands[args.pop(0)]
            known = {o for p in command.params for o in p.opts + p.secondary_opts}
            for option in re.findall(r"--[a-z][a-z-]*", " ".join(args)):
                assert option in known, f"{COMMANDS}: `mtd {name}` has no option {option}"
    missing = sorted(set(cli.commands) - documented)
    assert not missing, f"{COMMANDS}: the command table lacks rows for: " + ", ".join(
        f"| `mtd {n}` | {cli.commands[n].get_short_help_str(60)} | exit codes |" for n in missing
    )


def exported_metrics() -> dict[str, tuple[str, dict[str, set[str]]]]:
    """Name as scraped -> (type, label -> values created at start); with `--pull`, so the
    pull metrics are there too (test_operator checks they are not without it)."""
    from reconciler.services import crowdsec

    out = {}
    metrics = Metrics(pull=True)
    crowdsec.register(metrics)  # with `crowdsec:` in the host's configuration
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels: dict[str, set[str]] = {}
        for sample in family.samples:
            for key, value in sample.labels.items():
                if key != "le":
                    labels.setdefault(key, set()).add(value)
        out[name] = (family.type, labels)
    return out


def test_the_metrics_table_is_the_registry():
    rows = {}
    for row in table(METRICS, "| metric | type | meaning |"):
        (span,) = spans(row[0])
        name, _, labels = span.partition("{")
        rows[name] = (row[1], set(filter(None, labels.rstrip("}").split(","))), row[2])
    exported = exported_metrics()
    for name, (kind, labels) in exported.items():
        row = f"| `{name}{{{','.join(labels)}}}` | {kind} | ... |".replace("{}", "")
        assert name in rows, f"{METRICS}: the metrics table lacks {row}"
        assert rows[name][:2] == (kind, set(labels)), f"{METRICS}: the metrics row should be {row}"
        for label, values in labels.items():
            if label == "version":  # mtd_build_info: the release, not a vocabulary
                continue
            for value in values:
                assert f"`{value}`" in rows[name][2], f"{METRICS}: {name}: {label} `{value}`?"
    extra = sorted(set(rows) - set(exported))
    assert not extra, f"{METRICS} lists metrics the daemon does not export: {extra}"


def test_the_template_variables_table_is_the_render_context(tmp_path: Path):
    state = parse([("s.yaml", write_state(tmp_path / "s.yaml").read_text())])
    context = render.context(state, shuffle.compute(state, b"\0" * 32, 0))
    rows = {spans(row[0])[0]: row[1] for row in table(CONFIGURATION, "| variable | content |")}
    assert set(rows) == set(context), (
        f"{CONFIGURATION}: the template variables table: add rows for "
        f"{sorted(set(context) - set(rows))}, remove {sorted(set(rows) - set(context))}"
    )
    for key in context["elements"]:
        assert f"`{key}`" in rows["elements"] or f"`elements.{key}`" in rows["elements"], key
    for key in context["sources"]:
        assert f'`sources["{key}"]`' in rows["sources"], key


def test_the_layout_table_is_the_package():
    folders = {
        p.parent.name for p in (ROOT / "reconciler").glob("*/__init__.py") if p.parent.is_dir()
    }
    rows = {
        spans(row[0])[0].rstrip("/") for row in table(DEVELOPMENT, "| folder | role | may import |")
    }
    assert rows == folders, f"{DEVELOPMENT}: layout table: folders {sorted(folders)}, rows {rows}"


def schema_keys(node: dict, path: str = "") -> list[str]:
    keys = []
    for key, sub in node.get("properties", {}).items():
        keys.append(f"{path}{key}")
        keys += schema_keys(sub, f"{path}{key}.")
    if isinstance(node.get("items"), dict):
        keys += schema_keys(node["items"], f"{path}[].")
    return keys


@pytest.mark.parametrize(
    "key", schema_keys(json.loads((ROOT / "reconciler/core/schema.json").read_text()))
)
def test_every_key_of_the_schema_is_documented(key: str):
    """As `key`, `parent.key` or a `key:` line of an example, on any page: the fleet's keys
    are in docs/configuration.md, Redis's in docs/fleet.md, CrowdSec's in docs/operations.md."""
    leaf = key.rsplit(".", 1)[-1]
    pattern = re.compile(rf"`([\w.\[\]]*\.)?{leaf}`|^\s*(- )?{leaf}:", re.M)
    assert any(pattern.search((ROOT / page).read_text()) for page in PAGES), (
        f"no page of {', '.join(PAGES)} documents the desired state key {key}"
    )
