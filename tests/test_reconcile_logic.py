"""The reconcile pass against the in-memory kernel: when it lists the table, and when it
may trust that nothing changed since its own commit (`CachingBackend.unchanged`)."""

from __future__ import annotations

from pathlib import Path

from reconciler.adapters import files
from reconciler.adapters.caching import CachingBackend
from reconciler.adapters.fake import FakeKernel
from reconciler.services.reconcile import reconcile
from tests.conftest import write_state

SECRET = b"\7" * 32


def test_a_pass_after_mtds_own_commit_lists_nothing_until_something_else_commits(
    tmp_path: Path,
):
    state = files.load_state(write_state(tmp_path / "state.yaml"))
    kernel = FakeKernel()
    cached = CachingBackend(kernel)
    assert reconcile(state, 0, cached, secret=SECRET).status == "changed"
    listed = kernel.list_calls
    for check in (True, False):  # diff/status and apply alike
        again = reconcile(state, 0, cached, secret=SECRET, check=check)
        assert (again.status, again.changes) == ("ok", [])
    assert kernel.list_calls == listed  # nothing committed since: nothing listed
    kernel.drift("mtd")  # an element deleted behind mtd's back: a commit of someone else's
    seen = reconcile(state, 0, cached, secret=SECRET, check=True)
    assert [c.op + c.kind for c in seen.changes] == ["+element"]
    assert kernel.list_calls == listed + 1
    assert reconcile(state, 0, cached, secret=SECRET).status == "changed"  # repaired
    assert reconcile(state, 1, cached, secret=SECRET, check=True).status == "would change"
    # An `ownership: ruleset` pass always lists (the flush reaches beyond the table).
    whole = files.load_state(write_state(tmp_path / "state.yaml", ownership="ruleset"))
    listed = kernel.list_calls
    reconcile(whole, 0, cached, secret=SECRET, check=True)
    assert kernel.list_calls == listed + 1


def test_a_refused_apply_puts_the_sysctls_back_in_its_backend_and_nowhere_else(
    tmp_path: Path, monkeypatch
):
    """A failed command changes nothing: the sysctls the pass set are put back, in the
    backend's own namespace (the fake's), never in the host's /proc/sys."""
    import pytest

    from reconciler.errors import MtdError

    state = files.load_state(write_state(tmp_path / "state.yaml"))
    kernel = FakeKernel()
    before = {"net/ipv4/fwmark_reflect": "0", "net/ipv6/fwmark_reflect": "0"}
    kernel.sysctls = dict(before)
    kernel.refuse(0)
    host: list[str] = []
    write_text = Path.write_text

    def recorded(self: Path, *args, **kwargs):
        if str(self).startswith("/proc/sys"):
            host.append(str(self))
            return 0
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", recorded)
    with pytest.raises(MtdError):
        reconcile(state, 0, kernel, secret=SECRET)
    assert kernel.sysctls == before
    assert host == []
