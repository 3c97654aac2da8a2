"""Watch messages through a real redis-server: published, kept for daemons that were away,
replays and forgeries rejected, a hostile flood bounded (under a memory limit and a
timeout); then two `mtd run` in lab namespaces on one Redis, both enforcing a watch within
a second, keeping it through a rotation and a restart, and letting it expire on time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters import bus, subscriber
from reconciler.lab.netns import Lab
from tests.conftest import MTD, ROOT, log_events, mtd, write_state
from tests.redis_fixtures import needs_redis, redis_server
from tests.test_bus import Recorder, config
from tests.test_watch import DYN_TEMPLATE

pytestmark = needs_redis
KEY = b"k" * 32


class Watcher(Recorder):
    """A sink that also takes watch orders."""

    def __init__(self) -> None:
        super().__init__()
        self.orders: list[tuple[bus.WatchOrder, str]] = []

    def watch(self, order: bus.WatchOrder, origin: str = "message") -> None:
        with self.changed:
            self.orders.append((order, origin))
            self.changed.notify_all()


def order(op: str = "add", source: str = "192.0.2.7", seconds: int = 600) -> bus.WatchOrder:
    return bus.WatchOrder(op, source, seconds if op == "add" else 0, "", round(time.time(), 6))


@pytest.mark.parametrize("signed", [False, True])
def test_published_kept_caught_up_and_replays_rejected(tmp_path: Path, signed: bool):
    with redis_server(tmp_path / "r") as r:
        cfg = config(signed=signed, url=r.url)
        sink = Watcher()
        sub = subscriber.Subscriber(cfg, sink)
        sub.start()
        try:
            sink.wait(lambda: sink.ups == [True])
            add = order()
            assert bus.publish_watch(cfg, add) == 1
            sink.wait(lambda: sink.orders == [(add, "message")])
            raw = bus.encode_watch(cfg, add)
            client = bus.connect(cfg)
            client.publish(cfg.channel, raw)  # the same message again: a replay
            sink.wait(lambda: sink.outcomes == ["rejected"])
            if signed:
                forged = json.loads(raw) | {"for": 9999}
                client.publish(cfg.channel, json.dumps(forged))
                unsigned = bus.encode_watch(config(url=r.url), order(source="192.0.2.9"))
                client.publish(cfg.channel, unsigned)
                sink.wait(lambda: sink.outcomes == ["rejected"] * 3)
            assert len(sink.orders) == 1
            # kept for whoever was away: a new subscriber applies it at once
            late = Watcher()
            sub2 = subscriber.Subscriber(cfg, late)
            sub2.start()
            try:
                late.wait(lambda: late.orders == [(add, "catch-up")])
            finally:
                sub2.stop()
            dele = order("del")
            assert bus.publish_watch(cfg, dele) == 1
            sink.wait(lambda: sink.orders[-1] == (dele, "message"))
            assert client.hlen(cfg.watch_key) == 0
            # an expired entry is pruned at the next publish
            bus.publish_watch(cfg, order(source="192.0.2.10", seconds=1))
            time.sleep(1.1)  # the entry's own lifetime: what is tested is its expiry
            bus.publish_watch(cfg, order(source="192.0.2.11"))
            assert client.hkeys(cfg.watch_key) == [b"192.0.2.11"]
            client.close()
        finally:
            sub.stop()


_FLOOD = r"""
import json, logging, sys, threading, time
from reconciler.adapters import bus, subscriber
url, n = sys.argv[1], int(sys.argv[2])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
class Sink:
    def __init__(self):
        self.ignored_n, self.orders, self.up = 0, [], threading.Event()
    def known_epoch(self): return 0
    def applied_epoch(self): return 0
    def trigger(self, t): pass
    def connection(self, up): self.up.set() if up else None
    def ignored(self, outcome): self.ignored_n += 1
    def watch(self, order, origin="message"): self.orders.append(order.source)
cfg = bus.BusConfig(url=url, channel="mtd:rotate", epoch_key="mtd:epoch",
                    signing_key=b"k" * 32, max_message_bytes=1024, log_window=0.5)
sink = Sink()
sub = subscriber.Subscriber(cfg, sink)
sub.start()
sink.up.wait(10)
print("ready", flush=True)
deadline = time.monotonic() + 50
while sink.ignored_n < n and time.monotonic() < deadline:
    time.sleep(0.05)
