"""An operator's day on one host, against the real kernel in a lab namespace: read-only
commands write nothing, exit codes for automation, a refused rotation changes no file, and
`mtd down` undoes what mtd did (table, sysctls) and says so in the audit log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.adapters import auditlog, files
from reconciler.lab.netns import Lab
from tests.conftest import mtd, write_state
from tests.kernel import apply, expected_moves, table_text

pytestmark = pytest.mark.netns

REFUSED = """{"nftables": [
 {"add": {"table": {"family": "inet", "name": {{ table | tojson }}}}},
 {"add": {"set": {"family": "inet", "table": {{ table | tojson }}, "name": "tiny",
   "type": "ipv4_addr", "size": 1, "elem": ["192.0.2.7", "192.0.2.8"]}}}
]}"""


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in directory.iterdir()}


def sysctl(lab: Lab) -> tuple[str, str]:
    v4 = lab.sh("srv", "cat /proc/sys/net/ipv4/fwmark_reflect").strip()
    return v4, lab.sh("srv", "cat /proc/sys/net/ipv6/fwmark_reflect").strip()


def test_an_operators_day(lab: Lab, tmp_path: Path):
    state = write_state(tmp_path / "state.yaml")
    files.load_secret(tmp_path / "secret", create=True)  # the secret is the host's, made once
    assert sysctl(lab) == ("0", "0")

    # Read-only commands write nothing (no lock, epoch, audit log), whatever their outcome.
    before = snapshot(tmp_path)
    for cmd, args, code in [
        ("validate", (), 0),
        ("render", (), 0),
        ("diff", (), 2),
        ("status", (), 0),
        ("status", ("--exit-code",), 2),  # table missing
        ("apply", ("--check",), 0),
        ("apply", ("--check", "--exit-code"), 2),
        ("rotate", ("--check",), 0),
        ("history", (), 0),
    ]:
        out = apply(lab, state, *args, cmd=cmd)
        assert out.returncode == code, (cmd, args, out.stdout, out.stderr)
    assert snapshot(tmp_path) == before
    assert "absent" in table_text(lab)

    assert apply(lab, state).returncode == 0
    assert sysctl(lab) == ("1", "1")
    for cmd, args in [("status", ("--exit-code",)), ("apply", ("--check", "--exit-code"))]:
        out = apply(lab, state, *args, cmd=cmd)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)

    # A rotation without --diff says how many mappings it drew.
    out = apply(lab, state, cmd="rotate")
    moved = sum(len(m) for m in expected_moves(state, 1).values())
    assert (
        out.returncode == 0 and f" mappings drawn anew ({moved} for watched entries, " in out.stdout
    )

    # A rotation the kernel refuses leaves every local file as it was (epoch, audit log).
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "refused.json.j2").write_text(REFUSED)
    refused = write_state(tmp_path / "refused.yaml", template="refused")
    live, before = table_text(lab), snapshot(tmp_path)
    out = mtd("-s", str(refused), "--templates", str(templates), "rotate", ns=lab)
    assert out.returncode == 1 and "nftables refused" in out.stderr, out.stderr
    # (cache/ aside: a command that writes keeps the state as parsed there before it acts;
    # derived data that only speeds up the next command, never a decision.)
    kept = {name: v for name, v in snapshot(tmp_path).items() if name != "cache"}
    assert kept == {name: v for name, v in before.items() if name != "cache"}
    assert table_text(lab) == live
    assert files.read_epoch(tmp_path / "epoch") == 1

    # `mtd down`: the table goes, the sysctls mtd set come back, the audit log says so.
    out = apply(lab, state, cmd="down")
    assert out.returncode == 0 and out.stdout == (
        "changed: table inet mtd removed; restored net.ipv4.fwmark_reflect=0, "
        "net.ipv6.fwmark_reflect=0\n"
    )
    assert sysctl(lab) == ("0", "0") and "absent" in table_text(lab)
    last = auditlog.entries(tmp_path / "audit.jsonl")[-1]
    assert (last["result"], last["table"], last["epoch"]) == ("down", "mtd", None)
    out = apply(lab, state, cmd="down")
    assert out.stdout.startswith("ok: table inet mtd absent; fwmark_reflect sysctls left")
    history = apply(lab, state, "--json", cmd="history").stdout.splitlines()
    assert [json.loads(line)["result"] for line in history] == ["changed", "changed", "down"]


def test_down_leaves_sysctls_mtd_did_not_set(lab: Lab, tmp_path: Path):
    state = write_state(tmp_path / "state.yaml")
    lab.sh("srv", "sysctl -qw net.ipv4.fwmark_reflect=1 net.ipv6.fwmark_reflect=1")
    assert apply(lab, state).returncode == 0
    out = apply(lab, state, cmd="down")
    assert out.stdout == (
        "changed: table inet mtd removed; fwmark_reflect sysctls left as they are "
        "(mtd did not change them here)\n"
    )
    assert sysctl(lab) == ("1", "1")
