"""Fleet plumbing without root: Sentinel URLs, pull notices, heartbeat records and the
`mtd fleet status` classification; then against real redis-server and Sentinel processes on
loopback (Redis only: nothing here loads rules)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.adapters import bus, subscriber
from reconciler.adapters.credentials import redact
from reconciler.core import fleet
from reconciler.errors import MtdError
from reconciler.lab.netns import RedisSentinel, RedisServer, sentinel_url
from tests.conftest import mtd, write_state
from tests.redis_fixtures import needs_redis, redis_server

KEY = b"k" * 32


def config(url: str = "redis://127.0.0.1:1/0", signed: bool = False, **kw: Any) -> bus.BusConfig:
    kw.setdefault("reconnect_min", 0.05)
    kw.setdefault("reconnect_max", 0.2)
    kw.setdefault("check_interval", 0.2)
    kw.setdefault("timeout", 0.5)
    return bus.BusConfig(
        url=url,
        channel="mtd:rotate",
        epoch_key="mtd:epoch",
        signing_key=KEY if signed else None,
        max_message_bytes=256,
        pull_channel="mtd:pull",
        heartbeat_key="mtd:hosts",
        **kw,
    )


# -- Sentinel URLs --------------------------------------------------------------------------


def test_sentinel_urls_parse_like_redis_py_urls():
    t = bus.parse_sentinel_url(
        "redis+sentinel://mtd:s3cret@192.0.2.7:26379,[2001:db8::7]:26380,sentinel.example/"
        "fleet/3?sentinel_password=s2&ssl_cert_reqs=none"
    )
    assert t.sentinels == (
        ("192.0.2.7", 26379),
        ("2001:db8::7", 26380),
        ("sentinel.example", 26379),
    )
    assert t.master == "fleet"
    assert t.master_kwargs["db"] == 3
    assert (t.master_kwargs["username"], t.master_kwargs["password"]) == ("mtd", "s3cret")
    assert t.sentinel_kwargs["password"] == "s2" and "username" not in t.sentinel_kwargs
    assert "sentinel_password" not in t.master_kwargs
    assert "s3cret" not in repr(t) and "s2" not in repr(t)
    tls = bus.parse_sentinel_url("rediss+sentinel://h:1/m")
    assert tls.master_kwargs["ssl"] is True and tls.sentinel_kwargs["ssl"] is True
    assert tls.master_kwargs["db"] == 0


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://h:1", "no master name"),
        ("redis+sentinel://h:1/", "no master name"),
        ("redis+sentinel://h:1/m/x", "database 'x': expected a number"),
        ("redis+sentinel://h:1/m/0/9", "no master name"),
        ("redis+sentinel://h:99999/m", "sentinel 'h:99999': expected HOST:PORT"),
        ("redis+sentinel://:pw@h:1,,h:2/m", "sentinel '': expected HOST:PORT"),
        ("redis+sentinel://[2001:db8::1/m", "expected"),
    ],
)
def test_bad_sentinel_urls_are_one_line_without_the_password(url: str, why: str):
    with pytest.raises(MtdError) as err:
        bus.connect(config(url.replace("//", "//u:hunter2@", 1) if "@" not in url else url))
    text = str(err.value)
    assert why in text and "hunter2" not in text and "pw@" not in text and "\n" not in text


def test_sentinel_keys_become_the_url_form():
    url = bus.sentinel_url("rediss://:pw@ignored:6379/2?ssl_cert_reqs=none", ["a:1", "b:2"], "m")
    assert url == "rediss+sentinel://:pw@a:1,b:2/m/2?ssl_cert_reqs=none"
    assert bus.sentinel_url("redis://127.0.0.1:6379/0", ["a:1"], "m") == "redis+sentinel://a:1/m/0"
    with pytest.raises(MtdError, match=r"expected redis\.master_name too"):
        bus.sentinel_url("redis://h/0", ["a:1"], "")
    with pytest.raises(MtdError, match=r"redis\.sentinels: sentinel 'a:b'"):
        bus.sentinel_url("redis://h/0", ["a:b"], "m")


def test_passwords_never_shown_in_sentinel_urls_or_queries():
    assert redact("redis+sentinel://u:pw@a:1,[::1]:2/m/0") == "redis+sentinel://***@a:1,[::1]:2/m/0"
    assert (
        redact("redis+sentinel://a:1/m?sentinel_password=x%26y&ssl_cert_reqs=none")
        == "redis+sentinel://a:1/m?sentinel_password=***&ssl_cert_reqs=none"
    )
    cfg = config("rediss+sentinel://u:pw@a:1/m?sentinel_username=s&sentinel_password=pw2")
    assert "pw" not in cfg.where and "pw" not in repr(cfg)
    assert not cfg.local and config("redis+sentinel://127.0.0.1:1,[::1]:2/m").local


def test_state_validation_of_the_new_keys(tmp_path: Path):
    from reconciler.adapters import files

    state = write_state(
        tmp_path / "s.yaml",
        redis={"sentinels": ["192.0.2.7:26379"], "master_name": "fleet", "heartbeat_ttl": 2},
    )
    cfg = bus.BusConfig.from_state(files.load_state(state))
    assert cfg.url == "redis+sentinel://192.0.2.7:26379/fleet/0" and cfg.sentinel
    assert (cfg.pull_channel, cfg.heartbeat_key, cfg.heartbeat_ttl) == ("mtd:pull", "mtd:hosts", 2)
    bad = write_state(tmp_path / "b.yaml", redis={"heartbeat_ttl": 0})
    out = mtd("-s", str(bad), "validate")
    assert out.returncode == 1 and "redis.heartbeat_ttl" in out.stderr
    for redis, why in (
        ({"pull_channel": "mtd:rotate"}, "expected a channel other than redis.channel"),
        ({"heartbeat_key": "mtd:epoch:last"}, "expected a key apart from redis.epoch_key"),
        ({"heartbeat_key": "mtd"}, "expected a key apart from redis.epoch_key"),
    ):
        bad = write_state(tmp_path / "b.yaml", redis=redis)
        with pytest.raises(MtdError, match=why):
            bus.BusConfig.from_state(files.load_state(bad))
    url = "redis+sentinel://127.0.0.1:1/m/0?socket_timeout=9&client_name=x"
    client = bus.connect(config(url))  # the URL's options win, no clash with mtd's
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 9.0
    client.close()


# -- pull notices ---------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [False, True])
def test_pull_notice_round_trip(signed: bool):
    cfg = config(signed=signed)
    assert bus.decode_pull(bus.encode_pull(cfg, "mtd:pull", 12.5), cfg, "mtd:pull", 12.5) == 12.5


@pytest.mark.parametrize("signed", [False, True])
def test_pull_notices_carry_an_age_limit(signed: bool):
    """Like watch messages: a notice kept and sent again after a restart (when the list of
    those seen is empty) is refused, as is one from a clock far ahead."""
    cfg = config(signed=signed)
    notice = bus.encode_pull(cfg, "mtd:pull", 1000.0)
    for now in (1000.0 + bus.WATCH_MAX_AGE + 1, 1000.0 - bus.WATCH_MAX_AGE - 1):
        with pytest.raises(bus.BadMessage, match="expected within 300 s") as exc:
            bus.decode_pull(notice, cfg, "mtd:pull", now)
        assert exc.value.kind == "stale"
    assert bus.decode_pull(notice, cfg, "mtd:pull", 1000.0 + bus.WATCH_MAX_AGE) == 1000.0


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"pull", "not JSON"),
        (b'{"time": 1, "repo": "http://evil"}', "unknown key 'repo'"),
        (b'{"time": 1, "commit": "0d9c48f"}', "unknown key 'commit'"),
        (b'{"time": -1}', "time -1"),
        (b'{"time": NaN}', "not JSON"),
        (b"[]", "expected a JSON object"),
        (b"x" * 300, "300 bytes"),
    ],
)
def test_bad_pull_notices_are_one_line(data: bytes, why: str):
    with pytest.raises(bus.BadMessage, match=why):
        bus.decode_pull(data, config(), "mtd:pull")


def test_signed_pull_notices_must_carry_the_right_signature():
    cfg = config(signed=True)
    with pytest.raises(bus.BadMessage, match="unsigned"):
        bus.decode_pull(b'{"time": 5}', cfg, "mtd:pull")
    other = bus.encode_pull(cfg, "other:pull", 5.0)  # another fleet's notice
    with pytest.raises(bus.BadMessage, match="bad signature"):
        bus.decode_pull(other, cfg, "mtd:pull")
    rotation = json.loads(bus.encode(cfg, 5, 5.0))  # a trigger's signature is not a pull's
    with pytest.raises(bus.BadMessage, match="bad signature"):
        bus.decode_pull(json.dumps({"time": 5.0, "sig": rotation["sig"]}), cfg, "mtd:pull")


@given(st.binary(max_size=300))
def test_any_bytes_are_a_pull_notice_or_a_bad_message(data: bytes):
    try:
        bus.decode_pull(data, config(signed=True), "mtd:pull")
    except bus.BadMessage as exc:
        assert "\n" not in str(exc)


# -- heartbeat records and the status they give ---------------------------------------------


def record(host: str = "web1", **kw: Any) -> bytes:
    rec = {
        "host": host, "epoch": 7, "fleet_epoch": 7, "commit": "0d9c48f64d98aa", "head": None,
        "pull_rejected": False, "in_sync": True, "result": "ok", "error": None,
        "version": "0.1.0", "time": 1000.0,
    } | kw  # fmt: skip
    return json.dumps(rec).encode()


def test_status_classifies_each_host():
    last = {
        "a": record("a"),
        "b": record("b", result="changed"),
        "c": record("c", epoch=6),
        "d": record("d", in_sync=False),
        "e": record("e", result="error", error="secret file has mode 0644"),
        "f": record("f", pull_rejected=True),
        "g": record("g"),
    }
    live = dict(last) | {"g": None}
    rows = fleet.classify(last, live, 7)
    assert [(r.host, r.status) for r in rows] == [
        ("a", "ok"), ("b", "changed"), ("c", "behind"), ("d", "behind"),
        ("e", "rejected"), ("f", "rejected"), ("g", "silent"),
    ]  # fmt: skip
    assert fleet.recap(rows) == {
        "ok": 1, "changed": 1, "behind": 2, "rejected": 2, "silent": 1, "stopped": 0
    }  # fmt: skip
    assert not fleet.converged(rows) and fleet.converged(rows[:2]) and not fleet.converged([])
    text = fleet.table(rows, 7, now=1003.0)
    assert text[0].split()[:4] == ["HOST", "STATUS", "EPOCH", "COMMIT"]
    assert text[1].split()[:6] == ["a", "ok", "7", "0d9c48f64d98", "ok", "3s"]
    assert "last pass failed: secret file has mode 0644" in text[5]
    assert text[-1] == (
        "recap: ok=1 changed=1 behind=2 rejected=2 silent=1 stopped=0 (fleet epoch 7, 7 hosts)"
    )


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"garbage", "not JSON"),
        (b"[1]", "expected a JSON object"),
        (record(epoch="7"), "epoch '7': expected an integer >= 0"),
        (record(epoch=-1), "epoch -1"),
        (record(in_sync=1), "in_sync 1: expected true or false"),
        (record(host="other"), "record names host 'other'"),
        (b"{" + b" " * 5000 + b"}", "5002 bytes"),
        # No float holds it: `now - time` raised OverflowError out of `mtd fleet status`.
        (record(time=10**400), "expected unix seconds"),
        (record(time=float("nan")), "time nan: expected unix seconds"),  # invalid in --json
        (record(time=float("inf")), "time inf"),
    ],
)
def test_hostile_records_are_shown_invalid_never_trusted(raw: bytes, why: str):
    rows = fleet.classify({"web1": raw}, {"web1": raw}, 7)
    assert rows[0].status == "invalid" and why in rows[0].why
    assert not fleet.converged(rows)
    assert fleet.recap(rows)["invalid"] == 1


def test_terminal_escapes_in_records_are_neutralised():
    host = "web\x1b[2J\n1"
    raw = record(host, error="boom\x1b]0;owned\x07\nfake: line")
    rows = fleet.classify({host: raw}, {host: raw}, 7)
    lines = fleet.table(rows, 7, time.time())
    assert len(lines) == 3 and all(c.isprintable() for line in lines for c in line)


# -- against real Redis on loopback ----------------------------------------------------------


class PullSink:
    """A Sink with `--pull`: remembers pull notices and serves a heartbeat record."""

    pulls = True

    def __init__(self, host: str = "web1") -> None:
        self.host = host
        self.notices: list[str] = []
        self.ups: list[bool] = []
        self.outcomes: list[str] = []
        self.known = 0

    def known_epoch(self) -> int:
        return self.known

    def applied_epoch(self) -> int:
        return self.known

    def trigger(self, trigger: bus.Trigger) -> None:
        self.known = max(self.known, trigger.epoch)

    def connection(self, up: bool) -> None:
        self.ups.append(up)

    def ignored(self, outcome: str) -> None:
        self.outcomes.append(outcome)

    def pull_ignored(self) -> None:
        self.outcomes.append("pull rejected")

    def pull_now(self, reason: str) -> None:
        self.notices.append(reason)

    def heartbeat(self) -> dict[str, Any]:
        return json.loads(record(self.host, epoch=self.known, fleet_epoch=self.known)) | {
            "time": time.time()
        }


def wait(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as r:
        yield r


@needs_redis
def test_pull_notices_and_heartbeats_through_redis(server: RedisServer, tmp_path: Path, caplog):
    cfg = config(server.url, signed=True, heartbeat_ttl=0.6)
    sink = PullSink()
    sub = subscriber.Subscriber(cfg, sink)
    sub.start()
    try:
        wait(lambda: sink.ups == [True])
        wait(lambda: server.cli("EXISTS", "mtd:hosts:web1") == "1")
        assert json.loads(server.cli("HGET", "mtd:hosts", "web1"))["host"] == "web1"
        assert 0 < int(server.cli("PTTL", "mtd:hosts:web1")) <= 600

        assert bus.publish_pull(cfg) == 1
        wait(lambda: sink.notices == ["notice"])
        replayed = bus.encode_pull(cfg, "mtd:pull", round(time.time(), 6)).decode()
        server.cli("PUBLISH", "mtd:pull", replayed)
        server.cli("PUBLISH", "mtd:pull", replayed)  # a replay: ignored
        for _ in range(20):  # a flood of garbage: ignored, and not logged line by line
            server.cli("PUBLISH", "mtd:pull", '{"time": 1}')
        wait(lambda: len(sink.outcomes) == 21)
        assert sink.notices == ["notice", "notice"]
        lines = [r for r in caplog.records if "pull notice on mtd:pull ignored" in r.getMessage()]
        assert len(lines) == 5 and "already received" in lines[0].getMessage()  # then counted

        # fleet status reads what the subscriber keeps fresh; a stopped one turns silent.
        last, live = bus.read_heartbeats(bus.connect(cfg), cfg)
        assert list(last) == ["web1"] and live["web1"] is not None
    finally:
        sub.stop()
    assert "16 more pull notices on mtd:pull ignored" in caplog.text  # the flood, summarised
    wait(lambda: server.cli("EXISTS", "mtd:hosts:web1") == "0", timeout=5)
    last, live = bus.read_heartbeats(bus.connect(cfg), cfg)
    assert fleet.classify(last, live, 0)[0].status == "silent"


@needs_redis
def test_fleet_status_cli(server: RedisServer, tmp_path: Path):
    state = write_state(tmp_path / "s.yaml", redis={"url": server.url})
    out = mtd("-s", str(state), "fleet", "status")
    assert out.returncode == 2 and out.stdout.startswith("no host has reported in mtd:hosts")
    server.cli("SET", "mtd:epoch", "7")
    for host, extra in (("web1", {}), ("web2", {"epoch": 6})):
        raw = record(host, time=time.time(), **extra).decode()
        server.cli("HSET", "mtd:hosts", host, raw)
        server.cli("SET", f"mtd:hosts:{host}", raw, "EX", "60")
    out = mtd("-s", str(state), "fleet", "status", "--json")
    assert out.returncode == 2, out.stderr
    doc = json.loads(out.stdout)
    assert doc["recap"] == {
        "ok": 1, "changed": 0, "behind": 1, "rejected": 0, "silent": 0, "stopped": 0
    }  # fmt: skip
    assert [h["status"] for h in doc["hosts"]] == ["ok", "behind"] and not doc["converged"]
    out = mtd("-s", str(state), "fleet", "status", "--forget", "web2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].startswith("recap: ok=1 changed=0 behind=0")
    out = mtd("-s", str(state), "fleet", "status", "--forget", "web9")
    assert out.returncode == 1 and "--forget 'web9': no such host" in out.stderr
    out = mtd("-s", str(state), "pull", "--notify")
    assert out.returncode == 0 and "pull notice published on mtd:pull" in out.stdout
    out = mtd("-s", str(state), "pull")
    assert out.returncode == 1 and out.stderr.startswith("mtd: error: --repo: expected")


def test_fleet_status_without_redis_is_one_line(tmp_path: Path):
    url = f"redis://:hunter2@127.0.0.1:{RedisServer(tmp_path).port}/0"
    state = write_state(tmp_path / "s.yaml", redis={"url": url})
    for args in (["fleet", "status"], ["fleet", "pull"]):
        out = mtd("-s", str(state), *args)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "hunter2" not in out.stderr and "***" in out.stderr


@needs_redis
def test_a_sentinel_failover_loses_no_acknowledged_rotation(tmp_path: Path):
    """Loopback only: master, replica, three Sentinels; a subscriber and a publisher follow
    the failover by themselves, and the epoch never goes backwards."""
    master = RedisServer(tmp_path / "m").start()
    procs: list[RedisServer] = [master]
    try:
        replica = RedisServer(tmp_path / "r", replica_of=master).start()
        procs.append(replica)
        replica.wait_synced()
        sentinels = [RedisSentinel(tmp_path / f"s{i}", master).start() for i in range(3)]
        procs += sentinels
        cfg = config(sentinel_url(sentinels), reconnect_max=0.3)
        sink = PullSink()
        sub = subscriber.Subscriber(cfg, sink)
        sub.start()
        try:
            wait(lambda: sink.ups == [True])
            first = bus.publish_rotation(cfg)
            assert first.replicas == 1
            wait(lambda: sink.known == first.epoch)
            master.stop()
            after = bus.publish_rotation(cfg)  # retried until the replica is promoted
            assert after.epoch == first.epoch + 1
            wait(lambda: sink.known == after.epoch, timeout=20)
            assert sentinels[0].master_address() == (replica.host, replica.port)
            assert sink.ups[:2] == [True, False] and sink.ups[-1] is True
        finally:
            sub.stop()
    finally:
        for p in procs:
            p.stop()
    assert not any(t.name == "mtd-redis" and t.is_alive() for t in threading.enumerate())
    assert not subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout


def test_a_bad_redis_url_in_the_state_never_shows_its_password(tmp_path: Path):
    for url, validated in (
        ("ftp://:hunter2@db/0", True),  # the schema refuses it
        ("redis+sentinel://u:hunter2@[2001:db8::1/m", False),  # refused when connecting
    ):
        state = write_state(tmp_path / "s.yaml", redis={"url": url})
        commands = [["fleet", "status"], ["rotate", "--publish"]] + [["validate"]] * validated
        for args in commands:
            out = mtd("-s", str(state), *args)
            assert out.returncode == 1 and "hunter2" not in out.stdout + out.stderr, out.stderr
            assert "***" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@needs_redis
def test_forced_reconnects_ask_for_one_pull_a_pull_interval(server: RedisServer):
    """Anyone who can publish can make Redis drop the subscribers (one message over the
    pub/sub output buffer): a reconnect asks for a pull (a notice may have been missed),
    but a burst of them asks once."""
    cfg = config(server.url)
    sink = PullSink()
    sub = subscriber.Subscriber(cfg, sink)
    sub.start()
    try:
        wait(lambda: sink.ups == [True])
        server.cli("CONFIG", "SET", "client-output-buffer-limit", "pubsub 1mb 1mb 0")
        c = bus.connect(cfg)
        for n in range(3):
            c.publish("mtd:rotate", b"x" * (2 << 20))
            wait(lambda n=n: sink.ups.count(True) == n + 2)
        c.close()
        assert sink.notices == ["reconnect"]
    finally:
        sub.stop()
