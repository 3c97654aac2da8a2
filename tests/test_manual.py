"""The man pages and the completion script are made from `--help` and the schema: the
committed copies are what the generator makes now, `man` renders them without a warning, and
the completion script completes from the command line itself."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from reconciler.cli import manual
from reconciler.cli.common import cli, load_commands
from reconciler.core.state import schema
from tests.conftest import MTD, ROOT

MAN = ROOT / "man"


def test_the_committed_pages_are_what_the_generator_makes():
    example = (ROOT / "desired_state/mtd.yaml").read_text()
    stale = [
        name
        for name, text in manual.generate(example).items()
        if not (MAN / name).exists() or (MAN / name).read_text() != text
    ]
    assert not stale, f"regenerate with `make man`: {stale} differ"


def test_every_command_and_top_level_key_is_in_its_page():
    load_commands()
    page, keys = (MAN / "mtd.8").read_text(), (MAN / "mtd.yaml.5").read_text()
    for name in cli.commands:
        assert f'.SS "mtd {manual.esc(name)} ' in page, name
    for key in schema()["properties"]:
        assert f".B {manual.esc(key)}\n" in keys, key


def test_roff_escapes_what_would_be_a_request():
    text = manual.esc(".rm x\n'so /etc/passwd\na \\fB-b")
    assert text == "\\&.rm x\n\\&'so /etc/passwd\na \\efB\\-b"


@pytest.mark.skipif(shutil.which("man") is None, reason="needs man-db")
@pytest.mark.parametrize("page", ["mtd.8", "mtd.yaml.5"])
def test_man_renders_the_page_without_a_warning(page: str):
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MANROFFSEQ": ""}
    out = subprocess.run(
        ["man", "--warnings=all", "-l", str(MAN / page)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "SYNOPSIS" in out.stdout or "KEYS" in out.stdout


def test_the_completion_script_completes_commands_and_options():
    script = MAN / "mtd.bash-completion"
    shown = subprocess.run(
        ["bash", "-c", f"source {script} && complete -p mtd"], capture_output=True, text=True
    )
    assert shown.stdout.strip() == "complete -o nosort -F _mtd_completion mtd", shown.stderr

    def complete(*words: str) -> list[str]:
        env = {
            **os.environ,
            "_MTD_COMPLETE": "bash_complete",
            "COMP_WORDS": " ".join(["mtd", *words]),
            "COMP_CWORD": str(len(words)),
        }
        out = subprocess.run([*MTD], env=env, capture_output=True, text=True, cwd=ROOT)
        return [line.split(",", 1)[1] for line in out.stdout.splitlines()]

    assert complete("ap") == ["apply"]
    assert "--confirm" in complete("apply", "--c")
    assert complete("watch", "l") == ["list"]


def test_the_schema_of_a_key_becomes_one_line_of_type():
    defs = {"port": {"type": "integer", "minimum": 1, "maximum": 65535}}
    spec = {"type": "array", "items": {"$ref": "#/$defs/port"}}
    assert manual._type(spec, defs) == "array of integer (minimum 1, maximum 65535)"
    assert manual._type({"enum": ["table", "ruleset"]}, {}) == 'one of "table", "ruleset"'


def test_written_files_are_the_generated_ones(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["manual", str(tmp_path / "out")])
    monkeypatch.chdir(ROOT)
    manual.main()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(manual.FILES)