sub.stop()
print(json.dumps({"ignored": sink.ignored_n, "orders": sink.orders}), flush=True)
"""


def test_a_hostile_flood_of_watch_messages_is_rejected_in_bounded_lines(tmp_path: Path):
    now = time.time()
    hostile = [
        json.dumps({"watch": "add", "source": "192.0.2.7", "for": 60, "time": now}),  # unsigned
        json.dumps({"watch": "add", "source": "192.0.2.7", "for": 60, "time": now, "sig": "0"}),
        json.dumps({"watch": "add", "source": "0.0.0.0/0", "for": 60, "time": now}),
        json.dumps({"watch": "nuke", "source": "192.0.2.7", "time": now}),
        json.dumps({"watch": "add", "source": "x" * 900, "for": 60, "time": now}),
        json.dumps({"watch": {"a": [[[[1]]]]}, "source": 7, "time": now}),
        json.dumps({"watch": "add", "source": "192.0.2.7", "for": 10**30, "time": now}),
        '{"watch": "add", "source": "192.0.2.7", "for": NaN, "time": 1}',
        "[" * 100_000,
        "x" * 2_000_000,
    ]
    flood = [
        json.dumps({"watch": "add", "source": f"10.{n // 256}.{n % 256}.1", "for": 60, "time": now})
        for n in range(5000)
    ]
    total = len(hostile) + len(flood)
    with redis_server(tmp_path / "r") as r:
        proc = subprocess.Popen(
            ["prlimit", f"--as={1 << 30}", "timeout", "60", sys.executable, "-c", _FLOOD, r.url,
             str(total)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            client = bus.connect(config(url=r.url))
            with client.pipeline(transaction=False) as pipe:
                for data in hostile + flood:
                    pipe.publish("mtd:rotate", data)
                pipe.execute()
            client.close()
            out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"ignored": total, "orders": []}
        lines = [x for x in err.splitlines() if "ignored" in x]
        assert 1 <= len(lines) < 100, len(lines)
        assert all(len(x) < 500 for x in lines), [x for x in lines if len(x) >= 500]
        assert any("unsigned" in x for x in lines) and any("not JSON" in x for x in lines)


# -- two daemons in lab namespaces on one Redis -------------------------------------------------


class Daemons:
    """`mtd run` per namespace, each with its own state directory, all on one Redis."""

    def __init__(self, lab: Lab, tmp: Path, url: str) -> None:
        self.lab, self.tmp, self.url = lab, tmp, url
        (tmp / "tpl").mkdir(exist_ok=True)
        (tmp / "tpl" / "dyn.json.j2").write_text(DYN_TEMPLATE)
        key = tmp / "signing.key"
        key.write_bytes(KEY)
        key.chmod(0o600)
        self.redis = {"url": url, "signing_key_file": str(key)}
        self.procs: dict[str, subprocess.Popen] = {}

    def state(self, name: str) -> Path:
        (self.tmp / name).mkdir(exist_ok=True)
        return write_state(self.tmp / name / "state.yaml", template="dyn", redis=self.redis)

    def start(self, name: str) -> None:
        if name not in self.lab.hosts:
            self.lab.add_server(name)
        log = self.tmp / f"{name}.log"
        with log.open("ab") as out:
            self.procs[name] = self.lab.spawn(
                name,
                [*MTD, "-s", str(self.state(name)), "--templates", str(self.tmp / "tpl"),
                 "run", "--log-json", "--redis-check", "0.3"],
                stdout=out, stderr=out, cwd=ROOT,
            )  # fmt: skip
        self.wait(name, lambda e: e.get("event") == "reconcile" and e.get("origin") == "start")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        proc.wait(timeout=20)

    def events(self, name: str) -> list[dict[str, Any]]:
        text = (self.tmp / f"{name}.log").read_text()
        return log_events(text)

    def wait(self, name: str, pred: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events(name):
                if pred(ev):
                    return ev
            proc = self.procs.get(name)
            assert proc is None or proc.poll() is None, (self.tmp / f"{name}.log").read_text()
            time.sleep(0.05)
        raise AssertionError((self.tmp / f"{name}.log").read_text())

    def dyn4(self, name: str) -> dict[str, int]:
        out = self.lab.run(name, ["nft", "-j", "list", "set", "inet", "mtd", "dyn4"])
        if out.returncode != 0:
            return {}
        (found,) = [o["set"] for o in json.loads(out.stdout)["nftables"] if "set" in o]
        return {e["elem"]["val"]: e["elem"]["expires"] for e in found.get("elem", [])}

    def until(self, pred: Any, timeout: float = 30) -> float:
        """Poll the kernels until `pred()`; the seconds it took."""
        start = time.monotonic()
        while not pred():
            assert time.monotonic() - start < timeout, {n: self.dyn4(n) for n in self.procs}
            time.sleep(0.02)
        return time.monotonic() - start

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        pub = write_state(self.tmp / "pub.yaml", template="dyn", redis=self.redis)
        return mtd("-s", str(pub), *args)


@pytest.mark.netns
def test_two_daemons_enforce_a_watch_through_rotation_restart_and_expiry(tmp_path: Path):
    from tests.test_bus_hostile import unix_redis

    with unix_redis(tmp_path / "r") as r, Lab(prefix="mtdw") as lab:
        d = Daemons(lab, tmp_path, r.url)
        d.start("a")
        out = d.cli("watch", "add", "192.0.2.7", "--for", "1h", "--reason", "ids")
        assert out.returncode == 0 and "(1 subscriber;" in out.stdout, out.stdout + out.stderr
        d.until(lambda: "192.0.2.7" in d.dyn4("a"))
        # a daemon started later learns it from Redis
        d.start("b")
        d.until(lambda: "192.0.2.7" in d.dyn4("b"))
        # both keep it through a fleet rotation (a full replacement), with its time left
        assert d.cli("rotate", "--publish").returncode == 0
        for name in ("a", "b"):
            d.wait(name, lambda e: e.get("event") == "reconcile" and e.get("epoch") == 1)
            assert 3500 < d.dyn4(name)["192.0.2.7"] <= 3600
        # a short one expires on time, in the kernel
        out = d.cli("watch", "add", "192.0.2.8", "--for", "3")
        assert out.returncode == 0, out.stderr
        d.until(lambda: all("192.0.2.8" in d.dyn4(n) for n in ("a", "b")))
        took = d.until(lambda: not any("192.0.2.8" in d.dyn4(n) for n in ("a", "b")))
        assert took < 10  # a 3 s timeout, polled on a shared machine
        # a restart of a host that lost its table (a reboot): the store puts it back
        d.stop("a")
        lab.sh("a", "nft flush ruleset")
        d.start("a")
        d.until(lambda: "192.0.2.7" in d.dyn4("a"))
        listed = mtd(
            "-s", str(d.state("a")), "--templates", str(tmp_path / "tpl"), "watch", "list",
            "--json", ns=lab, role="a",
        )  # fmt: skip
        rows = json.loads(listed.stdout)
        assert [(x["source"], x["origin"], x["reason"]) for x in rows] == [
            ("192.0.2.7", "redis", "ids")
        ]
        # del, fleet-wide
        assert d.cli("watch", "del", "192.0.2.7").returncode == 0
        d.until(lambda: not any("192.0.2.7" in d.dyn4(n) for n in ("a", "b")))
        for name in ("a", "b"):
            assert not [e for e in d.events(name) if e.get("event") == "drift"]


@pytest.mark.netns
def test_a_zone_kept_in_redis_or_in_the_store_never_stops_a_daemon(tmp_path: Path):
    """`2001:db8::%x` in the kept hash (signed: a publisher with the key) and in watch.json
    on disk: each is one line naming where it was, the daemon starts with its table and the
    good entries, and applies the next trigger."""
    from reconciler.adapters import files, watchstore
    from tests.test_bus_hostile import unix_redis

    with unix_redis(tmp_path / "r") as r, Lab(prefix="mtdk") as lab:
        d = Daemons(lab, tmp_path, r.url)
        state = files.load_state(d.state("a"))
        cfg = bus.BusConfig.from_state(state)
        now = round(time.time(), 6)
        zone: dict[str, Any] = {"watch": "add", "source": "2001:db8::%x", "for": 600,
                                "reason": "", "time": now}  # fmt: skip
        zone["sig"] = bus.watch_signature(KEY, cfg.channel, "add", zone["source"], 600, "", now)
        r.client.hset(cfg.watch_key, zone["source"], json.dumps(zone))
        good = bus.WatchOrder("add", "192.0.2.7", 600, "", now)
        r.client.hset(cfg.watch_key, good.source, bus.encode_watch(cfg, good))
        rows = [
            {"source": s, "origin": "redis", "reason": "", "expires_at": now + 600}
            for s in ("2001:db8::%y", "192.0.2.8")
        ]
        watchstore.path_for(state.epoch_file).write_text(json.dumps({"entries": rows}))
        d.start("a")
        d.until(lambda: {"192.0.2.7", "192.0.2.8"} <= set(d.dyn4("a")))
        lines = [e["message"] for e in d.events("a")]
        kept = [x for x in lines if "%x" in x]
        assert len(kept) == 1 and cfg.watch_key in kept[0] and "zone" in kept[0], kept
        stored = [x for x in lines if "%y" in x]
        assert len(stored) == 1 and "watch.json: entry 0" in stored[0], stored
        assert d.cli("rotate", "--publish").returncode == 0
        d.wait("a", lambda e: e.get("event") == "reconcile" and e.get("epoch") == 1)
        assert {"192.0.2.7", "192.0.2.8"} <= set(d.dyn4("a"))
