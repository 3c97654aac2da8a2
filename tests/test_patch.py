"""A rotation as a patch (`core.patch`), and the pass that sends it (`reconcile(held=...)`).

Pure, against the fake kernel; `tests/backend_cases.py` holds the patch to the real kernel
(the patched table lists as the replaced one, a refused patch changes nothing).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters import files
from reconciler.adapters.fake import FakeKernel
from reconciler.core import diff, patch, render, shuffle
from reconciler.core.state import State
from reconciler.services.reconcile import reconcile
from tests.backend_cases import COVERAGE
from tests.conftest import write_state

SECRET = b"patch-test-secret-0123456789abcdef"


@pytest.fixture
def state(tmp_path: Path) -> State:
    return files.load_state(write_state(tmp_path / "state.yaml", **COVERAGE))


def at(state: State, epoch: int) -> list[dict[str, Any]]:
    return render.render(state, shuffle.compute(state, SECRET, epoch))


def test_a_rotation_rewrites_maps_and_the_seeded_chains_only(state: State):
    old, new = at(state, 0), at(state, 1)
    found = patch.plan("mtd", old, new)
    assert found is not None
    maps = {c["add"]["map"]["name"] for c in new if "map" in c["add"]}
    assert found.sets and set(found.sets) <= maps  # the mapping moves; sets stay as they are
    seeded = {c["add"]["rule"]["chain"] for c in new if "jhash" in str(c.get("add", {}))}
    assert set(found.chains) == seeded
    # The seed sits alone in one small chain per base chain and family: the base chains,
    # which hold the rest of the ruleset, are never refilled by a rotation.
    assert seeded == {f"d_{c}{v}" for c in ("nat", "raw", "ct", "out", "guard") for v in "46"}
    assert sum("rule" in c.get("add", {}) for c in found.commands) == len(seeded)
    verbs = {(v, next(iter(b))) for c in found.commands for v, b in c.items()}
    assert verbs <= {("flush", "map"), ("flush", "set"), ("add", "element"),
                     ("flush", "chain"), ("add", "rule")}  # fmt: skip
    assert patch.plan("mtd", old, old) == patch.Patch([], [], [])  # nothing to rewrite


def test_one_bucket_rotates_without_rewriting_a_rule(tmp_path: Path):
    """No per_source entry: dynamic sources jump to the one bucket without a hash, so no
    rule carries the epoch's seed and a rotation moves map elements only."""
    one = files.load_state(write_state(tmp_path / "one.yaml"))
    assert one.bucket_count == 1
    found = patch.plan("mtd", at(one, 0), at(one, 1))
    assert found is not None and found.sets and found.chains == []
    assert "jhash" not in str(at(one, 0))


def test_any_other_change_of_shape_is_a_replacement(state: State):
    old, new = at(state, 0), at(state, 1)
    rule = next(i for i, c in enumerate(new) if "rule" in c["add"])
    chain = next(i for i, c in enumerate(new) if "chain" in c["add"])
    a_set = next(i for i, c in enumerate(new) if "set" in c["add"])

    quota = {"family": "inet", "table": "mtd", "name": "q", "bytes": 1}

    def edited(i: int, change: Any) -> list[dict[str, Any]]:
        out = copy.deepcopy(new)
        change(out, i)
        return out

    for case in (
        edited(rule, lambda out, i: out.pop(i)),  # a rule removed
        edited(rule, lambda out, i: out.insert(i, copy.deepcopy(out[i]))),  # one added
        edited(rule, lambda out, i: out[i]["add"]["rule"].update(comment="x")),  # not expr
        edited(chain, lambda out, i: out[i]["add"]["chain"].update(name="other")),
        edited(a_set, lambda out, i: out[i]["add"]["set"].update(flags=["timeout"])),
        edited(a_set, lambda out, i: out.insert(i, {"add": {"quota": quota}})),
    ):
        assert patch.plan("mtd", old, case) is None


def test_the_daemon_pass_patches_and_the_table_is_the_replacements(state: State):
    """`held` (what the table holds) and a new epoch: one patch transaction; the table it
    leaves is the one a replacement leaves; a refused patch falls back to the replacement."""
    fake = FakeKernel()
    first = reconcile(state, 0, fake, secret=SECRET)
    second = reconcile(state, 1, fake, secret=SECRET, read_live=False, held=first.rendered)
    assert second.patched and "patched in place" in second.line()
    assert fake.applied[-1].op == "patch"
    patched = diff.table_text("mtd", diff.from_listing(fake.tables["mtd"]))
    replaced = FakeKernel()
    replaced.replace_table("mtd", second.rendered or [])
    assert diff.table_text("mtd", diff.from_listing(replaced.tables["mtd"])) == patched
    assert reconcile(state, 1, fake, secret=SECRET).status == "ok"  # a full compare agrees

    fake.refuse(when=lambda cmd: "flush" in cmd, times=1)
    third = reconcile(state, 2, fake, secret=SECRET, read_live=False, held=second.rendered)
    assert not third.patched and fake.applied[-1].op == "replace"
    assert reconcile(state, 2, fake, secret=SECRET).status == "ok"


def test_a_check_or_an_unknown_table_never_patches(state: State):
    fake = FakeKernel()
    first = reconcile(state, 0, fake, secret=SECRET)
    out = reconcile(state, 1, fake, secret=SECRET, read_live=False, held=first.rendered,
                    check=True)  # fmt: skip
    assert not out.patched and fake.applied[-1].op == "replace"
    out = reconcile(state, 1, fake, secret=SECRET, read_live=False)
    assert not out.patched and fake.applied[-1].op == "replace"
