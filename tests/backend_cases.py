"""The kernel backend contract: cases that hold for `FakeKernel` and for libnftables alike.

`tests/test_backend_contract.py` runs each case against the fake in-process and against
the real kernel in a throw-away namespace (`python -m tests.backend_cases CASE STATE`
inside it), so the fake cannot drift from what the kernel does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.adapters import files, monitor
from reconciler.adapters.caching import CachingBackend
from reconciler.adapters.kernel import Backend
from reconciler.core import diff, render, repair, shuffle, watch
from reconciler.core.state import State
from reconciler.errors import KernelError
from reconciler.services.reconcile import reconcile

SECRET = b"contract-test-secret-0123456789ab"
TABLE = "mtd"
# A rule into a chain that does not exist: every kernel refuses it.
BAD_RULE = {
    "add": {
        "rule": {
            "family": "inet",
            "table": TABLE,
            "chain": "nope",
            "expr": [{"accept": None}],
        }
    }
}


def rendered(state: State, epoch: int = 0) -> list[dict[str, Any]]:
    return render.render(state, shuffle.compute(state, SECRET, epoch))


def pending(backend: Backend, state: State, commands: list[dict[str, Any]]) -> list[diff.Change]:
    """What the diff of the reconcile pass reports between `commands` and the live table."""
    canonical = backend.canonical(diff.skeleton_commands(commands), TABLE)
    return diff.compare(canonical, commands, backend.list_table(TABLE))


def apply_lists_back_in_sync(backend: Backend, state: State) -> None:
    commands = rendered(state)
    assert pending(backend, state, commands)  # nothing live yet: all of it pending
    backend.replace_table(TABLE, commands)
    assert pending(backend, state, commands) == []
    assert pending(backend, state, rendered(state, 1))  # another epoch differs


def missing_table_is_not_found(backend: Backend, state: State) -> None:
    assert backend.list_table("absent") is None
    assert backend.delete_table("absent") is False


def delete_removes_the_table(backend: Backend, state: State) -> None:
    backend.replace_table(TABLE, rendered(state))
    assert backend.delete_table(TABLE) is True
    assert backend.list_table(TABLE) is None


def refused_command_changes_nothing(backend: Backend, state: State) -> None:
    backend.replace_table(TABLE, rendered(state))
    before = backend.list_table(TABLE)
    bad = [*rendered(state, 1)]
    bad.insert(3, BAD_RULE)
    try:
        backend.replace_table(TABLE, bad)
    except KernelError as exc:
        assert exc.index == 3, exc
        assert exc.command == "add rule nope", exc
        assert exc.line.startswith("nftables refused rendered command 3 (add rule nope): ")
    else:
        raise AssertionError("a rule into a missing chain was accepted")
    assert backend.list_table(TABLE) == before


def check_changes_nothing(backend: Backend, state: State) -> None:
    backend.replace_table(TABLE, rendered(state))
    before = backend.list_table(TABLE)
    backend.replace_table(TABLE, rendered(state, 1), check=True)
    assert backend.list_table(TABLE) == before


def canonical_refusal_names_the_command(backend: Backend, state: State) -> None:
    bad = diff.skeleton_commands(rendered(state))
    bad.insert(2, BAD_RULE)
    try:
        backend.canonical(bad, TABLE)
    except KernelError as exc:
        assert (exc.index, exc.command) == (2, "add rule nope"), exc
    else:
        raise AssertionError("a rule into a missing chain was accepted")


def a_repair_batch_restores_chains(backend: Backend, state: State) -> None:
    """What an event-driven repair sends (core.repair.plan): the chain comes back whole."""
    commands = rendered(state)
    backend.replace_table(TABLE, commands)
    chain = next(c["add"]["rule"]["chain"] for c in commands if "rule" in c["add"])
    batch = repair.plan(TABLE, diff.skeleton_commands(commands), [("-", "rule", chain)])
    assert batch is not None
    backend.run(batch)
    assert pending(backend, state, commands) == []


def a_repair_batch_restores_map_elements(backend: Backend, state: State) -> None:
    """What an element repair sends (core.repair.elements): in one transaction, a map
    element deleted by key and put back with its rendered value, a missing one added;
    deleting an element that is not there refuses the whole batch and changes nothing."""
    from reconciler.core.elements import Desired

    commands = rendered(state)
    backend.replace_table(TABLE, commands)
    skeleton, desired = diff.skeleton_commands(commands), Desired.from_commands(commands)
    mapping = shuffle.compute(state, SECRET, 0)
    (label, proto), moves = next((k, m) for k, m in mapping.moves.items() if "/" not in k[0])
    name = f"{proto}{4 if ':' not in label else 6}"
    real, hidden = next(iter(moves.items()))

    def elem(verb: str, items: list[Any]) -> dict[str, Any]:
        return {verb: {"element": {"family": "inet", "table": TABLE, "name": name, "elem": items}}}

    key = {"concat": [label, real]}
    backend.run([elem("delete", [key]), elem("add", [[key, hidden + 1]])])  # changed by hand
    backend.run([elem("delete", [{"concat": [label, hidden]}])])  # and one deleted
    assert len(pending(backend, state, commands)) == 2
    changed = [
        monitor.RawElement("-", name, _key(label, real), data=_port(hidden)),
        monitor.RawElement("+", name, _key(label, real), data=_port(hidden + 1)),
        monitor.RawElement("-", name, _key(label, hidden), data=_port(real)),
    ]
    out = repair.elements(TABLE, skeleton, desired, changed)
    assert not isinstance(out, str), out
    batch, _ = out
    backend.run(batch)
    assert pending(backend, state, commands) == []
    before = backend.list_table(TABLE)
    try:
        backend.run([elem("delete", [{"concat": [label, 1]}]), *batch])
    except KernelError as exc:
        assert exc.not_found, exc
    else:
        raise AssertionError("deleting a missing element was accepted")
    assert backend.list_table(TABLE) == before


def _key(label: str, port: int) -> bytes:
    import socket

    family = socket.AF_INET6 if ":" in label else socket.AF_INET
    return socket.inet_pton(family, label) + port.to_bytes(2, "big") + bytes(2)


def _port(port: int) -> bytes:
    return port.to_bytes(2, "big")


def reconcile_converges_then_is_ok(backend: Backend, state: State) -> None:
    first = reconcile(state, 0, backend, secret=SECRET)
    assert first.status == "changed", first.line()
    again = reconcile(state, 0, backend, secret=SECRET)
    assert (again.status, again.changes) == ("ok", []), again.line()
    rotated = reconcile(state, 1, backend, secret=SECRET, check=True)
    assert rotated.status == "would change"
    assert reconcile(state, 0, backend, secret=SECRET).status == "ok"  # check changed nothing


def dynamic_elements_add_renew_delete_and_list(backend: Backend, state: State) -> None:
    """`mtd watch`'s element transactions (core.watch.commands) in a scratch table with the
    contract's dyn4/dyn6 sets: added with a timeout, renewed, deleted (also when absent),
    listed back; the diff never sees them."""
    sets = [
        {"add": {"table": {"family": "inet", "name": TABLE}}},
        *(
            {
                "add": {
                    "set": {
                        "family": "inet",
                        "table": TABLE,
                        "name": f"dyn{v}",
                        "type": t,
                        "flags": ["timeout"],
                    }
                }
            }
            for v, t in (("4", "ipv4_addr"), ("6", "ipv6_addr"))
        ),
    ]
    list_set = backend.list_set  # type: ignore[attr-defined]
    assert list_set(TABLE, "dyn4") is None  # no table yet
    backend.replace_table(TABLE, sets)
    assert list_set(TABLE, "nope") is None
    backend.run(watch.commands(TABLE, [("192.0.2.7", 100), ("2001:db8:1:2::", 50)]))
    got = watch.kernel_entries(list_set(TABLE, "dyn4"))
    assert 95 <= got["192.0.2.7"] <= 100, got
    assert set(watch.kernel_entries(list_set(TABLE, "dyn6"))) == {"2001:db8:1:2::"}
    backend.run(watch.commands(TABLE, [("192.0.2.7", 5000)]))  # renewed, not kept at 100
    assert watch.kernel_entries(list_set(TABLE, "dyn4"))["192.0.2.7"] > 4000
    live = diff.live(backend.list_table(TABLE))
    assert diff.diff(diff.from_commands(sets), live) == []
    for _ in range(2):  # deleting an absent element succeeds too
        backend.run(watch.commands(TABLE, remove=["192.0.2.7", "2001:db8:1:2::"]))
        assert list_set(TABLE, "dyn4") == [] and list_set(TABLE, "dyn6") == []


COVERAGE = {
    "trusted": ["203.0.113.0/24"],
    "watched": [
        {"source": "0.0.0.0/0", "per_source": True},
        {"source": "::/0", "per_source": True},
        {"source": "192.0.2.3"},
    ],
    "buckets": 4,
    "tripwire": {"tcp": [23], "udp": [], "for": 3600},
}


def coverage_state() -> State:
    import tempfile

    from tests.conftest import write_state

    with tempfile.TemporaryDirectory() as tmp:
        return files.load_state(write_state(Path(tmp) / "state.yaml", **COVERAGE))


def a_table_as_written_lists_its_canonical_skeleton(backend: Backend, state: State) -> None:
    """What the diff's shortcut (`diff.compare`) rests on: the owned table, once loaded,
    lists its skeleton exactly as `canonical` does, elements aside, with every class of
    source, buckets, the tripwire and dynamic entries; a hand change breaks the equality."""
    state = coverage_state()
    mapping = shuffle.compute(state, SECRET, 0)
    commands = render.render(state, mapping, None, {"4": [("198.51.100.9", 300)], "6": []})
    for _ in range(2):  # replaced: the table's handle is no longer the scratch table's
        backend.replace_table(TABLE, commands)
    canonical = backend.canonical(diff.skeleton_commands(commands), TABLE)
    listing = backend.list_table(TABLE)
    assert listing is not None and diff.same_skeleton(canonical, listing)
    assert diff.compare(canonical, commands, listing) == []
    chain = next(c["add"]["rule"]["chain"] for c in commands if "rule" in c["add"])
    backend.run([{"flush": {"chain": {"family": "inet", "table": TABLE, "name": chain}}}])
    listing = backend.list_table(TABLE)
    assert listing is not None and not diff.same_skeleton(canonical, listing)
    changes = diff.compare(canonical, commands, listing)
    assert changes and {(c.op, c.kind) for c in changes} == {("+", "rule")}


def a_seed_stand_in_learns_the_form_of_the_seed(backend: Backend, state: State) -> None:
    """The canonical form learnt with a stand-in for the buckets' seed, the seed put back,
    is the one learnt with the seed itself, at every epoch; and it is learnt once for all
    epochs (the skeleton with the stand-in is the same)."""
    from reconciler.services.reconcile import _canonical

    state = coverage_state()
    standins = []
    for epoch in (0, 1):
        mapping = shuffle.compute(state, SECRET, epoch)
        commands = render.render(state, mapping)
        skeleton = diff.skeleton_commands(commands)
        standin = diff.without_seed(skeleton, mapping.seed)
        assert standin is not None and standin[1] > 0
        standins.append(standin[0])
        learnt = _canonical(backend, skeleton, commands, TABLE, mapping.seed)
        assert learnt == backend.canonical(skeleton, TABLE)
        assert f'"seed": {mapping.seed}' in json.dumps(learnt)
    assert standins[0] == standins[1]


def unchanged_holds_until_anything_is_committed(backend: Backend, state: State) -> None:
    """`unchanged` (the cache around the backend) after mtd's own replace, for the very
    commands it sent; never after another commit (here a dynamic watch element, which the
    diff itself ignores), until a listing compared equal says `in_sync`; never for other
    commands, another table, or a deleted table."""
    state = coverage_state()
    cached = CachingBackend(backend)
    commands, other = rendered(state), rendered(state, 1)
    assert not cached.unchanged(TABLE, commands)  # nothing sent yet
    cached.replace_table(TABLE, commands)
    assert cached.unchanged(TABLE, commands)
    assert not cached.unchanged(TABLE, other) and not cached.unchanged("other", commands)
    cached.run(watch.commands(TABLE, [("198.51.100.7", 100)]))
    assert not cached.unchanged(TABLE, commands)
    result = reconcile(state, 0, cached, secret=SECRET, check=True)
    assert result.changes == [] and cached.unchanged(TABLE, commands)
    cached.run(watch.commands(TABLE, remove=["198.51.100.7"]))
    listing = cached.list_table(TABLE)
    cached.run(watch.commands(TABLE, [("198.51.100.8", 100)]))  # while "comparing"
    cached.in_sync(TABLE, commands)  # too late: something was committed since the listing
    assert listing is not None and not cached.unchanged(TABLE, commands)
    cached.delete_table(TABLE)
    assert not cached.unchanged(TABLE, commands)


def the_mark_moves_by_one_with_each_commit_and_with_nothing_else(
    backend: Backend, state: State
) -> None:
    """What the cache of mtd's last commit rests on (`Backend.mark`): every commit moves
    the generation by exactly one, a listing, a check, a refusal or a missing table's
    deletion does not; `version` is the same from call to call."""
    commands = rendered(state)
    where, start = backend.mark() or ("", -1)
    assert where and start >= 0, backend.mark()

    def moved() -> int:
        now = backend.mark()
        assert now is not None and now[0] == where, (now, where)
        return now[1] - start

    backend.replace_table(TABLE, commands)
    assert moved() == 1
    backend.list_table(TABLE), backend.list_tables(), backend.list_set(TABLE, "dyn4")
    backend.canonical(diff.skeleton_commands(commands), TABLE)
    backend.replace_table(TABLE, rendered(state, 1), check=True)
    bad = [*commands]
    bad.insert(3, BAD_RULE)
    try:
        backend.replace_table(TABLE, bad)
    except KernelError:
        assert backend.delete_table("absent") is False
    else:
        raise AssertionError("a rule into a missing chain was accepted")
    assert moved() == 1
    chain = next(c["add"]["rule"]["chain"] for c in commands if "rule" in c["add"])
    backend.run([{"flush": {"chain": {"family": "inet", "table": TABLE, "name": chain}}}])
    assert moved() == 2
    assert backend.delete_table(TABLE) is True
    assert moved() == 3
    assert backend.version() and backend.version() == backend.version()


def by_hand(backend: Backend, line: str, commands: list[dict[str, Any]]) -> None:
    """Someone else's commit, which mtd's cache never sees: `nft` run by hand (`line`)
    against the kernel; the fake told `commands` directly, not through the cache."""
    from reconciler.adapters.fake import FakeKernel

    if isinstance(backend, FakeKernel):
        if "table" in commands[0].get("add", {}):
            backend.replace_table(commands[0]["add"]["table"]["name"], commands)
        else:
            backend.run(commands)
        return
    import subprocess

    subprocess.run(["nft", *line.split()], check=True)


def a_hand_change_is_never_masked_by_the_cache(backend: Backend, state: State) -> None:
    """After mtd's own commit, `nft` by hand on another table or on mtd's own table moves
    the ruleset past what the cache recorded: the next pass lists, and sees the change to
    mtd's table (a flushed chain) as the diff does without the cache."""
    state = coverage_state()
    cached = CachingBackend(backend)
    commands = rendered(state)
    assert reconcile(state, 0, cached, secret=SECRET).status == "changed"
    assert cached.unchanged(TABLE, commands)
    other = {"add": {"table": {"family": "inet", "name": "other"}}}
    by_hand(backend, "add table inet other", [other])
    assert not cached.unchanged(TABLE, commands)  # listed: mtd's table is as it was
    assert reconcile(state, 0, cached, secret=SECRET, check=True).changes == []
    assert cached.unchanged(TABLE, commands)
    chain = next(c["add"]["rule"]["chain"] for c in commands if "rule" in c["add"])
    flush = {"flush": {"chain": {"family": "inet", "table": TABLE, "name": chain}}}
    by_hand(backend, f"flush chain inet {TABLE} {chain}", [flush])
    assert not cached.unchanged(TABLE, commands)
    seen = reconcile(state, 0, cached, secret=SECRET, check=True)
    assert {(c.op, c.kind) for c in seen.changes} == {("+", "rule")}
    assert not cached.unchanged(TABLE, commands)  # not in sync: nothing recorded


