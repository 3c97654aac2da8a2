"""The audit log and `mtd history` (no root needed: entries are written directly)."""

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.adapters import auditlog, files
from reconciler.core import audit, bucket, shuffle
from reconciler.errors import MtdError
from tests.conftest import mtd, write_state

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def test_one_private_json_line_per_record(tmp_path: Path):
    log = tmp_path / "sub" / "audit.jsonl"
    auditlog.record(log, host="h1", origin="manual", epoch=0, result="changed", fingerprint="ab")
    auditlog.record(
        log, host="h1", origin="pull", epoch=0, result="ok", fingerprint="ab", commit="c" * 40
    )
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["origin"] for e in lines] == ["manual", "pull"]
    assert set(lines[1]) == {"time", "host", "commit", "epoch", "origin", "result", "fingerprint"}
    assert auditlog.entries(log) == lines


def test_an_existing_log_readable_by_others_is_refused_not_re_moded(tmp_path: Path):
    """mtd never re-modes an audit log (issue 8): a 0644 file is refused with the fix to run."""
    log = tmp_path / "audit.jsonl"
    log.write_text("")
    log.chmod(0o644)
    with pytest.raises(MtdError, match=r"mode 0644: expected 0600, the audit log is private"):
        auditlog.record(log, host="h", origin="drift", epoch=1, result="changed", fingerprint="x")
    assert stat.S_IMODE(log.stat().st_mode) == 0o644 and log.read_text() == ""
    log.chmod(0o600)
    auditlog.record(log, host="h", origin="drift", epoch=1, result="changed", fingerprint="x")
    assert len(auditlog.entries(log)) == 1


def test_unknown_origin_is_a_programming_error(tmp_path: Path):
    with pytest.raises(ValueError, match="expected one of start, redis, pull, drift, manual"):
        auditlog.record(
            tmp_path / "a", host="h", origin="cron", epoch=0, result="ok", fingerprint=""
        )


def test_a_torn_last_line_is_skipped_a_bad_middle_line_is_named(tmp_path: Path):
    log = tmp_path / "audit.jsonl"
    auditlog.record(log, host="h", origin="start", epoch=0, result="changed", fingerprint="x")
    log.write_text(log.read_text() + '{"time": "2024-')
    assert len(auditlog.entries(log)) == 1
    log.write_text('nope\n{"time": "2024-05-01T00:00:00Z"}\n')
    with pytest.raises(MtdError, match=r"audit\.jsonl:1: not an audit entry"):
        auditlog.entries(log)
    assert auditlog.entries(tmp_path / "missing") == []


def test_live_at_picks_the_last_applied_entry_not_after_the_time(tmp_path: Path):
    log = tmp_path / "audit.jsonl"
    for minutes, epoch, result in [(0, 0, "changed"), (10, 1, "changed"), (20, None, "rejected")]:
        auditlog.record(
            log,
            host="h",
            origin="redis",
            epoch=epoch,
            result=result,
            fingerprint=None,
            when=T0 + timedelta(minutes=minutes),
        )
    entries = auditlog.entries(log)
    assert audit.live_at(entries, T0 - timedelta(seconds=1)) is None
    assert audit.live_at(entries, T0 + timedelta(minutes=5))["epoch"] == 0
    assert audit.live_at(entries, T0 + timedelta(minutes=10))["epoch"] == 1
    assert audit.live_at(entries, T0 + timedelta(minutes=30))["epoch"] == 1
    assert audit.live_at(entries, T0 + timedelta(minutes=30), host="other") is None


def test_parse_time_accepts_iso_and_unix_seconds():
    assert audit.parse_time("2024-05-01T12:00:00Z") == T0
    assert audit.parse_time("2024-05-01T12:00:00") == T0
    assert audit.parse_time("2024-05-01T14:00:00+02:00") == T0
    assert audit.parse_time(f"@{T0.timestamp():.0f}") == T0
    with pytest.raises(MtdError, match="expected a time such as"):
        audit.parse_time("yesterday")


