"""Golden tests: each `tests/golden/<case>/` holds a desired state and what mtd makes of it,
so a change to a template or to the renderer shows up as a readable diff in review.

- `state.yaml`: the desired state (rendered at epoch 0 with a fixed secret);
- `table.nft`: the table it renders, one nft-syntax line per object, rule and element;
- optionally `previous.yaml` and `diff.txt`: what `mtd diff` prints when the live table is
  the previous state's (applied to the in-memory kernel, so no root is needed).

Regenerate after an intended change, then review the diff of tests/golden/:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reconciler.adapters import files
from reconciler.adapters.fake import FakeKernel
from reconciler.core import diff, render, shuffle
from reconciler.services.reconcile import reconcile

GOLDEN = Path(__file__).parent / "golden"
SECRET = b"golden-secret-0123456789abcdef01"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "state.yaml").is_file())


def check(path: Path, text: str) -> None:
    if UPDATE:
        path.write_text(text)
        return
    assert path.is_file(), f"{path} is missing: run UPDATE_GOLDEN=1 pytest tests/test_golden.py"
    assert text == path.read_text(), f"{path} differs (UPDATE_GOLDEN=1 regenerates it)"


@pytest.mark.parametrize("case", CASES)
def test_table(case: str):
    state = files.load_state(GOLDEN / case / "state.yaml")
    commands = render.render(state, shuffle.compute(state, SECRET, 0))
    check(GOLDEN / case / "table.nft", diff.table_text(state.table, diff.from_commands(commands)))


@pytest.mark.parametrize("case", [c for c in CASES if (GOLDEN / c / "previous.yaml").is_file()])
def test_diff_against_the_previous_state(case: str):
    kernel = FakeKernel()
    previous = files.load_state(GOLDEN / case / "previous.yaml")
    assert reconcile(previous, 0, kernel, secret=SECRET).status == "changed"
    result = reconcile(
        files.load_state(GOLDEN / case / "state.yaml"), 0, kernel, secret=SECRET, check=True
    )
    check(GOLDEN / case / "diff.txt", "".join(f"{c.op} {c.text}\n" for c in result.changes))


def test_there_are_golden_cases():
    assert {
        "default_maps",
        "nested_prefixes",
        "ipv6",
        "ignore_lists",
        "classic",
        "coverage",
    } <= set(CASES)