def _normalised(backend: Backend) -> tuple[str, list[Any], list[Any]]:
    """The owned table as `nft -j list table` gives it, handles and element order aside
    (`diff.table_text`), and the dynamic sets' keys (the diff leaves those out)."""
    listing = backend.list_table(TABLE)
    assert listing is not None
    dyn = [
        sorted(diff.elem_text(e) for e in backend.list_set(TABLE, name) or [])
        for name in ("dyn4", "dyn6")
    ]
    return diff.table_text(TABLE, diff.from_listing(listing)), *dyn  # type: ignore[return-value]


def a_patched_rotation_lists_as_a_replacement_would(backend: Backend, state: State) -> None:
    """A rotation as a patch (`core.patch`: maps flushed and filled, chains with a new seed
    flushed and filled) leaves the very table a replacement by the new epoch leaves, dynamic
    entries included; `unchanged` (the cache) does not vouch for it until a listing does."""
    from reconciler.core import patch

    state = coverage_state()
    cached = CachingBackend(backend)
    dynamic = {"4": [("198.51.100.9", 300)], "6": [("2001:db8:5::", 300)]}
    old, new = (render.render(state, shuffle.compute(state, SECRET, e), None, dynamic)
                for e in (0, 1))  # fmt: skip
    cached.replace_table(TABLE, old)
    found = patch.plan(TABLE, old, new)
    assert found is not None and found.chains and found.sets
    cached.patch_table(TABLE, found.commands, new)
    patched = _normalised(backend)
    assert not cached.unchanged(TABLE, new) and not cached.unchanged(TABLE, old)
    assert pending(backend, state, new) == []
    backend.replace_table(TABLE, new)
    assert _normalised(backend) == patched
    assert patched[1] == ["198.51.100.9"] and patched[2] == ["2001:db8:5::"]


