"""An operator's day without root: what README promises about the CLI, make and the daemon's
metrics, checked claim by claim (issue 14)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from reconciler.adapters import auditlog, bus, files, subscriber
from reconciler.core import render, shuffle
from reconciler.core import state as state_module
from reconciler.core.state import Local
from reconciler.errors import MtdError
from reconciler.services.daemon import Metrics
from tests.conftest import MTD, ROOT, mtd, write_state
from tests.redis_fixtures import needs_redis, redis_server


@pytest.mark.parametrize(
    "args", [["diff", "--epoch", "-5"], ["render", "--epoch", "-1"]], ids=["diff", "render"]
)
def test_negative_epochs_are_refused_in_one_line(state_file: Path, args: list[str]):
    out = mtd("-s", str(state_file), *args)
    assert out.returncode == 1  # not 2: for `diff` that means "changes pending"
    assert out.stderr == f"mtd: error: --epoch {args[2]}: expected an epoch of 0 or more\n"
    assert not out.stdout


@pytest.mark.parametrize(
    ("target", "args"),
    [("bench", "ARGS=--quick"), ("bench-quick", ""), ("bench-quick", "ARGS=--runs 2")],
)
def test_make_bench_passes_its_arguments(target: str, args: str):
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", target, *([args] if args else [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    # Under `make test` the outer make's level is inherited: only the recipe lines count.
    last = [ln for ln in out.stdout.splitlines() if "benchmarks/bench.py" in ln][-1].rstrip()
    assert last.endswith("benchmarks/bench.py --quick" + (" --runs 2" if "runs" in args else ""))


def test_pull_metrics_only_with_pull():
    without = generate_latest(Metrics().registry).decode()
    assert "mtd_reconciles_total" in without
    for name in ("mtd_pulls_total", "mtd_pull_head_rejected", "mtd_pull_fetch_failures"):
        assert name not in without
    with_pull = generate_latest(Metrics(pull=True).registry).decode()
    for name in ("mtd_pulls_total", "mtd_pull_head_rejected", "mtd_pull_fetch_failures"):
        assert name in with_pull


def test_pull_once_says_nothing_of_a_next_try(tmp_path: Path):
    gone = tmp_path / "gone.git"
    out = mtd("pull", "--repo", str(gone), "--state-dir", str(tmp_path / "sd"), "--once")
    assert out.returncode == 1
    assert out.stderr.startswith("mtd: error: ") and len(out.stderr.splitlines()) == 1
    assert "keeping the current state" in out.stderr and "next try" not in out.stderr


def test_a_continuous_pull_says_what_it_follows(tmp_path: Path):
    gone, sd = tmp_path / "gone.git", tmp_path / "sd"
    argv = [*MTD, "pull", "--repo", str(gone), "--state-dir", str(sd), "--interval", "30"]
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "next try in" not in (tmp_path / "err").read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert (tmp_path / "out").read_text() == (
        f"mtd pull: following {gone} branch main every 30 s (clone and pull.json in {sd})\n"
    )
    (line,) = (tmp_path / "err").read_text().splitlines()
    assert "keeping the current state" in line and line.endswith(" s")


# -- the desired state: the schema as editors see it, `state` as templates see it ----------


def test_the_schema_accepts_group_files_and_documents_comments(tmp_path: Path):
    import jsonschema

    schema = json.loads(mtd("schema").stdout)
    group = {"hosts": ["web1", "web2"], "watched": [{"source": "192.0.2.3", "comment": "lab"}]}
    host = {"ports": {"range": [1, 40]}}  # a host file may change one key of `ports`
    for doc in (group, host):
        assert list(jsonschema.Draft202012Validator(schema).iter_errors(doc)) == []
    entry = schema["properties"]["watched"]["items"]["properties"]
    assert "description" in entry["comment"] and "description" in schema["properties"]["hosts"]
    reference = (ROOT / "docs/configuration.md").read_text()
    assert "`comment`" in reference and "`hosts`" in reference
    # Outside an inventory's group files, `hosts:` is still refused, in one line.
    bad = write_state(tmp_path / "s.yaml", hosts=["web1"])
    out = mtd("-s", str(bad), "validate")
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1
    assert f"{bad}:" in out.stderr and "hosts: only groups/*.yaml files" in out.stderr


def test_the_template_variable_state_has_every_default(tmp_path: Path):
    state = files.load_state(write_state(tmp_path / "s.yaml"))
    doc = state.doc
    for key in json.loads(mtd("schema").stdout)["properties"]:
        if key != "hosts":
            assert key in doc, key
    assert doc["epoch_file"] == state.epoch_file and doc["audit_log"] == state.audit_log
    assert doc["redis"] == dict(state.redis) and "epoch_key" in doc["redis"]
    assert set(doc["ports"]["services"]) == {"tcp", "udp"}
    seen = render.context(state, shuffle.compute(state, b"\0" * 32, 0))["state"]
    # Templates see the fleet's keys, none of the host's own (Redis, paths, table, mark).
    assert seen == {k: v for k, v in doc.items() if k not in state_module.HOST_LOCAL}
    assert "redis" not in seen and "secret_file" not in seen and seen["ports"] is doc["ports"]


# -- mtd history -------------------------------------------------------------------------


def test_history_has_a_header_and_a_missing_log_is_an_error(tmp_path: Path, state_file: Path):
    missing = tmp_path / "nope.jsonl"
    out = mtd("-s", str(state_file), "history", "--log", str(missing))
    assert out.returncode == 1 and out.stderr == f"mtd: error: --log {missing}: no such audit log\n"
    out = mtd("-s", str(state_file), "history")  # nothing applied yet: said, not an error
    assert out.returncode == 0 and "no audit log yet" in out.stderr and not out.stdout
    log = files.load_state(state_file).audit_log
    auditlog.record(log, host="h1", origin="manual", epoch=3, result="changed", fingerprint="ab")
    auditlog.record(log, host="web-long-name", origin="manual", epoch=None, result="down",
                    fingerprint=None, table="mtd")  # fmt: skip
    out = mtd("-s", str(state_file), "history")
    header, first, second = out.stdout.splitlines()
    assert header.split() == ["TIME", "HOST", "ORIGIN", "COMMIT", "EPOCH", "RESULT", "FINGERPRINT"]
    assert first.split()[1:] == ["h1", "manual", "-", "3", "changed", "ab"]
    assert second.split()[1:] == ["web-long-name", "manual", "-", "-", "down", "-"]
    assert header.index("RESULT") == first.index("changed") == second.index("down")


def test_mapping_at_after_a_down_says_the_table_was_down(state_file: Path):
    state = files.load_state(state_file)
    secret = files.load_secret(state.secret_file, create=True)
    fp = shuffle.compute(state, secret, 0).fingerprint(secret)
    t0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    for offset, result in [(0.0, "changed"), (60.25, "down"), (120.5, "changed")]:
        auditlog.record(
            state.audit_log, host="h", origin="manual", epoch=None if result == "down" else 0,
            result=result, fingerprint=None if result == "down" else fp, table="mtd",
            when=t0 + timedelta(seconds=offset),
        )  # fmt: skip

    def at(when: str) -> subprocess.CompletedProcess:
        sd = str(state_file.parent / "no")
        return mtd("-s", str(state_file), "history", "--host", "h", "--mapping-at", when,
                   "--source", "192.0.2.3", "--state-dir", sd)  # fmt: skip

    out = at("2024-05-01T12:01:30Z")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "192.0.2.3 at 2024-05-01T12:01:30.000000Z: table inet mtd was down (removed "
        "2024-05-01T12:01:00.250000Z by manual): every source saw the real ports\n"
    )
    assert "verified" in at("2024-05-01T12:00:30Z").stdout
    # To the whole second, 12:01:00 is before the down at 12:01:00.25: said so; sub-second
    # precision picks the change that was live.
    whole = at("2024-05-01T12:01:00Z")
    assert "verified" in whole.stdout and "within the second after" in whole.stderr
    sub = at("2024-05-01T12:01:00.3Z")
    assert "was down" in sub.stdout and not sub.stderr
    assert "verified" in at("2024-05-01T12:02:00.5Z").stdout


@needs_redis
def test_signed_subscriber_logs_connected_before_what_the_key_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="mtd")
    key = b"k" * 32
    with redis_server(tmp_path / "redis") as r:
        r.cli("SET", "mtd:epoch", "7")
        r.cli("SET", "mtd:epoch:last", json.dumps({"epoch": 7, "time": 1.0}))  # unsigned
        cfg = bus.BusConfig(r.url, "mtd:rotate", "mtd:epoch", signing_key=key, timeout=2)
        connected = threading.Event()

        class Sink:
            def known_epoch(self) -> int:
                return 7

            def applied_epoch(self) -> int:
                return 7

            def trigger(self, trigger: bus.Trigger) -> None:
                pass

            def connection(self, up: bool) -> None:
                if up:
                    connected.set()

            def ignored(self, outcome: str) -> None:
                pass

        sub = subscriber.start_subscriber(cfg, Sink())
        try:
            assert connected.wait(15)
        finally:
            sub.stop()
    messages = [rec.getMessage() for rec in caplog.records]
    first = next(i for i, m in enumerate(messages) if "connected, subscribed" in m)
    problem = next(i for i, m in enumerate(messages) if "cannot read the fleet epoch" in m)
    assert first < problem and "epoch 7: unsigned" in messages[problem]
    assert "fleet epoch 7" not in messages[first]  # no claim about what it could not read


def test_a_damaged_sysctl_record_is_one_line(tmp_path: Path):
    record = tmp_path / "sysctls.json"
    record.write_text('{"../../etc/passwd": "x"}')
    with pytest.raises(MtdError, match=r"sysctls\.json: expected net/\* sysctl names"):
        files.read_sysctl_record(record)
    record.write_text("{nope")
    with pytest.raises(MtdError, match=r"sysctls\.json: unreadable"):
        files.read_sysctl_record(record)
    # Values are kept from the first change on: a later one never overwrites the host's own.
    record.unlink()
    files.remember_sysctls(record, {"net/ipv4/fwmark_reflect": "0"})
    files.remember_sysctls(record, {"net/ipv4/fwmark_reflect": "1", "net/ipv6/fwmark_reflect": "0"})
    assert files.read_sysctl_record(record) == {
        "net/ipv4/fwmark_reflect": "0",
        "net/ipv6/fwmark_reflect": "0",
    }
    root = tmp_path / "proc"
    (root / "net/ipv4").mkdir(parents=True)
    (root / "net/ipv6").mkdir(parents=True)
    (root / "net/ipv4/fwmark_reflect").write_text("1\n")
    (root / "net/ipv6/fwmark_reflect").write_text("2\n")  # changed since by someone else
    values = {"net/ipv4/fwmark_reflect": "1", "net/ipv6/fwmark_reflect": "1"}
    assert files.restore_sysctls(record, values, str(root)) == {"net/ipv4/fwmark_reflect": "0"}
    assert (root / "net/ipv6/fwmark_reflect").read_text() == "2\n" and not record.exists()
    assert files.restore_sysctls(record, values, str(root)) is None


def test_the_host_configuration_in_the_state_directory_is_not_read_as_state(tmp_path: Path):
    """/etc/mtd holds both the unit's state and mtd.yaml, the host's configuration: the
    configuration is read once, as configuration (its keys may be host-local only)."""
    example = (ROOT / "desired_state" / "mtd.yaml").read_text()
    (tmp_path / "state.yaml").write_text(
        "\n".join(line for line in example.splitlines() if not line.startswith("table:"))
    )
    config = tmp_path / "mtd.yaml"
    config.write_text("table: mtdconf\n")
    names = [name for name, _ in files.state_documents(tmp_path, skip=config)]
    assert names == [str(tmp_path / "state.yaml")]
    state = files.load_state(
        tmp_path, local=Local(documents=files.local_config(config)), config=config
    )
    assert state.table == "mtdconf"
    out = mtd("--config", str(config), "validate", "-s", str(tmp_path))
    assert out.returncode == 0, out.stderr
