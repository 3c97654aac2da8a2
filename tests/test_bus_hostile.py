"""Hostile Redis: whoever can publish on the channel or write the keys is untrusted.

Each case asserts the outcome: rejected with a bounded number of log lines, the subscriber
(and in a lab namespace the daemon) still applying the next good trigger, the epoch never
beyond the bound, and no password in any output. Redis is a real redis-server, on a unix
socket with a password where the URL form matters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from reconciler.adapters import bus, files, subscriber
from reconciler.core.shuffle import MAX_EPOCH
from reconciler.errors import MtdError
from reconciler.lab.netns import Lab, free_port
from tests.conftest import MTD, ROOT, log_events, mtd, write_state
from tests.redis_fixtures import needs_redis
from tests.test_bus import Recorder, config

pytestmark = needs_redis

PASSWORD = "Hunter2@pw?x#y"  # with the characters that broke masking
QUOTED = quote(PASSWORD, safe="")
STEP = 1000


class UnixRedis:
    """redis-server on a unix socket only (no TCP), with a password. A unix socket is a
    file: daemons in lab namespaces reach it too."""

    def __init__(self, workdir: Path, tls: Path | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.sock = workdir / "redis.sock"
        self.tls_port = free_port() if tls else None
        argv = [
            "redis-server",
            "--port", "0",
            "--unixsocket", str(self.sock),
            "--unixsocketperm", "700",
            "--requirepass", PASSWORD,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
        ]  # fmt: skip
        if tls is not None:
            argv += [
                "--tls-port", str(self.tls_port),
                "--bind", "127.0.0.1",
                "--tls-cert-file", str(tls / "cert.pem"),
                "--tls-key-file", str(tls / "key.pem"),
                "--tls-ca-cert-file", str(tls / "cert.pem"),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.client = redis.Redis(unix_socket_path=str(self.sock), password=PASSWORD)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                if self.client.ping():
                    return
            assert self.proc.poll() is None and time.monotonic() < deadline, "no redis-server"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"unix://:{QUOTED}@{self.sock}?db=0"

    @property
    def query_url(self) -> str:
        return f"unix://{self.sock}?db=0&password={QUOTED}"

    def stop(self) -> None:
        self.client.close()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def unix_redis(workdir: Path, tls: Path | None = None) -> Iterator[UnixRedis]:
    server = UnixRedis(workdir, tls)
    try:
        yield server
    finally:
        server.stop()


def no_password(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and QUOTED not in text and "Hunter2" not in text, text


@contextlib.contextmanager
def subscribed(cfg: bus.BusConfig, sink: Recorder) -> Iterator[subscriber.Subscriber]:
    sub = subscriber.Subscriber(cfg, sink)
    sub.start()
    try:
        sink.wait(lambda: sink.ups == [True])
        yield sub
    finally:
        sub.stop()


def ignored_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "mtd_event", "") in ("rejected", "stale")]


def accounted(records: list[logging.LogRecord]) -> int:
    """Ignored triggers the log tells of: one per full line, `suppressed` per summary."""
    return sum(r.mtd_fields.get("suppressed", 1) for r in records)  # type: ignore[attr-defined]


# -- URLs and credentials ---------------------------------------------------------------------


def test_where_redis_is_decides_the_start_warning():
    local = ["redis://127.0.0.1:6379/0", "redis://[::1]/0", "redis://localhost/0", "unix:///s"]
    remote = [
        "redis://192.0.2.9:6379/0",
        "rediss://:pw@db.example.invalid/0",
        "redis://[2001:db8::1]/0",
    ]
    for url in local + remote:
        assert bus.BusConfig(url=url, channel="c", epoch_key="k").local == (url in local)


def test_unix_socket_urls_with_a_password_work(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="mtd")
    with unix_redis(tmp_path / "r") as r:
        for n, url in enumerate((r.url, r.query_url), 1):
            cfg = config(url=url)
            assert bus.publish_rotation(cfg).epoch == n
            no_password(cfg.where, repr(cfg))
        sink = Recorder(known=2)
        with subscribed(config(url=r.url), sink):
            bus.publish_rotation(config(url=r.query_url))
            sink.wait(lambda: [t.epoch for t in sink.triggers] == [3])
        wrong = config(url=f"unix://:{quote('not-it@x')}@{r.sock}")
        with pytest.raises(MtdError) as err:
            bus.publish_rotation(wrong)
        assert "not-it" not in str(err.value) and "cannot publish" in str(err.value)
    no_password(caplog.text)


def test_rediss_urls_work(tmp_path: Path):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(tls / "key.pem"), "-out", str(tls / "cert.pem"),
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with unix_redis(tmp_path / "r", tls=tls) as r:
        url = f"rediss://:{QUOTED}@127.0.0.1:{r.tls_port}/0?ssl_ca_certs={tls / 'cert.pem'}"
        cfg = config(url=url)
        assert bus.publish_rotation(cfg).epoch == 1
        assert r.client.get("mtd:epoch") == b"1"
        no_password(cfg.where)


def test_cli_never_prints_the_password(tmp_path: Path):
    with unix_redis(tmp_path / "r") as r:
        for n, url in enumerate((r.url, r.query_url), 1):
            state = write_state(tmp_path / f"s{n}.yaml", redis={"url": url})
            out = mtd("-s", str(state), "rotate", "--publish")
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith(f"published: epoch {n} on mtd:rotate at unix://")
            no_password(out.stdout, out.stderr)
        bad = write_state(tmp_path / "bad.yaml", redis={"url": r.url.replace(QUOTED, "x%40y")})
        out = mtd("-s", str(bad), "rotate", "--publish")
        assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
        assert "x%40y" not in out.stderr and "x@y" not in out.stderr


# -- hostile messages -------------------------------------------------------------------------

CORPUS = [
    b'{"epoch": 9007199254740991, "time": 1}',  # 2**53-1: froze the fleet before
    b'{"epoch": 1099511627777, "time": 1}',  # MAX_EPOCH + 1
    b'{"epoch": 1e300, "time": 1}',
    b'{"epoch": -1, "time": 1}',
    b'{"epoch": 11.0, "time": 1}',
    b'{"epoch": NaN, "time": 1}',
    b'{"epoch": 11, "time": Infinity}',
    b'{"epoch": 11, "time": 1e999}',
    b'{"epoch": 11, "time": 1' + b"0" * 400 + b"}",  # an int: OverflowError in isfinite
    b'{"epoch": {"epoch": 11}, "time": 1}',
    b'{"epoch": [11], "time": [[[[[[[[1]]]]]]]]}',
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser's recursion limit
    b'{"epoch": 11, "time": 1, "x": "' + b"0" * 2_000_000 + b'"}',  # 2 MB
    b"\xff" * 64,
]
AT_TEN = [  # to a host at epoch 10
    b'{"epoch": 1011, "time": 1}',  # STEP + 1 ahead of the epoch live here
    b'{"epoch": 10, "time": 1}',  # not newer
]


def test_hostile_messages_are_rejected_in_bounded_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="mtd")
    with unix_redis(tmp_path / "r") as r:
        cfg = config(url=r.url, max_epoch_step=STEP, log_window=0.3)
        cfg = bus.BusConfig(**{**cfg.__dict__, "max_message_bytes": 4_000_000})
        sink = Recorder(known=10)
        with subscribed(cfg, sink) as sub:
            for data in CORPUS + AT_TEN:
                r.client.publish(cfg.channel, data)
            garbage = 20_000
            with r.client.pipeline(transaction=False) as pipe:
                for n in range(garbage):
                    pipe.publish(cfg.channel, b"garbage %d" % n)
                pipe.execute()
            total = len(CORPUS) + len(AT_TEN) + garbage
            sink.wait(lambda: len(sink.outcomes) == total, timeout=60)
            assert sink.outcomes.count("stale") == 1
            assert sink.triggers == [] and sink.known == 10

            assert bus.publish_rotation(cfg).epoch == 11  # the next good trigger
            sink.wait(lambda: [t.epoch for t in sink.triggers] == [11])
            assert r.client.get(cfg.epoch_key) == b"11"
            assert sub._thread is not None and sub._thread.is_alive()
        lines = ignored_lines(caplog)
        assert accounted(lines) == total  # every one counted, in few lines
        windows = sum("suppressed" in r.mtd_fields for r in lines)  # type: ignore[attr-defined]
        assert len(lines) <= (subscriber.LOG_BURST + 1) * max(windows, 1) < 200, len(lines)
        summary = next(r for r in lines if "suppressed" in r.mtd_fields)  # type: ignore[attr-defined]
        assert "more triggers on mtd:rotate ignored in" in summary.getMessage()
        assert all("\n" not in r.getMessage() and len(r.getMessage()) < 400 for r in lines)
        reasons = " ".join(r.getMessage() for r in lines)
        assert "expected an integer from 1 to 1099511627776" in reasons
        kinds = set()
        for x in lines:
            f = x.mtd_fields  # type: ignore[attr-defined]
            kinds |= set(f.get("counts", {}))
            kinds |= {f"rejected:{f['kind']}"} if "kind" in f else set()
        assert {"rejected:too far ahead", "rejected:not JSON", "rejected:bad epoch"} <= kinds
    no_password(caplog.text)


def test_signed_triggers_forged_or_replayed(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="mtd")
    with unix_redis(tmp_path / "r") as r:
        cfg = config(signed=True, url=r.url, max_epoch_step=STEP)
        forger = bus.BusConfig(**{**cfg.__dict__, "signing_key": b"f" * 32})
        sink = Recorder(known=10)
        with subscribed(cfg, sink):
            assert bus.publish_rotation(cfg).epoch == 11
            sink.wait(lambda: [t.epoch for t in sink.triggers] == [11])
            good = r.client.get(cfg.last_key)
            assert good is not None
            msg = json.loads(good)
            hostile = [
                good,  # replayed
                json.dumps(msg | {"epoch": 12}).encode(),  # altered after signing
                json.dumps({"epoch": 12, "time": 1}).encode(),  # unsigned
                bus.encode(forger, 12, time.time()),  # signed with another key
                bus.encode(cfg, 11 + STEP + 1, time.time()),  # signed, but too far ahead
            ]
            for data in hostile:
                r.client.publish(cfg.channel, data)
            sink.wait(lambda: len(sink.outcomes) == len(hostile))
            assert sink.outcomes == ["stale", *["rejected"] * 4]
            # A key set by hand is not trusted, and does not stop the publisher either.
            r.client.set(cfg.epoch_key, 2**53 - 1)
            r.client.set(cfg.last_key, b'{"epoch": 2000000, "time": 1}')
            assert bus.publish_rotation(cfg).epoch == 1  # stale to the hosts, who put back
            sink.wait(lambda: r.client.get(cfg.epoch_key) == b"11")
            assert bus.publish_rotation(cfg).epoch == 12
            sink.wait(lambda: [t.epoch for t in sink.triggers] == [11, 12])
        text = caplog.text
        assert "bad signature" in text and "unsigned" in text and "ahead of epoch 11" in text


def test_epoch_key_set_by_hand_and_the_documented_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="mtd")
    with unix_redis(tmp_path / "r") as r:
        cfg = config(url=r.url, max_epoch_step=STEP)
        sink = Recorder(known=10)
        with subscribed(cfg, sink):
            assert r.client.get(cfg.epoch_key) == b"10"  # put back
            for value in (2**53 - 1, 10 + STEP + 1):
                mark = len(caplog.records)
                r.client.set(cfg.epoch_key, value)
                deadline = time.monotonic() + 5
                while not [x for x in caplog.records[mark:] if x.levelno == logging.ERROR]:
                    assert time.monotonic() < deadline, caplog.text
                    time.sleep(0.05)
                time.sleep(3 * cfg.check_interval)  # more reads of the key: still one line
                errors = [x for x in caplog.records[mark:] if x.levelno == logging.ERROR]
                assert len(errors) == 1, errors
                assert "Recovering the fleet epoch" in errors[0].getMessage()
                assert sink.known == 10 and sink.triggers == []
            for value in (2**53 - 1, MAX_EPOCH):  # the publisher says how to recover
                r.client.set(cfg.epoch_key, value)
                with pytest.raises(MtdError, match="Recovering the fleet epoch"):
                    bus.publish_rotation(cfg)
            # README: `redis-cli DEL mtd:epoch mtd:epoch:last`; the daemons put theirs back.
            r.client.delete(cfg.epoch_key, cfg.last_key)
            sink.wait(lambda: r.client.get(cfg.epoch_key) == b"10")
            assert bus.publish_rotation(cfg).epoch == 11
            sink.wait(lambda: [t.epoch for t in sink.triggers] == [11])


def test_a_new_host_joins_at_the_fleet_epoch(tmp_path: Path):
    with unix_redis(tmp_path / "r") as r:
        cfg = config(url=r.url, max_epoch_step=STEP)
        r.client.set(cfg.epoch_key, 50_000)
        sink = Recorder(known=0)
        with subscribed(cfg, sink):
            sink.wait(lambda: [t.epoch for t in sink.triggers] == [50_000])
            assert sink.triggers[0].origin == "catch-up"


def test_epoch_files_beyond_the_ceiling_are_refused(tmp_path: Path):
    epoch = tmp_path / "epoch"
    epoch.write_text(json.dumps({"epoch": 2**53 - 1}))
    with pytest.raises(MtdError, match=r"0 <= N <= 1099511627776 .*Recovering the fleet epoch"):
        files.read_epoch(epoch)
    with pytest.raises(MtdError, match="past the ceiling"):
        files.write_epoch(epoch, MAX_EPOCH + 1)
    files.write_epoch(epoch, MAX_EPOCH)
    assert files.read_epoch(epoch) == MAX_EPOCH


# -- the daemon in a lab namespace ------------------------------------------------------------


@pytest.mark.netns
def test_daemon_survives_a_hostile_channel(tmp_path: Path):
    """`mtd run` on a unix socket with a password: a flood and the corpus change nothing,
    the next good trigger is applied, the log stays short and shows no password."""
    lab = Lab()
    proc = None
    with unix_redis(tmp_path / "r") as r:
        try:
            lab.add_server("srv")
            (tmp_path / "srv").mkdir()
            state = write_state(
                tmp_path / "srv" / "state.yaml",
                redis={"url": r.query_url, "max_epoch_step": STEP, "max_message_bytes": 4096},
            )
            log = tmp_path / "run.log"
            with log.open("ab") as out:
                proc = lab.spawn(
                    "srv",
                    [
                        *MTD,
                        "-s",
                        str(state),
                        "run",
                        "--log-json",
                        "--redis-check",
                        "0.3",
                        "--metrics",
                        "127.0.0.1:9108",
                    ],
                    stdout=out,
                    stderr=out,
                    cwd=ROOT,
                )

            def events() -> list[dict]:
                return log_events(log.read_text())

            def wait(pred, timeout: float = 30) -> dict:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    for ev in events():
                        if pred(ev):
                            return ev
                    assert proc.poll() is None, log.read_text()
                    time.sleep(0.05)
                raise AssertionError(log.read_text())

            wait(lambda e: e.get("event") == "redis" and e.get("connected") is True)
            wait(lambda e: e.get("event") == "reconcile" and e.get("origin") == "start")
            for data in CORPUS:
                r.client.publish("mtd:rotate", data)
            with r.client.pipeline(transaction=False) as pipe:
                for n in range(20_000):
                    pipe.publish("mtd:rotate", b"garbage %d" % n)
                pipe.execute()
            r.client.set("mtd:epoch", 2**53 - 1)  # the key set by hand, too
            wait(lambda e: e.get("level") == "error" and "fleet epoch" in e.get("message", ""))
            r.client.set("mtd:epoch", 0)
            publisher = write_state(tmp_path / "pub.yaml", redis={"url": r.url})
            out = mtd("-s", str(publisher), "rotate", "--publish")
            assert out.returncode == 0 and "epoch 1 " in out.stdout, out.stderr
            no_password(out.stdout, out.stderr)
            applied = wait(lambda e: e.get("event") == "reconcile" and e.get("epoch") == 1)
            assert applied["result"] == "changed" and applied["origin"] == "redis"
            assert files.read_epoch(tmp_path / "srv" / "epoch") == 1
            # The flood is read after the good trigger may have been caught up from the key:
            # wait until the daemon has counted every message before stopping it.
            want = f'mtd_triggers_total{{outcome="rejected"}} {len(CORPUS) + 20_000}.0'
            url = "http://127.0.0.1:9108/metrics"
            read = [
                sys.executable,
                "-c",
                f"import urllib.request as u; print(u.urlopen({url!r}).read().decode())",
            ]
            deadline = time.monotonic() + 60
            while want not in lab.run("srv", read).stdout.splitlines():
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.2)
            proc.send_signal(15)
            assert proc.wait(timeout=15) == 0
            ignored = [e for e in events() if e.get("event") in ("rejected", "stale")]
            rejected = sum(e["event"] == "rejected" and "suppressed" not in e for e in ignored)
            for e in ignored:
                rejected += sum(n for k, n in e.get("counts", {}).items() if k[:9] == "rejected:")
            # (the good trigger may be caught up from the key before its message arrives,
            # which is then stale: not counted here)
            assert rejected == len(CORPUS) + 20_000
            assert len(ignored) < 50, len(ignored)
            assert not [e for e in events() if "signing_key_file is not set" in e["message"]]
            no_password(log.read_text())
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
            lab.close()


# -- keys: bounded before they are read, parsed alike by Lua and Python -------------------------

# A subscriber with a sink that takes watch orders, in a process of its own under a memory
# limit: it prints one JSON line per event the test waits for.
_BOUNDED = r"""
import json, logging, sys, threading, time
from reconciler.adapters import bus, subscriber
url = sys.argv[1]
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
class Sink:
    def __init__(self, known):
        self.known, self.lock = known, threading.Lock()
    def say(self, **kw):
        with self.lock:
            print(json.dumps(kw), flush=True)
    def known_epoch(self): return self.known
    def applied_epoch(self): return self.known
    def trigger(self, t):
        self.known = max(self.known, t.epoch)
        self.say(trigger=t.epoch)
    def connection(self, up): self.say(up=up)
    def ignored(self, outcome): self.say(ignored=outcome)
    def watch(self, order, origin="message"): self.say(watch=order.source, origin=origin)
