"""The Redis bus: message format and signing (pure), then against a real redis-server on
loopback (Redis only: nothing here loads rules)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from reconciler.adapters import bus, subscriber
from reconciler.cli.fleet import parse_every
from reconciler.errors import MtdError
from reconciler.services.daemon import parse_address
from tests.conftest import mtd, write_state
from tests.redis_fixtures import RedisServer, needs_redis, redis_server

KEY = b"k" * 32


def config(signed: bool = False, url: str = "redis://127.0.0.1:1/0", **kw) -> bus.BusConfig:
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
        **kw,
    )


# -- message format -----------------------------------------------------------------------


@pytest.mark.parametrize("signed", [False, True])
def test_encode_decode_round_trip(signed: bool):
    cfg = config(signed)
    trigger = bus.decode(bus.encode(cfg, 7, 1714564800.123456), cfg)
    assert trigger == bus.Trigger(7, 1714564800.123456, "message")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"rotate", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"x" * 257, "257 bytes: expected at most 256"),
        (b"[1, 2]", "expected a JSON object"),
        (b"5", "expected a JSON object"),
        (b'{"epoch": 5, "time": 1, "cmd": "rm -rf /"}', "unknown key 'cmd'"),
        (b'{"time": 1}', "epoch None: expected an integer"),
        (b'{"epoch": 0, "time": 1}', "epoch 0: expected an integer from 1"),
        (b'{"epoch": -3, "time": 1}', "epoch -3"),
        (b'{"epoch": "5", "time": 1}', "epoch '5'"),
        (b'{"epoch": true, "time": 1}', "epoch True"),
        (b'{"epoch": 1.5, "time": 1}', "epoch 1.5"),
        (b'{"epoch": 9007199254740992, "time": 1}', "epoch 9007199254740992"),
        (b'{"epoch": 5}', "time None: expected the publish time"),
        (b'{"epoch": 5, "time": "now"}', "time 'now'"),
        (b'{"epoch": 5, "time": NaN}', "not JSON"),
        (b'{"epoch": 5, "time": -1}', "time -1"),
        # No float holds it: isfinite raised OverflowError, out of every decoder.
        (b'{"epoch": 5, "time": 1' + b"0" * 200 + b"}", "time 1000"),  # past the bound
        (b'{"epoch": 5, "time": 1e300}', "time 1e+300"),
    ],
)
def test_bad_messages_are_one_line_errors(data: bytes, why: str):
    with pytest.raises(bus.BadMessage) as err:
        bus.decode(data, config())
    assert why in str(err.value)
    assert "\n" not in str(err.value)


def test_signed_messages_must_carry_the_right_signature():
    cfg = config(signed=True)
    good = json.loads(bus.encode(cfg, 5, 100.0))
    cases = {
        "unsigned": {"epoch": 5, "time": 100.0},
        "bad signature": good | {"sig": "00" * 32},
        "bad signature ": good | {"sig": 12},
        "bad signature  ": good | {"epoch": 6},  # epoch changed after signing
        "bad signature   ": good | {"time": 101.0},
    }
    for why, msg in cases.items():
        with pytest.raises(bus.BadMessage, match=why.strip()):
            bus.decode(json.dumps(msg).encode(), cfg)
    other_channel = bus.BusConfig(**{**cfg.__dict__, "channel": "other"})
    with pytest.raises(bus.BadMessage, match="bad signature"):
        bus.decode(bus.encode(cfg, 5, 100.0), other_channel)
    other_key = bus.BusConfig(**{**cfg.__dict__, "signing_key": b"o" * 32})
    with pytest.raises(bus.BadMessage, match="bad signature"):
        bus.decode(bus.encode(cfg, 5, 100.0), other_key)
    assert bus.decode(json.dumps(good).encode(), cfg).epoch == 5


@pytest.mark.parametrize("sig", ["\x8a", "é" * 20, "\ud800", "0" * 63 + "\u0660"])
def test_a_non_ascii_signature_is_a_bad_message_not_a_crash(sig: str):
    """hmac.compare_digest raises TypeError on non-ASCII text: one such message used to end
    the subscriber's connection (an internal error, a reconnect and its backoff), so a flood
    of them kept every daemon of the fleet away from its triggers."""
    cfg = config(signed=True)
    msg = json.loads(bus.encode(cfg, 5, 100.0)) | {"sig": sig}
    with pytest.raises(bus.BadMessage, match="bad signature"):
        bus.decode(json.dumps(msg).encode(), cfg)


@given(st.binary(max_size=300))
def test_any_bytes_are_a_trigger_or_a_bad_message(data: bytes):
    try:
        trigger = bus.decode(data, config())
    except bus.BadMessage as exc:
        assert "\n" not in str(exc)
    else:
        assert 1 <= trigger.epoch <= bus.MAX_EPOCH


@given(
    st.dictionaries(
        st.sampled_from(["epoch", "time", "sig", "x"]),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    )
)
def test_any_json_object_is_a_trigger_or_a_bad_message(msg: dict):
    try:
        bus.decode(json.dumps(msg).encode(), config(signed=True))
    except bus.BadMessage:
        pass
    else:
        raise AssertionError(f"accepted a message signed without the key: {msg}")


def test_signing_key_file_rules(tmp_path: Path):
    key = tmp_path / "key"
    with pytest.raises(MtdError, match="no such signing key file"):
        bus.read_signing_key(key)
    key.write_bytes(b"0123456789abcdef0123\n")
    key.chmod(0o644)
    with pytest.raises(MtdError, match="mode 0644: expected 0600"):
        bus.read_signing_key(key)
    key.chmod(0o600)
    assert bus.read_signing_key(key) == b"0123456789abcdef0123"
    key.write_bytes(b"short\n")
    with pytest.raises(MtdError, match="holds 5 bytes: expected at least 16"):
        bus.read_signing_key(key)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@db:6379/0", "redis://***@db:6379/0"),
        ("redis://mtd:hunter2@db/1", "redis://***@db/1"),
        ("redis://mtd:hun@ter2@db/1", "redis://***@db/1"),
        ("redis://mtd:hun/te?r#2@db/1", "redis://***@db/1"),
        ("rediss://:hunter2@db:6380/0", "rediss://***@db:6380/0"),
        ("redis://db:6379/0?password=hunter2", "redis://db:6379/0?password=***"),
        ("redis://db/0?db=1&password=hunter2&x=1", "redis://db/0?db=1&password=***&x=1"),
        ("unix://:hunter2@/run/redis.sock?db=0", "unix://***@/run/redis.sock?db=0"),
        ("unix:///run/redis.sock?password=hunter2", "unix:///run/redis.sock?password=***"),
        ("https://bob:hunter2@git.example.invalid/x", "https://***@git.example.invalid/x"),
        ("https://bob:hun@ter2@git.example.invalid/x", "https://***@git.example.invalid/x"),
        ("redis://db:6379/0", "redis://db:6379/0"),
    ],
)
def test_passwords_never_shown(url: str, shown: str):
    """One redact for Redis and git URLs, also inside a longer text."""
    assert bus.redact(url) == shown
    assert bus.redact(f"fatal: '{url}': refused") == f"fatal: '{shown}': refused"
    assert bus.BusConfig(url=url, channel="c", epoch_key="k").where == shown


def test_reconnect_backoff_grows_and_is_capped():
    sub = subscriber.Subscriber(config(reconnect_min=0.1, reconnect_max=2.0), sink=None)  # type: ignore[arg-type]
    delays = [sub.delay(n) for n in range(1, 12)]
    assert all(0 < d <= 2.0 for d in delays)
    assert delays[0] <= 0.1 and max(delays[-3:]) >= 1.0


def test_option_parsers():
    assert parse_every("30..90") == (30.0, 90.0)
    assert parse_every("5") == (5.0, 5.0)
    assert parse_address("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_address("[::1]:9108") == ("::1", 9108)
    assert parse_address(":9108") == ("::", 9108)
    for bad in ("90..30", "-1..2", "x", "1..inf"):
        with pytest.raises(MtdError, match=r"expected L\.\.U seconds"):
            parse_every(bad)
    for bad in ("9108", "host:", "host:99999", "host:http"):
        with pytest.raises(MtdError, match="expected ADDR:PORT"):
            parse_address(bad)


# -- against a real redis-server -----------------------------------------------------------


class Recorder:
    """A Sink that remembers what the subscriber reported."""

    def __init__(self, known: int = 0) -> None:
        self.known = known  # a recorder applies what it hears at once
        self.triggers: list[bus.Trigger] = []
        self.ups: list[bool] = []
        self.outcomes: list[str] = []
        self.changed = threading.Condition()

    def known_epoch(self) -> int:
        return self.known

    def applied_epoch(self) -> int:
        return self.known

    def trigger(self, trigger: bus.Trigger) -> None:
        with self.changed:
            self.known = max(self.known, trigger.epoch)
            self.triggers.append(trigger)
            self.changed.notify_all()

    def connection(self, up: bool) -> None:
        with self.changed:
            self.ups.append(up)
            self.changed.notify_all()

    def ignored(self, outcome: str) -> None:
        with self.changed:
            self.outcomes.append(outcome)
            self.changed.notify_all()

    def wait(self, pred, timeout: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(pred, timeout), f"timed out: {self.__dict__}"


@pytest.fixture
def server(tmp_path: Path):
    with redis_server(tmp_path / "redis") as r:
        yield r


def client(r: RedisServer) -> redis.Redis:
    return redis.Redis(host=r.host, port=r.port, socket_timeout=5)


@needs_redis
@pytest.mark.parametrize("signed", [False, True])
def test_publish_increments_and_publishes(server: RedisServer, signed: bool):
    cfg = config(signed, url=server.url)
    c = client(server)
    ps = c.pubsub(ignore_subscribe_messages=True)
    ps.subscribe(cfg.channel)
    ps.get_message(timeout=1)
    first = bus.publish_rotation(cfg)
    second = bus.publish_rotation(cfg)
    assert (first.epoch, second.epoch, first.receivers) == (1, 2, 1)
    got = [ps.get_message(timeout=2) for _ in range(2)]
    assert [bus.decode(m["data"], cfg).epoch for m in got] == [1, 2]
    assert abs(bus.decode(got[1]["data"], cfg).published - time.time()) < 5
    assert c.get(cfg.epoch_key) == b"2"
    assert bus.read_epoch(c, cfg) == 2
    ps.close()


@needs_redis
def test_concurrent_publishers_never_share_an_epoch(server: RedisServer):
    cfg = config(url=server.url)
    epochs: list[int] = []

    def publish() -> None:
        for _ in range(10):
            epochs.append(bus.publish_rotation(cfg).epoch)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(epochs) == list(range(1, 41))


@needs_redis
def test_put_back_only_ever_raises_the_epoch(server: RedisServer):
    cfg = config(signed=True, url=server.url)
    c = client(server)
    assert bus.read_epoch(c, cfg) == 0
    assert bus.put_back(c, cfg, 4) is True  # key missing (Redis lost it): put back
    assert c.get(cfg.epoch_key) == b"4" and bus.read_epoch(c, cfg) == 4
    assert bus.put_back(c, cfg, 3) is False  # never lowered
    assert bus.put_back(c, cfg, 4) is False
    assert bus.read_epoch(c, cfg) == 4
    assert bus.publish_rotation(cfg).epoch == 5  # the next trigger moves everyone forward
    c.set(cfg.epoch_key, 99)  # set by hand, unsigned: not trusted when signing is on
    assert bus.read_epoch(c, cfg) == 5
    c.set(cfg.last_key, b'{"epoch": 99, "time": 1}')
    with pytest.raises(bus.BadMessage, match="unsigned"):
        bus.read_epoch(c, cfg)
    c.set(cfg.epoch_key, "garbage")
    with pytest.raises(MtdError, match="expected an integer"):
        bus.put_back(c, cfg, 100)
    unsigned = config(url=server.url)
    with pytest.raises(MtdError, match="mtd:epoch holds b'garbage': expected an integer"):
        bus.publish_rotation(unsigned)
    # Signed, the publisher trusts only the signed last trigger: a garbled key or a forged
    # last trigger cannot stop rotations (daemons ahead of it put their epoch back).
    assert bus.publish_rotation(cfg).epoch == 1


@needs_redis
def test_publish_to_an_unreachable_redis_is_one_line(tmp_path: Path):
    cfg = config(url=f"redis://:hunter2@127.0.0.1:{RedisServer(tmp_path).port}/0")
    with pytest.raises(MtdError) as err:
        bus.publish_rotation(cfg)
    text = str(err.value)
    assert text.startswith("redis://***@127.0.0.1:") and "cannot publish" in text
    assert "hunter2" not in text and "\n" not in text


@needs_redis
def test_subscriber_follows_through_outages(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="mtd")
    r = RedisServer(tmp_path / "redis")
    cfg = config(url=r.url)
    sink = Recorder(known=3)
    sub = subscriber.Subscriber(cfg, sink)
    try:
        r.start()
        sub.start()
        sink.wait(lambda: sink.ups == [True])
        # Redis held no epoch: the host's is put back, so the next trigger is 4 for all.
        assert r.cli("GET", "mtd:epoch") == "3"
        bus.publish_rotation(cfg)
        sink.wait(lambda: [t.epoch for t in sink.triggers] == [4])
        assert sink.triggers[0].origin == "message"

        r.cli("PUBLISH", "mtd:rotate", "rotate now")
        r.cli("PUBLISH", "mtd:rotate", r.cli("GET", "mtd:epoch:last"))  # a duplicate
        sink.wait(lambda: sink.outcomes == ["rejected", "stale"])
        deadline = time.monotonic() + 5  # the sink hears of a message before its log line
        while "epoch 4 is not newer than epoch 4" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.01)
        assert "trigger on mtd:rotate ignored: b'rotate now': not JSON" in caplog.text

        r.stop()  # Redis goes away (and forgets everything: no persistence)
        sink.wait(lambda: sink.ups == [True, False])
        time.sleep(0.5)  # a few failed reconnects
        r.start()
        sink.wait(lambda: sink.ups == [True, False, True])
        time.sleep(0.3)
        assert r.cli("GET", "mtd:epoch") == "4"  # put back again

        # Moved while the subscriber was not listening (no message): caught up by reading.
        r.cli("SET", "mtd:epoch", "9")
        sink.wait(lambda: sink.known == 9)
        assert sink.triggers[-1] == bus.Trigger(9, None, "catch-up")
        assert [t.epoch for t in sink.triggers] == [4, 9]  # nothing applied twice
        assert "connection lost" in caplog.text and "put back epoch 4" in caplog.text
    finally:
        sub.stop()
        r.stop()
    assert not any(t.name == "mtd-redis" and t.is_alive() for t in threading.enumerate())


# -- the root-free CLI side ------------------------------------------------------------------


@needs_redis
def test_cli_publish_and_trigger(server: RedisServer, tmp_path: Path):
    state = write_state(tmp_path / "state.yaml", redis={"url": server.url})
    out = mtd("-s", str(state), "rotate", "--publish")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"published: epoch 1 on mtd:rotate at {server.url} (0 subscribers)"
    out = mtd("-s", str(state), "trigger", "--every", "0..0.01", "--count", "3")
    assert out.returncode == 0, out.stderr
    assert [line.split()[2] for line in out.stdout.splitlines()] == ["2", "3", "4"]
    out = mtd("-s", str(state), "trigger", "--count", "2")  # N rotations now, no waiting
    assert out.returncode == 0, out.stderr
    assert [line.split()[2] for line in out.stdout.splitlines()] == ["5", "6"]
    assert not (tmp_path / "secret").exists()  # publishing needs no secret, no root, no nft


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rotate", "--publish", "--check"], "--publish: expected no --check or --diff"),
        (["trigger", "--every", "9..1"], "--every '9..1': expected L..U seconds"),
    ],
)
def test_cli_usage_errors(state_file: Path, args: list[str], message: str):
    out = mtd("-s", str(state_file), *args)
    assert out.returncode == 1
    assert out.stderr.startswith(f"mtd: error: {message}")
    assert len(out.stderr.splitlines()) == 1


def test_cli_signing_key_problems_are_one_line(tmp_path: Path):
    key = tmp_path / "key"
    state = write_state(
        tmp_path / "s.yaml", redis={"url": "redis://127.0.0.1:1/0", "signing_key_file": str(key)}
    )
    out = mtd("-s", str(state), "rotate", "--publish")
    assert out.returncode == 1
    assert out.stderr.startswith(f"mtd: error: {key}: no such signing key file")
    key.write_text("0123456789abcdef0123456789abcdef")
    key.chmod(0o640)
    out = mtd("-s", str(state), "rotate", "--publish")
    assert out.stderr.strip() == (
        f"mtd: error: {key}: signing key file has mode 0640: expected 0600 (run: chmod 600 {key})"
    )


def test_cli_publish_without_a_redis_url_is_one_line(state_file: Path):
    out = mtd("-s", str(state_file), "trigger")
    assert out.returncode == 1
    assert out.stderr.startswith("mtd: error: redis.url: not set: expected the fleet's Redis")


def test_cli_publish_without_redis_is_one_line(tmp_path: Path):
    url = f"redis://127.0.0.1:{RedisServer(tmp_path).port}/0"
    state = write_state(tmp_path / "s.yaml", redis={"url": url})
    out = mtd("-s", str(state), "rotate", "--publish")
    assert out.returncode == 1
    assert out.stderr.startswith(f"mtd: error: {url}: cannot publish a rotation: ")
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_time_no_float_holds_is_a_bad_message_in_every_decoder():
    """Rotations, pull notices and watch orders share the time check; a stored copy (the
    signed :last, the watch hash) is decoded by the same functions."""
    cfg = bus.BusConfig(**{**config().__dict__, "max_message_bytes": 1024})  # the default
    huge = "1" + "0" * 400  # past float's range, and 420 bytes: under the default limit
    for decode, text in [
        (lambda d: bus.decode(d, cfg), f'{{"epoch": 5, "time": {huge}}}'),
        (lambda d: bus.decode_pull(d, cfg, "mtd:pull"), f'{{"time": {huge}}}'),
        (
            lambda d: bus.decode_watch(d, cfg),
            f'{{"watch": "add", "source": "192.0.2.7", "for": 60, "time": {huge}}}',
        ),
    ]:
        with pytest.raises(bus.BadMessage, match="expected the publish time"):
            decode(text.encode())


@pytest.mark.parametrize(
    ("published", "kept"),
    [(1, False), (NOW_LATENCY := 1_800_000_000.0, True), (NOW_LATENCY - 299, True),
     (NOW_LATENCY - 301, False), (NOW_LATENCY + 1.5, True), (NOW_LATENCY + 3, False)],
)  # fmt: skip
def test_a_latency_is_measured_only_from_a_plausible_publish_time(published: float, kept: bool):
    """`"time": 1` is still a trigger (its epoch counts), but 57 years of "latency" must
    not reach mtd_trigger_to_applied_seconds: the time is dropped, not the trigger."""
    for signed in (False, True):
        cfg = config(signed=signed)
        data = bus.encode(cfg, 5, published)
        trigger = bus.decode_message(data, cfg, now=NOW_LATENCY)
        assert trigger.epoch == 5 and trigger.published == (float(published) if kept else None)