def test_mapping_of_uses_the_most_specific_watched_entry(state_file: Path):
    state = files.load_state(state_file)
    secret = b"k" * 32
    mapping = shuffle.compute(state, secret, 3)
    inside = audit.mapping_of(state, secret, 3, "198.51.100.7")
    assert inside.watched is not None and inside.watched.label == "198.51.100.0/24"
    assert inside.moves["tcp"] == mapping.moves[("198.51.100.0/24", "tcp")]
    assert inside.fingerprint == mapping.fingerprint(secret)
    host = audit.mapping_of(state, secret, 3, "192.0.2.3")
    assert sorted(host.moves["tcp"]) == [3, 4, 5]  # 1 and 2 are ignored for it
    assert audit.mapping_of(state, secret, 3, "192.0.2.2").watched is None
    # As a dual-stack log names that client: the IPv4 source's mapping, not "not watched".
    assert audit.mapping_of(state, secret, 3, "::ffff:192.0.2.3").moves == host.moves
    with pytest.raises(MtdError, match="--source 'x'"):
        audit.mapping_of(state, secret, 3, "x")


def test_history_lists_and_recomputes_a_mapping_with_the_secret(state_file: Path):
    state = files.load_state(state_file)
    secret = files.load_secret(state.secret_file, create=True)
    for minutes, epoch in [(0, 0), (10, 1)]:
        fp = shuffle.compute(state, secret, epoch).fingerprint(secret)
        auditlog.record(
            state.audit_log,
            host="h1",
            origin="redis",
            epoch=epoch,
            result="changed",
            fingerprint=fp,
            when=T0 + timedelta(minutes=minutes),
        )
    out = mtd("-s", str(state_file), "history")
    assert out.returncode == 0, out.stderr
    assert [ln.split()[2:5] for ln in out.stdout.splitlines()] == [
        ["ORIGIN", "COMMIT", "EPOCH"],
        ["redis", "-", "0"],
        ["redis", "-", "1"],
    ]
    at = mtd(
        "-s", str(state_file), "history", "--mapping-at", "2024-05-01T12:05:00Z",
        "--source", "192.0.2.3", "--state-dir", str(state_file.parent / "none"),
    )  # fmt: skip
    assert at.returncode == 0, at.stderr
    moves = shuffle.compute(state, secret, 0).moves[("192.0.2.3", "tcp")]
    assert at.stdout.splitlines()[0].startswith("192.0.2.3 at 2024-05-01T12:05:00.000000Z: epoch 0")
    assert [f"tcp {p} -> {q}" for p, q in sorted(moves.items())] == at.stdout.splitlines()[2:5]
    assert secret.hex() not in at.stdout
    # Another secret (or state) than the one of that time is refused, not guessed at.
    Path(state.secret_file).write_bytes(b"x" * 32)
    wrong = mtd(
        "-s", str(state_file), "history", "--mapping-at", "2024-05-01T12:05:00Z",
        "--source", "192.0.2.3", "--state-dir", str(state_file.parent / "none"),
    )  # fmt: skip
    assert wrong.returncode == 1 and "does not match" in wrong.stderr
    early = mtd("-s", str(state_file), "history", "--mapping-at", "2024-01-01", "--source", "::1")
    assert early.returncode == 1 and "no applied change at or before 2024-01-01" in early.stderr


def test_mapping_at_names_the_bucket_of_a_per_source_source_and_trusted_ones(tmp_path: Path):
    state_file = write_state(
        tmp_path / "state.yaml",
        watched=[{"source": "0.0.0.0/0", "per_source": True}],
        trusted=["203.0.113.0/24"],
    )
    state = files.load_state(state_file)
    secret = files.load_secret(state.secret_file, create=True)
    portmap = shuffle.compute(state, secret, 3)
    auditlog.record(state.audit_log, host="h1", origin="manual", epoch=3, result="changed",
                    fingerprint=portmap.fingerprint(secret), when=T0)  # fmt: skip
    args = ["-s", str(state_file), "history", "--mapping-at", "2024-05-01T12:05:00Z",
            "--state-dir", str(tmp_path / "none"), "--source"]  # fmt: skip
    at = mtd(*args, "198.51.100.77")
    assert at.returncode == 0, at.stderr
    k = bucket.of("198.51.100.77", portmap.seed, state.bucket_count)
    lines = at.stdout.splitlines()
    assert lines[1] == f"198.51.100.77: watched as 0.0.0.0/0, bucket {k}"
    moves = portmap.buckets[k]["tcp"]
    assert [f"tcp {p} -> {q}" for p, q in sorted(moves.items())] == lines[2:7]
    trusted = mtd(*args, "203.0.113.9")
    assert trusted.stdout.splitlines()[1] == "203.0.113.9: trusted: it saw the real ports"