def a_refused_patch_changes_nothing(backend: Backend, state: State) -> None:
    """A patch the kernel refuses half-way (a rule into a missing chain) leaves the old
    table whole: its maps are not flushed, its chains not emptied."""
    from reconciler.core import patch

    state = coverage_state()
    old, new = rendered(state), rendered(state, 1)
    backend.replace_table(TABLE, old)
    before = _normalised(backend)
    found = patch.plan(TABLE, old, new)
    assert found is not None
    half = len(found.commands) // 2
    batch = [*found.commands[:half], BAD_RULE, *found.commands[half:]]
    try:
        backend.patch_table(TABLE, batch, new)
    except KernelError as exc:
        assert exc.index == half
    else:
        raise AssertionError("a rule into a missing chain was taken")
    assert _normalised(backend) == before
    assert pending(backend, state, old) == []


def interleave(backend: Backend, foreign: list[dict[str, Any]]) -> None:
    """Make another process's commit (`foreign`) land inside mtd's next `replace_table`,
    after mtd's cache read where the ruleset stood (`mark`) and before its own commit."""
    from reconciler.adapters.fake import FakeKernel

    if isinstance(backend, FakeKernel):

        def once() -> None:
            backend.interleave = None
            backend.run(foreign)

        backend.interleave = once
        return
    run = backend.run  # Nft: replace_table sends its batch by `run`

    def first_foreign(*args: Any, **kwargs: Any) -> None:
        del backend.run  # type: ignore[attr-defined]  # once: the method is back
        run(foreign)
        run(*args, **kwargs)

    backend.run = first_foreign  # type: ignore[method-assign]


