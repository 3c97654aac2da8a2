"""The reconcile pass against the in-memory kernel: when it lists the table, and when it
may trust that nothing changed since its own commit (`Backend.unchanged`)."""

from __future__ import annotations

from pathlib import Path

from reconciler.adapters import files
from reconciler.adapters.fake import FakeKernel
from reconciler.services.reconcile import reconcile
from tests.conftest import write_state

SECRET = b"\7" * 32


def test_a_pass_after_mtds_own_commit_lists_nothing_until_something_else_commits(
    tmp_path: Path,
):
    state = files.load_state(write_state(tmp_path / "state.yaml"))
    kernel = FakeKernel()
    assert reconcile(state, 0, kernel, secret=SECRET).status == "changed"
    listed = kernel.list_calls
    for check in (True, False):  # diff/status and apply alike
        again = reconcile(state, 0, kernel, secret=SECRET, check=check)
        assert (again.status, again.changes) == ("ok", [])
    assert kernel.list_calls == listed  # nothing committed since: nothing listed
    kernel.drift("mtd")  # an element deleted behind mtd's back: a commit of someone else's
    seen = reconcile(state, 0, kernel, secret=SECRET, check=True)
    assert [c.op + c.kind for c in seen.changes] == ["+element"]
    assert kernel.list_calls == listed + 1
    assert reconcile(state, 0, kernel, secret=SECRET).status == "changed"  # repaired
    assert reconcile(state, 1, kernel, secret=SECRET, check=True).status == "would change"
    # An `ownership: ruleset` pass always lists (the flush reaches beyond the table).
    whole = files.load_state(write_state(tmp_path / "state.yaml", ownership="ruleset"))
    listed = kernel.list_calls
    reconcile(whole, 0, kernel, secret=SECRET, check=True)
    assert kernel.list_calls == listed + 1
