"""The caching backend alone (`adapters.caching`), around the in-memory kernel: with its
caches off every call reaches the kernel; on, a pass skips the listing only while the
ruleset stands where mtd's own commit or its last equal listing left it, and a record on
disk serves another process of the same ruleset only. (`tests/backend_cases.py` holds the
same against the real kernel, `nft` by hand included.)"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.adapters import files
from reconciler.adapters.cachedir import KernelCache
from reconciler.adapters.caching import CachingBackend
from reconciler.adapters.fake import FakeKernel
from reconciler.core import watch
from reconciler.core.state import State
from reconciler.services.reconcile import reconcile
from tests.conftest import write_state

SECRET = b"\7" * 32


@pytest.fixture
def state(tmp_path: Path) -> State:
    return files.load_state(write_state(tmp_path / "state.yaml"))


def test_with_its_caches_off_every_pass_lists_and_learns(state: State):
    kernel = FakeKernel()
    cached = CachingBackend(kernel, KernelCache(use=frozenset()))
    first = reconcile(state, 0, cached, secret=SECRET)
    assert first.status == "changed" and first.rendered is not None
    for n in range(2, 4):
        assert reconcile(state, 0, cached, secret=SECRET, check=n == 3).changes == []
        assert (kernel.list_calls, kernel.canonical_calls) == (n, n)
    assert not cached.unchanged(state.table, first.rendered)


def test_on_it_lists_once_after_its_own_commit_and_learns_the_form_once(state: State):
    kernel = FakeKernel()
    cached = CachingBackend(kernel)
    assert reconcile(state, 0, cached, secret=SECRET).status == "changed"
    for check in (True, False, True):
        assert reconcile(state, 0, cached, secret=SECRET, check=check).changes == []
    assert (kernel.list_calls, kernel.canonical_calls) == (1, 1)
    kernel.run(watch.commands(state.table, [("198.51.100.7", 100)]))  # a foreign commit
    assert reconcile(state, 0, cached, secret=SECRET, check=True).changes == []
    assert (kernel.list_calls, kernel.canonical_calls) == (2, 1)  # listed; form kept


def _another_table(kernel: FakeKernel) -> None:
    kernel.replace_table("other", [{"add": {"table": {"family": "inet", "name": "other"}}}])


def _element_by_hand(kernel: FakeKernel) -> None:
    kernel.drift("mtd")  # as `nft delete element` on mtd's table


def _watch_entry(kernel: FakeKernel) -> None:
    kernel.run(watch.commands("mtd", [("198.51.100.7", 100)]))


@pytest.mark.parametrize("foreign", [_another_table, _element_by_hand, _watch_entry])
def test_any_commit_it_did_not_make_is_never_masked(
    state: State, foreign: Callable[[FakeKernel], None]
):
    kernel = FakeKernel()
    cached = CachingBackend(kernel)
    reconcile(state, 0, cached, secret=SECRET)
    listed = kernel.list_calls
    foreign(kernel)  # behind the cache's back: only the generation tells
    seen = reconcile(state, 0, cached, secret=SECRET, check=True)
    assert kernel.list_calls == listed + 1
    dropped = foreign is _element_by_hand
    assert [c.op + c.kind for c in seen.changes] == (["+element"] if dropped else [])


def test_a_patched_rotation_is_listed_by_the_next_reading_pass(state: State):
    """A patch records nothing (its whole-table digest would cost what the patch costs):
    the pass after it lists once, and the one after that trusts the equal listing."""
    kernel = FakeKernel()
    cached = CachingBackend(kernel)
    first = reconcile(state, 0, cached, secret=SECRET)
    rotated = reconcile(state, 1, cached, secret=SECRET, read_live=False, held=first.rendered)
    assert rotated.patched and kernel.transactions[-1].op == "patch"
    listed = kernel.list_calls
    for _ in range(2):
        assert reconcile(state, 1, cached, secret=SECRET, check=True).changes == []
    assert kernel.list_calls == listed + 1


def test_a_record_on_disk_serves_another_process_of_the_same_ruleset_only(
    state: State, tmp_path: Path
):
    kernel = FakeKernel()
    reconcile(state, 0, CachingBackend(kernel, KernelCache(tmp_path / "cache")), secret=SECRET)
    assert (tmp_path / "cache" / KernelCache.COMMITTED).exists()
    listed = kernel.list_calls
    again = CachingBackend(kernel, KernelCache(tmp_path / "cache", write=False))
    assert reconcile(state, 0, again, secret=SECRET, check=True).changes == []
    assert kernel.list_calls == listed  # the next process: nothing listed
    # Another ruleset at the same generation, with the same table: listed all the same.
    twin = FakeKernel(tables=copy.deepcopy(kernel.tables), generation=kernel.generation)
    other = CachingBackend(twin, KernelCache(tmp_path / "cache", write=False))
    assert reconcile(state, 0, other, secret=SECRET, check=True).changes == []
    assert twin.list_calls == 1


def test_what_is_not_the_port_is_the_wrapped_backends(state: State):
    kernel = FakeKernel()
    cached = CachingBackend(kernel)
    reconcile(state, 0, cached, secret=SECRET)
    assert cached.commits == kernel.commits == 1
    assert getattr(cached, "sibling", None) is None  # the fake has none: the daemon's test
    assert copy.copy(cached).kernel is kernel