def a_commit_inside_mtds_own_is_never_taken_for_it(backend: Backend, state: State) -> None:
    """mtd records the mark before its commit plus one, without reading it again after: a
    commit of another process in between leaves the ruleset past that mark for good, so the
    table is listed again, until a listing compares equal."""
    state = coverage_state()
    cached = CachingBackend(backend)
    commands = rendered(state)
    cached.replace_table(TABLE, commands)
    interleave(backend, watch.commands(TABLE, [("198.51.100.7", 100)]))
    cached.replace_table(TABLE, commands)
    assert not cached.unchanged(TABLE, commands)
    result = reconcile(state, 0, cached, secret=SECRET, check=True)
    assert result.changes == [] and cached.unchanged(TABLE, commands)
    cached.replace_table(TABLE, commands)  # and mtd's own commit alone still counts
    assert cached.unchanged(TABLE, commands)


CASES: dict[str, Callable[[Backend, State], None]] = {
    f.__name__: f
    for f in (
        apply_lists_back_in_sync,
        missing_table_is_not_found,
        delete_removes_the_table,
        refused_command_changes_nothing,
        check_changes_nothing,
        canonical_refusal_names_the_command,
        reconcile_converges_then_is_ok,
        a_repair_batch_restores_chains,
        a_repair_batch_restores_map_elements,
        dynamic_elements_add_renew_delete_and_list,
        a_table_as_written_lists_its_canonical_skeleton,
        a_seed_stand_in_learns_the_form_of_the_seed,
        unchanged_holds_until_anything_is_committed,
        the_mark_moves_by_one_with_each_commit_and_with_nothing_else,
        a_hand_change_is_never_masked_by_the_cache,
        a_commit_inside_mtds_own_is_never_taken_for_it,
        a_patched_rotation_lists_as_a_replacement_would,
        a_refused_patch_changes_nothing,
    )
}


def main() -> None:
    """Inside a namespace: run one case against libnftables; exit 0 when it holds."""
    from reconciler.adapters.kernel import Nft

    name, state_path = sys.argv[1], Path(sys.argv[2])
    backend = Nft()
    backend.set_sysctls = lambda values: None  # type: ignore[method-assign]  # not the point
    CASES[name](backend, files.load_state(state_path))


if __name__ == "__main__":
    main()