cfg = bus.BusConfig(url=url, channel="mtd:rotate", epoch_key="mtd:epoch", max_message_bytes=1024,
                    check_interval=0.2, reconnect_min=0.05, reconnect_max=0.2, timeout=2.0,
                    signing_key=b"k" * 32)
sub = subscriber.Subscriber(cfg, Sink(int(sys.argv[2])))
sub.start()
for line in sys.stdin:  # the test says when to stop
    break
sub.stop()
print(json.dumps({"stopped": True}), flush=True)
"""


class Bounded:
    """`_BOUNDED` under `prlimit --as` and a timeout; its events as they come."""

    def __init__(self, url: str, known: int = 0, limit: int = 600 << 20) -> None:
        self.proc = subprocess.Popen(
            ["prlimit", f"--as={limit}", "timeout", "120", sys.executable, "-c", _BOUNDED, url,
             str(known)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT,
        )  # fmt: skip
        self.events: list[dict] = []

    def wait(self, pred, timeout: float = 30) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if pred(ev):
                return ev
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            assert line, f"exited {self.proc.wait()}: {self.stop()[-3000:]}"
            self.events.append(json.loads(line))
            if pred(self.events[-1]):
                return self.events[-1]
        raise AssertionError(self.events)

    def stop(self) -> str:
        if self.proc.poll() is None:
            try:
                _, err = self.proc.communicate("stop\n", timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate()
            return err
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


_BIG = 400 << 20  # made in the server (SETRANGE, string.rep): never sent by the test


def test_large_values_are_never_downloaded(tmp_path: Path):
    """A 400 MB `mtd:epoch:last` and 100 MB values in the watch hash: one line naming the
    key each, the subscriber (at most 600 MB of address space) alive, the next good trigger
    and the good kept watch applied; a forced reconnect hands nothing over twice."""
    with unix_redis(tmp_path / "r") as r:
        c = r.client
        c.setrange("mtd:epoch:last", _BIG - 1, "x")
        c.eval(
            "redis.call('HSET', KEYS[1], 'a', string.rep('x', 100 * 1048576));"
            "redis.call('HSET', KEYS[1], string.rep('f', 1048576), 'x')",
            1,
            "mtd:epoch:watch",
        )
        cfg = config(url=r.url, signed=True)
        add = bus.WatchOrder("add", "192.0.2.7", 600, "", round(time.time(), 6))
        good = bus.encode_watch(cfg, add)
        c.hset("mtd:epoch:watch", "192.0.2.7", good)
        b = Bounded(r.url)
        try:
            b.wait(lambda e: e.get("up") is True)
            b.wait(lambda e: e.get("watch") == "192.0.2.7" and e["origin"] == "catch-up")
            assert bus.publish_rotation(cfg).epoch == 1  # a last trigger too large: none
            b.wait(lambda e: e.get("trigger") == 1)
            # one message larger than the pub/sub output buffer: Redis drops the client
            c.config_set("client-output-buffer-limit", "pubsub 1mb 1mb 0")
            c.publish("mtd:rotate", b"x" * (2 << 20))
            b.wait(lambda e: e.get("up") is False)
            b.wait(lambda e: e.get("up") is True)
            assert bus.publish_rotation(cfg).epoch == 2
            b.wait(lambda e: e.get("trigger") == 2)
        finally:
            err = b.stop()
        assert b.proc.returncode == 0, err[-3000:]
        assert [e for e in b.events if "watch" in e] == [
            {"watch": "192.0.2.7", "origin": "catch-up"}
        ]
        lines = err.splitlines()
        big = [x for x in lines if "mtd:epoch:last" in x and f"{_BIG} bytes" in x]
        assert len(big) == 1, lines  # logged when it appears, not at every read
        kept = [x for x in lines if "mtd:epoch:watch field" in x]
        assert len(kept) == 4 and all("left unread" in x for x in kept), lines  # 2 a connect
        assert max(len(x) for x in lines) < 500


@pytest.mark.parametrize(
    "value",
    [b"1e3", b"0x10", b" 12", b"12 ", b"+5", b"1_0", b"\xd9\xa3", b"010", b"-0", b"nan", b"inf",
     b"5\x00", b"5\n", b"1099511627777", b"1" * 400, b"", b"1099511627776", b"0", b"5"],
)  # fmt: skip
def test_the_epoch_key_is_read_alike_by_lua_and_python(tmp_path: Path, value: bytes):
    """What the put-back (Lua) takes as an epoch is exactly what a subscriber (Python)
    reads as one: plain decimal digits up to MAX_EPOCH."""
    with unix_redis(tmp_path / "r") as r:
        cfg = config(url=r.url)
        r.client.set(cfg.epoch_key, value)
        try:
            python: int | None = bus.read_epoch(r.client, cfg)
        except MtdError as exc:
            python = None
            assert "\n" not in str(exc) and cfg.epoch_key in str(exc)
        try:
            raised = bus.put_back(r.client, cfg, MAX_EPOCH)
            lua: int | None = int(value)
            assert raised == (lua < MAX_EPOCH)
        except MtdError as exc:
            lua = None
            assert "\n" not in str(exc) and cfg.epoch_key in str(exc)
        assert python == lua
        assert (python is not None) == (value in (b"1099511627776", b"0", b"5"))


def test_keys_of_another_type_are_one_line_not_a_reconnect(tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="mtd")
    with unix_redis(tmp_path / "r") as r:
        cfg = config(url=r.url)
        r.client.hset(cfg.last_key, "a", "b")
        r.client.set(cfg.watch_key, "x")
        with pytest.raises(bus.BadMessage, match=r"key mtd:epoch:last holds a hash"):
            bus.read_epoch(r.client, config(url=r.url, signed=True))
        with pytest.raises(MtdError, match=r"key mtd:epoch:watch is a string, not a hash"):
            list(bus.read_watches(r.client, cfg))
        r.client.rpush(cfg.epoch_key, "1")
        with pytest.raises(MtdError, match="key mtd:epoch holds a list"):
            bus.read_epoch(r.client, cfg)
        sink = Recorder()
        with subscribed(cfg, sink):
            r.client.delete(cfg.epoch_key)
            r.client.set(cfg.epoch_key, 2)
            sink.wait(lambda: [t.epoch for t in sink.triggers] == [2])
        assert sink.ups == [True]  # connected once: no reconnect loop


def test_fleet_status_leaves_large_records_in_redis(tmp_path: Path):
    """`mtd fleet status` (at most 600 MB of address space) with a 400 MB last record, a
    400 MB live record and a live key of another type: each host shown invalid with its
    size, the good one ok, in one run that never downloads them."""
    from tests.test_fleet import record

    with unix_redis(tmp_path / "r") as r:
        c = r.client
        c.set("mtd:epoch", 0)
        good = record("web1", time=time.time())
        c.hset("mtd:hosts", "web1", good)
        c.set("mtd:hosts:web1", good, ex=60)
        c.hset("mtd:hosts", "web2", good.replace(b"web1", b"web2"))
        c.setrange("mtd:hosts:web2", _BIG - 1, "x")
        c.eval("redis.call('HSET', KEYS[1], 'web3', string.rep('x', 100 * 1048576))", 1,
               "mtd:hosts")  # fmt: skip
        c.hset("mtd:hosts", "web4", good.replace(b"web1", b"web4"))
        c.rpush("mtd:hosts:web4", "x")
        state = write_state(tmp_path / "s.yaml", redis={"url": r.url})
        out = subprocess.run(
            ["prlimit", f"--as={600 << 20}", "timeout", "60", *MTD, "-s", str(state), "fleet",
             "status", "--json"],
            capture_output=True, text=True, cwd=ROOT, check=False,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr[-2000:]
        hosts = {h["host"]: h for h in json.loads(out.stdout)["hosts"]}
        assert hosts["web1"]["status"] == "ok"
        for name, why in (("web2", f"{_BIG} bytes"), ("web3", f"{100 << 20} bytes"),
                          ("web4", "a key of another type")):  # fmt: skip
            assert hosts[name]["status"] == "invalid" and why in hosts[name]["why"], hosts[name]
