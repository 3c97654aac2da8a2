"""Previews: what the first apply creates before any secret exists (the mapping written as
"drawn at apply"), and diffs that keep the mapping to themselves unless asked.

The golden files are `tests/golden/preview/*.txt` (UPDATE_GOLDEN=1 regenerates them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from reconciler.adapters import files
from reconciler.adapters.fake import FakeKernel
from reconciler.cli.host import PLACEHOLDER_SECRET
from reconciler.core import diff
from reconciler.lab.netns import Lab
from reconciler.services.reconcile import reconcile
from tests.conftest import mtd
from tests.test_golden import SECRET, check

GOLDEN = Path(__file__).parent / "golden" / "preview"
SCREEN = 50  # lines


def host_state(tmp_path: Path) -> Path:
    text = (GOLDEN / "host.yaml").read_text()
    path = tmp_path / "state.yaml"
    path.write_text(text + f"secret_file: {tmp_path / 'secret'}\n")
    return path


def _ports_shown(text: str) -> list[str]:
    """Map element lines (`key : value`): the mapping."""
    return [line for line in text.splitlines() if re.search(r"\{ .* : \d+", line)]


def test_a_first_apply_preview_shows_the_structure_and_draws_the_mapping_at_apply():
    state = files.load_state(GOLDEN / "host.yaml")
    result = reconcile(state, 0, FakeKernel(), secret=PLACEHOLDER_SECRET, check=True)
    lines = diff.brief(result.changes, drawn=True, show_mapping=True)  # placeholders anyway
    text = "\n".join(lines) + "\n"
    check(GOLDEN / "first_apply.txt", text)
    assert "+ element svc_tcp { 22 }" in lines and "+ element trust4 { 203.0.113.0/24 }" in lines
    assert "~ map b*_tcp (64 maps): +384 elements (drawn at apply)" in lines  # 3 ports x 2 x 64
    assert not _ports_shown(text) and "seed 0x" not in text
    assert max(map(len, lines)) < 400


def test_a_64_bucket_rotation_diff_fits_a_screen_and_keeps_the_mapping():
    state = files.load_state(GOLDEN / "host.yaml")
    kernel = FakeKernel()
    assert reconcile(state, 0, kernel, secret=SECRET).status == "changed"
    result = reconcile(state, 1, kernel, secret=SECRET, check=True)
    lines = diff.brief(result.changes)
    text = "\n".join(lines) + "\n"
    check(GOLDEN / "rotation.txt", text)
    assert len(lines) <= SCREEN and max(map(len, lines)) <= 200, text
    assert not _ports_shown(text) and "seed 0x" not in text
    assert "jhash seed changed (secret)" in text
    shown = diff.brief(result.changes, show_mapping=True)  # asked: every element, as before
    assert len(_ports_shown("\n".join(shown))) > 500


def test_a_changed_rule_names_what_changed():
    old = diff.Change("-", "rule", "c#3", "rule c tcp dport { 1, 2 } drop")
    new = diff.Change("+", "rule", "c#3", "rule c tcp dport { 1, 2, 3 } drop")
    assert diff.brief([old, new]) == ["~ rule c#3: 1, 2 } -> 1, 2, 3 }"]


@pytest.mark.netns
def test_without_a_secret_diff_and_apply_check_exit_2_and_create_nothing(tmp_path):
    state = host_state(tmp_path)
    with Lab() as lab:
        lab.add_server()
        out = mtd("-s", str(state), "diff", ns=lab)
        assert out.returncode == 2, out.stderr
        assert "(the mapping is drawn at apply: placeholders, no secret used)" in out.stdout
        assert "no secret file yet" in out.stderr and "Traceback" not in out.stderr
        assert not _ports_shown(out.stdout)
        out = mtd("-s", str(state), "diff", "--json", ns=lab)
        doc = json.loads(out.stdout)
        assert out.returncode == 2 and doc["drawn_at_apply"] and doc["fingerprint"] == ""
        assert doc["maps"]["tcp4"] == {"+": 6} and not _ports_shown(out.stdout)
        out = mtd("-s", str(state), "apply", "--check", "--exit-code", "--diff", ns=lab)
        assert out.returncode == 2, out.stderr
        assert "would change: table inet mtd epoch 0" in out.stdout
        out = mtd("-s", str(state), "render", ns=lab)
        assert out.returncode == 2 and "elements drawn at apply>" in out.stdout, out.stderr
        assert "mtd" not in lab.sh("srv", "nft list tables")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state.yaml"]
        # The first apply draws it; the preview of the next rotation hides it.
        assert mtd("-s", str(state), "apply", ns=lab).returncode == 0
        out = mtd("-s", str(state), "rotate", "--check", "--diff", ns=lab)
        assert out.returncode == 0 and len(out.stdout.splitlines()) <= SCREEN, out.stdout
        assert not _ports_shown(out.stdout) and "jhash seed changed (secret)" in out.stdout
        # With the table live, a missing secret was lost: no preview pretends otherwise.
        (tmp_path / "secret").unlink()
        out = mtd("-s", str(state), "diff", ns=lab)
        assert out.returncode == 1 and "the secret was lost" in out.stderr, out.stderr


def test_the_drift_line_names_a_few_objects_and_counts_the_rest():
    from reconciler.adapters import monitor

    what = [("+", "set", f"__set{i}") for i in range(40)]
    what += [("+", "chain", f"b{k}_nat4") for k in range(64)] + [("+", "map", "tcp4")]
    text = monitor.Change(9, 1, "nft", what).text()
    assert text == (
        "+chain b0_nat4, +chain b1_nat4, +chain b2_nat4, +chain b3_nat4, +chain b4_nat4, "
        "+chain b5_nat4, and 59 more objects"
    )
    assert "__set" not in text


def test_a_repositorys_ci_diffs_a_commit_against_the_previous_one_without_a_secret(tmp_path):
    old = host_state(tmp_path)
    text = old.read_text().replace("  - {source: 192.0.2.3}\n", "  - {source: 192.0.2.3}\n"
                                   "  - {source: 192.0.2.9}\n")  # fmt: skip
    new = tmp_path / "new.yaml"
    new.write_text(text.replace("tcp: [22, 80, 443, 5432]", "tcp: [22, 80, 443, 5432, 8080]"))
    out = mtd("-s", str(new), "diff", "--against", str(old))
    assert out.returncode == 2, out.stderr
    lines = out.stdout.splitlines()
    assert "+ element src4 { 192.0.2.9 }" in lines and "+ element svc_tcp { 8080 }" in lines
    for n in (9, 12):  # the errors forged about a service port name the new one too
        assert f"~ rule ct_prerouting#{n}: 5432, 80 }} -> 5432, 80, 8080 }}" in lines
    assert any(line.startswith("~ map tcp4: +") for line in lines)
    assert not _ports_shown(out.stdout) and len(lines) < SCREEN
    same = mtd("-s", str(old), "diff", "--against", str(old))
    assert same.returncode == 0 and same.stdout.endswith("ok: no change\n"), same.stdout
    assert not (tmp_path / "secret").exists()
