"""No lockouts, without a kernel: `SSH_CONNECTION` parsing, the decision, where the session
comes from (the environment or a parent process), and the pending revert's record."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from reconciler.adapters import auditlog, files, session, watchstore
from reconciler.adapters.fake import FakeKernel
from reconciler.core import lockout, shuffle
from reconciler.errors import MtdError
from reconciler.services import confirm
from reconciler.services import lockout as guard
from reconciler.services.reconcile import reconcile
from tests.conftest import write_state

SECRET = b"k" * 32


@pytest.mark.parametrize(
    ("text", "source", "port"),
    [
        ("192.0.2.3 50022 192.0.2.1 22", "192.0.2.3", 22),
        ("2001:db8::3 50022 2001:db8::1 2222", "2001:db8::3", 2222),
        ("::ffff:192.0.2.3 50022 ::ffff:192.0.2.1 22", "192.0.2.3", 22),  # dual-stack sshd
        ("fe80::1%eth0 50022 fe80::2%eth0 22", "fe80::1", 22),  # link-local, zoned
        ("  192.0.2.3   1 192.0.2.1   4 ", "192.0.2.3", 4),
    ],
)
def test_parse_session(text: str, source: str, port: int) -> None:
    assert lockout.parse(text) == lockout.Session(source, port)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "192.0.2.3",
        "192.0.2.3 1 192.0.2.1",
        "192.0.2.3 1 192.0.2.1 22 extra",
        "192.0.2.300 1 192.0.2.1 22",
        "192.0.2.3 1 192.0.2.1 0",
        "192.0.2.3 1 192.0.2.1 65536",
        "192.0.2.3 1 192.0.2.1 -22",
        "192.0.2.3 1 192.0.2.1 0x16",
        "192.0.2.3 1 192.0.2.1 \uff12\uff12",  # unicode digits are not a port
        "a" * 10_000 + " 1 2 3",
    ],
)
def test_parse_refuses_garbage_in_one_short_line(text: str) -> None:
    with pytest.raises(MtdError) as exc:
        lockout.parse(text)
    assert len(exc.value.problems) == 1
    line = exc.value.problems[0]
    assert "SSH_CONNECTION" in line and "--force" in line and len(line) < 300


def test_refusal_is_about_the_session_port_only() -> None:
    s = lockout.Session("192.0.2.3", 22)
    assert lockout.refusal(s, 22, 22, is_trusted=False) is None
    assert lockout.refusal(s, 7, 7, is_trusted=False) is None  # moved, and stays there
    assert lockout.refusal(s, 22, 9, is_trusted=True) is None
    line = lockout.refusal(s, 22, 9, is_trusted=False)
    assert line is not None
    assert "192.0.2.3" in line and "tcp port 22" in line and "trusted" in line
    assert "--force" in line and "\n" not in line
    assert "9" not in line.replace("192.0.2.3", "")  # the new (hidden) port is not printed
    assert lockout.refusal(s, 7, 22, is_trusted=False) is not None  # unwatched: 7 stops


def test_trusted_prefixes() -> None:
    assert lockout.trusted("203.0.113.9", ["203.0.113.0/24"])
    assert lockout.trusted("2001:db8:2::5", ["10.0.0.0/8", "2001:db8:2::/64"])
    assert not lockout.trusted("192.0.2.3", ["2001:db8::/32", "203.0.113.0/24"])
    assert not lockout.trusted("192.0.2.3", [])


def test_session_from_environment_or_parents(tmp_path: Path) -> None:
    assert session.ssh_connection({"SSH_CONNECTION": "192.0.2.3 1 192.0.2.1 22"}) == (
        "192.0.2.3 1 192.0.2.1 22"
    )
    assert session.ssh_connection({"SSH_CONNECTION": ""}) is None  # set empty: no session
    # Absent (sudo resets the environment): the nearest parent that has it.
    proc = tmp_path / "proc"
    chain = {os.getppid(): 4000, 4000: 3000, 3000: 1}
    for pid, parent in chain.items():
        d = proc / str(pid)
        d.mkdir(parents=True)
        (d / "stat").write_text(f"{pid} (sudo) odd) name) S {parent} 1 1 0")
        (d / "environ").write_bytes(b"PATH=/bin\0HOME=/root\0")
    (proc / "3000" / "environ").write_bytes(b"A=1\0SSH_CONNECTION=198.51.100.7 2 192.0.2.1 22\0")
    assert session.ssh_connection({}, proc=str(proc)) == "198.51.100.7 2 192.0.2.1 22"
    (proc / "3000" / "environ").write_bytes(b"A=1\0")
    assert session.ssh_connection({}, proc=str(proc)) is None
    (proc / "4000" / "stat").write_text("garbage")  # a parent gone mid-walk: no session
    assert session.ssh_connection({}, proc=str(proc)) is None


def _state(tmp_path: Path, **over: object):  # type: ignore[no-untyped-def]
    doc = {
        "ports": {"range": [1, 40], "services": {"tcp": [1, 2, 22], "udp": [53]}},
        "watched": [{"source": "198.51.100.0/24"}],
        "audit_log": str(tmp_path / "audit.jsonl"),
        "epoch_file": str(tmp_path / "epoch"),
    } | over
    return files.load_state(write_state(tmp_path / "state.yaml", **doc))


def _apply(state, nft: FakeKernel, epoch: int = 0) -> None:  # type: ignore[no-untyped-def]
    result = reconcile(state, epoch, nft, secret=SECRET)
    auditlog.log_result(state, result, origin="manual", host="h")


def _check(state, nft, conn: str, epoch: int = 0, **kw: object) -> bool:  # type: ignore[no-untyped-def]
    env = {"SSH_CONNECTION": conn}
    return guard.check(state, SECRET, epoch, nft, host="h", environ=env, **kw)  # type: ignore[arg-type]


def test_check_refuses_what_moves_the_session_port(tmp_path: Path) -> None:
    state = _state(tmp_path)
    nft = FakeKernel()
    inside, outside = "198.51.100.7 5 192.0.2.1 22", "192.0.2.9 5 192.0.2.1 22"
    with pytest.raises(MtdError, match=re.escape("198.51.100.7 to tcp port 22")):
        _check(state, nft, inside, force=False)  # no table yet: it reaches 22 now
    assert _check(state, nft, inside, force=True) is True  # overridden: said so
    assert _check(state, nft, outside, force=False) is False  # not watched
    assert _check(state, nft, "198.51.100.7 5 192.0.2.1 2222", force=False) is False  # no service
    # A source watched with 22 in its ignore list keeps 22: the next connection works.
    kept = _state(tmp_path, watched=[{"source": "198.51.100.0/24", "ignore": {"tcp": [22]}}])
    assert _check(kept, nft, inside, force=False) is False
    # Garbage in SSH_CONNECTION: refused, unless --force.
    with pytest.raises(MtdError, match="SSH_CONNECTION"):
        _check(state, nft, "nonsense", force=False)
    assert _check(state, nft, "nonsense", force=True) is True


def test_check_compares_with_the_live_mapping(tmp_path: Path) -> None:
    """A session that already comes in through the shuffled port: re-applying the same
    mapping is fine, a rotation is not; the live mapping is read from the audit log."""
    state = _state(tmp_path)
    nft = FakeKernel()
    _apply(state, nft, epoch=0)
    moved = shuffle.compute(state, SECRET, 0).moves
    assert any(22 in m for m in moved.values())
    inside = "198.51.100.7 5 192.0.2.1 22"
    assert _check(state, nft, inside, epoch=0, force=False) is False
    with pytest.raises(MtdError, match="locked out"):
        _check(state, nft, inside, epoch=1, force=False)
    # Unwatching the source moves its port back to 22: that too is refused...
    other = _state(tmp_path, watched=[{"source": "203.0.113.0/24"}])
    with pytest.raises(MtdError, match="locked out"):
        _check(other, nft, inside, epoch=0, force=False, earlier=[state])
    # ...and without the earlier state mtd assumes the real port (the usual session).
    assert _check(other, nft, inside, epoch=0, force=False) is False


def test_check_knows_per_source_dynamic_and_trusted_sources(tmp_path: Path) -> None:
    """A per_source or dynamic source finds its port at its bucket's mapping: the check
    refuses what moves it there, and passes a re-apply of the same epoch; a trusted source
    inside a per_source prefix is never moved, so it always passes."""
    everyone = [{"source": "0.0.0.0/0", "per_source": True}]
    state = _state(tmp_path, watched=everyone, trusted=["203.0.113.0/24"])
    nft = FakeKernel()
    inside, partner = "198.51.100.7 5 192.0.2.1 22", "203.0.113.9 5 192.0.2.1 22"
    with pytest.raises(MtdError, match="locked out"):
        _check(state, nft, inside, force=False)  # no table yet: it reaches 22 now
    assert _check(state, nft, partner, force=False) is False
    _apply(state, nft, epoch=0)
    assert _check(state, nft, inside, epoch=0, force=False) is False  # same bucket mapping
    with pytest.raises(MtdError, match="locked out"):
        _check(state, nft, inside, epoch=1, force=False)  # a new seed and shuffle
    assert _check(state, nft, partner, epoch=1, force=False) is False
    # A dynamic source (the store) outside every watched entry: its bucket, too (no table
    # yet: it reaches 22 now).
    alone, nft = _state(tmp_path, watched=[]), FakeKernel()
    dynamic = "192.0.2.9 5 192.0.2.1 22"
    assert _check(alone, nft, dynamic, force=False) is False
    store = watchstore.path_for(alone.epoch_file)
    store.write_text(json.dumps({"entries": [
        {"source": "192.0.2.9", "origin": "cli", "reason": "", "expires_at": 4e9}]}))  # fmt: skip
    with pytest.raises(MtdError, match=re.escape("192.0.2.9 to tcp port 22")):
        _check(alone, nft, dynamic, force=False)


def test_record_and_revert_with_a_fake_kernel(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    spawned: list[tuple[Path, str]] = []
    monkeypatch.setattr(confirm, "spawn", lambda p, t: spawned.append((p, t)) or 4242)
    state = _state(tmp_path)
    nft = FakeKernel()
    _apply(state, nft)
    before = nft.list_table(state.table)
    other = _state(tmp_path, watched=[{"source": "203.0.113.0/24"}])
    with confirm.armed(other, nft, seconds=60, host="h") as rec:
        reconcile(other, 0, nft, secret=SECRET)
    path = confirm.record_path(state.epoch_file)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert json.loads(path.read_text())["token"] == rec["token"] == spawned[0][1]
    # A second --confirm keeps the restore point of the first.
    with confirm.armed(state, nft, seconds=60, host="h") as rec2:
        pass
    assert json.dumps(rec2["previous"]) == json.dumps(rec["previous"])
    assert rec2["token"] != rec["token"]
    assert confirm.watch(path, rec["token"], nft) == 0  # the first watcher: taken over
    assert nft.list_table(state.table) != before
    # The second one, at its deadline: one replacement, then the audit line, no record.
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"deadline": 0}))
    assert confirm.watch(path, rec2["token"], nft) == 0
    assert json.dumps(nft.list_table(state.table)) == json.dumps(before)
    assert nft.applied[-1].op == "replace"
    assert not path.exists()
    last = auditlog.entries(state.audit_log)[-1]
    first = auditlog.entries(state.audit_log)[0]
    assert last["origin"] == "revert" and last["result"] == "reverted"
    assert (last["epoch"], last["fingerprint"]) == (first["epoch"], first["fingerprint"])
    assert confirm.last_revert(state, "h") == last


def test_failed_change_puts_the_record_back(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(confirm, "spawn", lambda p, t: 1)
    state = _state(tmp_path)
    nft = FakeKernel()
    path = confirm.record_path(state.epoch_file)
    with pytest.raises(RuntimeError), confirm.armed(state, nft, seconds=9, host="h"):
        raise RuntimeError
    assert not path.exists()
    with confirm.armed(state, nft, seconds=9, host="h") as rec:
        pass
    with pytest.raises(RuntimeError), confirm.armed(state, nft, seconds=9, host="h"):
        raise RuntimeError
    assert json.loads(path.read_text())["token"] == rec["token"]
    # No table before: the revert removes it.
    reconcile(state, 0, nft, secret=SECRET)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"deadline": 0}))
    confirm.watch(path, rec["token"], nft)
    assert nft.list_table(state.table) is None
    assert auditlog.entries(state.audit_log)[-1]["result"] == "down"


@pytest.mark.parametrize("text", ["", "{}", "[1]", '{"token": 1}', "\x00" * 9])
def test_a_broken_record_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "confirm.json"
    path.write_text(text)
    with pytest.raises(MtdError, match="not a pending revert"):
        confirm.read(path)


def test_ruleset_ownership_cannot_be_confirmed(tmp_path: Path) -> None:
    state = _state(tmp_path, ownership="ruleset")
    with (
        pytest.raises(MtdError, match="ownership: ruleset"),
        confirm.armed(state, FakeKernel(), seconds=9, host="h"),
    ):
        pass


def test_revert_touches_only_the_owned_table(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A record whose kept table names another table (or family) is refused whole."""
    monkeypatch.setattr(confirm, "spawn", lambda p, t: 1)
    state = _state(tmp_path)
    nft = FakeKernel()
    _apply(state, nft)
    with confirm.armed(state, nft, seconds=9, host="h") as rec:
        pass
    path = confirm.record_path(state.epoch_file)
    live = nft.list_table(state.table)
    for bad in (
        {"table": {"family": "inet", "name": "filter"}},
        {"chain": {"family": "ip", "table": "mtd", "name": "x"}},
        {"rule": {"family": "inet", "table": "filter", "chain": "input", "expr": []}},
        ["not", "an", "object"],
    ):
        data = json.loads(path.read_text())
        path.write_text(json.dumps(data | {"deadline": 0, "previous": [*rec["previous"], bad]}))
        assert confirm.watch(path, rec["token"], nft) == 1
        assert json.dumps(nft.list_table(state.table)) == json.dumps(live)
        last = auditlog.entries(state.audit_log)[-1]
        assert last["result"] == "rejected" and "nothing reverted" in last["error"]
        assert not path.exists()
        path.write_text(json.dumps(data))
