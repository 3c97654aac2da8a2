"""The adversarial corpus: hostile templates and hostile commits (issue 8).

A commit of the state repository, and the templates kept in it, are written by other people
and read by mtd running as root. Each case asserts the outcome: rejected quickly with one
clear line, the owned table as before, other tables and host files byte-identical.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.core import render, shuffle
from reconciler.core import state as state_module
from reconciler.core.state import parse
from reconciler.errors import MtdError
from reconciler.lab.netns import Lab
from tests.conftest import MTD, ROOT, mtd, write_state
from tests.kernel import apply

SECRET = b"s" * 32
STATE = """
ports: {range: [1, 20], services: {tcp: [1, 2, 3], udp: [53]}}
watched: [{source: 192.0.2.3}]
"""
MTD_TABLE = {"family": "inet", "name": "mtd"}
OPEN_FILTER = {"family": "inet", "table": "filter", "chain": "input", "expr": [{"accept": None}]}

# Each rendered document, and the words its one error line must contain.
HOSTILE_DOCUMENTS = {
    "two objects in one add": (
        [{"add": {"table": MTD_TABLE, "rule": OPEN_FILTER}}],
        "nftables[0]: add 'table', 'rule': expected exactly one object per command",
    ),
    "two verbs in one command": (
        [{"add": {"table": MTD_TABLE}, "delete": {"table": {"family": "inet", "name": "filter"}}}],
        "nftables[0]: 'add', 'delete': expected exactly one verb (add) per command",
    ),
    "delete another table": (
        [{"delete": {"table": {"family": "inet", "name": "filter"}}}],
        "nftables[0]: verb 'delete' (table of table inet filter): expected only add",
    ),
    "flush the ruleset": (
        [{"add": {"table": MTD_TABLE}}, {"flush": {"ruleset": None}}],
        "nftables[1]: verb 'flush' (ruleset): expected only add",
    ),
    "replace a rule elsewhere": (
        [{"replace": {"rule": {**OPEN_FILTER, "handle": 1}}}],
        "nftables[0]: verb 'replace' (rule of table inet filter): expected only add",
    ),
    "insert into another table": (
        [{"insert": {"rule": OPEN_FILTER}}],
        "nftables[0]: verb 'insert'",
    ),
    "a rule in inet filter": (
        [{"add": {"table": MTD_TABLE}}, {"add": {"rule": OPEN_FILTER}}],
        "nftables[1]: add rule to table inet filter: expected only table inet mtd",
    ),
    "another family": (
        [{"add": {"table": {"family": "ip", "name": "mtd"}}}],
        "nftables[0]: add table to table ip mtd: expected only table inet mtd",
    ),
    "no family": (
        [{"add": {"chain": {"table": "mtd", "name": "c"}}}],
        "nftables[0]: add chain to table None mtd",
    ),
    "an unknown object": (
        [{"add": {"ruleset": None}}],
        "nftables[0]: add 'ruleset': expected one of table, chain",
    ),
    "a command that is a list": ([["add", {}]], "nftables[0]: a list: expected exactly one verb"),
    "extra top-level keys": (
        {"nftables": [], "metainfo": {}},
        'expected a JSON object {"nftables": [...]} and nothing else',
    ),
}


def _doc(commands: object) -> str:
    return json.dumps(commands if isinstance(commands, dict) else {"nftables": commands})


@pytest.mark.parametrize("case", sorted(HOSTILE_DOCUMENTS))
def test_hostile_rendered_commands_are_refused_by_structure(tmp_path: Path, case: str):
    commands, expected = HOSTILE_DOCUMENTS[case]
    (tmp_path / "evil.json.j2").write_text(_doc(commands))
    state = parse([("s.yaml", STATE + "template: evil\n")])
    with pytest.raises(MtdError) as exc:
        render.render(state, shuffle.compute(state, SECRET, 0), [tmp_path])
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith(f"{tmp_path}/evil.json.j2: ")
    assert expected in exc.value.problems[0]


@pytest.fixture
def host_lab() -> Iterator[Lab]:
    """One server namespace with a table mtd does not own: `inet filter`, dropping input."""
    with Lab() as lab:
        lab.add_server()
        lab.sh(
            "srv",
            "nft add table inet filter && nft add chain inet filter input "
            "'{ type filter hook input priority 0; policy drop; }' && "
            "nft add rule inet filter input tcp dport 22 accept",
        )
        yield lab


@pytest.mark.netns
def test_hostile_templates_never_reach_other_tables(host_lab: Lab, tmp_path: Path):
    lab = host_lab
    state = write_state(tmp_path / "state.yaml", template="evil")
    good = apply(lab, write_state(tmp_path / "good.yaml"))
    assert good.returncode == 0, good.stderr
    before = lab.sh("srv", "nft list ruleset")
    for case, (commands, expected) in sorted(HOSTILE_DOCUMENTS.items()):
        (tmp_path / "evil.json.j2").write_text(_doc(commands))
        for cmd in ("apply", "diff") if case == "two objects in one add" else ("apply",):
            out = mtd("-s", str(state), "--templates", str(tmp_path), cmd, ns=lab)
            assert out.returncode == 1, (case, cmd, out.stdout)
            assert out.stderr.count("\n") == 1 and expected in out.stderr, (case, out.stderr)
        assert lab.sh("srv", "nft list ruleset") == before, case


# --- hostile state files ------------------------------------------------------------------

LAUGHS = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
)
HOSTILE_STATES = {
    "deep flow nesting": ("a: " + "[" * 200_000 + "]" * 200_000, "nested more than 64 levels"),
    "deep block nesting": (
        "".join(f"{' ' * i}k:\n" for i in range(500)) + " " * 500 + "k: 1\n",
        "nested more than 64 levels",
    ),
    "an alias bomb": (LAUGHS + STATE, "aliases are expanded: expected fewer aliases"),
    "python object tag": (
        "ports: !!python/object/apply:os.system ['touch /tmp/mtd-pwned']\n",
        "could not determine a constructor for the tag",
    ),
    "a duplicate key": (STATE + "ports: {range: [1, 99], services: {}}\n", "key 'ports'"),
    "a mapping as a key": (STATE + "? {a: 1}\n: x\n", "expected a plain text key"),
    "binary garbage": ("\x00\x01\x02\xff" * 1000, "invalid YAML"),
}


def _run_bounded(*argv: str) -> subprocess.CompletedProcess:
    """mtd under a 1 GiB address-space limit and a time limit: a regression fails the test,
    not the machine."""
    return subprocess.run(
        ["prlimit", f"--as={1 << 30}", "timeout", "60", *MTD, *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.parametrize("case", sorted(HOSTILE_STATES))
def test_hostile_state_files_fail_in_one_line(tmp_path: Path, case: str):
    text, expected = HOSTILE_STATES[case]
    state = tmp_path / "mtd.yaml"
    state.write_text(text)
    out = _run_bounded("-s", str(state), "validate")
    assert out.returncode == 1, (out.returncode, out.stderr[-500:])
    assert out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert out.stderr.startswith(f"mtd: error: {state}:") and expected in out.stderr
    assert not Path("/tmp/mtd-pwned").exists()


def test_duplicate_keys_name_the_file_line_and_key():
    with pytest.raises(MtdError) as exc:
        parse([("s.yaml", "watched:\n  - source: 192.0.2.3\n    source: 192.0.2.4\n")])
    assert exc.value.problems == [
        "s.yaml:3: key 'source' appears twice in one mapping: expected each key once"
    ]


def test_a_state_file_over_the_size_limit_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(state_module, "MAX_DOCUMENT_BYTES", 1000)
    with pytest.raises(MtdError, match=r"^s\.yaml: 1001 characters: expected at most 1000"):
        parse([("s.yaml", "#" * 1001)])


def test_bounds_are_generous_for_real_states():
    """100,000 watched sources, with an anchored ignore list each, are within every bound."""
    text = "x: &ign {tcp: [1]}\nwatched:\n" + "".join(
        f"  - {{source: 10.{i >> 16}.{i >> 8 & 255}.{i & 255}, ignore: *ign}}\n"
        for i in range(100_000)
    )
    state_module._check_events("big.yaml", text)


def test_many_problems_are_located_once_and_counted(monkeypatch: pytest.MonkeyPatch):
    """10,000 duplicated sources: one compose of the file (error location is linear), the
    first problems printed and the rest counted."""
    composed = []
    real = state_module.yaml.compose
    monkeypatch.setattr(
        state_module.yaml, "compose", lambda *a, **k: composed.append(1) or real(*a, **k)
    )
    text = (
        STATE.replace("watched: [{source: 192.0.2.3}]", "")
        + "watched:\n"
        + ("  - source: 192.0.2.3\n" * 10_001)
    )
    with pytest.raises(MtdError) as exc:
        parse([("s.yaml", text)])
    problems = exc.value.problems
    assert len(problems) == state_module.MAX_PROBLEMS + 1 and len(composed) == 1
    assert problems[0] == (
        "s.yaml:6: watched[1].source: '192.0.2.3' is already watched[0]: expected each source once"
    )
    assert problems[-1] == "... and 9980 more problems"
