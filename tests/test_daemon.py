"""`mtd run` for real: redis-server in a hub namespace, daemons in server namespaces, views
checked with TCP connections from untrusted (`unt`) and trusted (`tru`) clients."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters import files
from reconciler.lab.mtdrun import MtdRun
from reconciler.lab.netns import HUB_V6, Lab
from tests.conftest import ROOT, mtd, write_state
from tests.kernel import expected_moves, nft, table_text
from tests.redis_fixtures import RedisServer, needs_redis

pytestmark = [pytest.mark.netns, needs_redis]

SERVER = "192.0.2.1"
UNT = ("192.0.2.3", "2001:db8::3")
TRU = ("192.0.2.2", "2001:db8::2")
# Fast timers, so outages are noticed and healed in a fraction of a second.
FAST = [
    "--reconnect-min", "0.1",
    "--reconnect-max", "0.4",
    "--redis-check", "0.3",
    "--redis-timeout", "0.5",
]  # fmt: skip
Event = dict[str, Any]


class Daemon(MtdRun):
    """One `mtd run` inside a server namespace; its JSON log lines are the events."""

    def __init__(self, lab: Lab, role: str, state: Path, log: Path, args: list[str]) -> None:
        super().__init__(lab, role, state, *FAST, *args, log=log, cwd=ROOT)

    def applied(self, epoch: int, since: int = 0) -> Event:
        return self.wait(lambda e: is_pass(e) and e["epoch"] == epoch, since)

    def passes(self, since: int = 0) -> list[Event]:
        return [e for e in self.events()[since:] if is_pass(e)]

    def epoch_file(self) -> int:
        return files.read_epoch(files.load_state(self.state).epoch_file)


def is_pass(e: Event) -> bool:
    return e.get("event") == "reconcile" and e.get("result") in ("changed", "ok")


def started(e: Event) -> bool:
    return is_pass(e) and e["origin"] == "start"


@dataclass
class Fleet:
    lab: Lab
    redis: RedisServer
    tmp: Path
    overrides: dict[str, Any]
    states: dict[str, Path] = field(default_factory=dict)
    daemons: list[Daemon] = field(default_factory=list)
    publisher: Path = Path()  # a state file of its own, for `mtd rotate --publish`

    def write_state(self, role: str, **more: Any) -> Path:
        return write_state(self.tmp / role / "state.yaml", **(self.overrides | more))

    def start(self, role: str = "srv", *args: str) -> Daemon:
        n = sum(d.role == role for d in self.daemons)
        d = Daemon(self.lab, role, self.states[role], self.tmp / role / f"run{n}.log", list(args))
        self.daemons.append(d)
        return d

    def publish(self) -> int:
        """`mtd rotate --publish` from the hub (so it works while a server is cut off)."""
        out = mtd("-s", str(self.publisher), "rotate", "--publish", ns=self.lab, role="hub")
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[2])

    def probe(self, client: str, port: int) -> str:
        return self.lab.probe(client, "tcp", SERVER, port)


@contextlib.contextmanager
def fleet(
    tmp_path: Path, servers: tuple[str, ...] = ("srv",), signed: bool = False, **redis: Any
) -> Iterator[Fleet]:
    """A hub running redis-server; each server namespace joins it, has listeners on tcp 1-5
    and udp 53, an untrusted client (`unt`, `unt2`, ...) and, for the first, a trusted one."""
    lab = Lab()
    server = RedisServer(tmp_path / "redis", lab=lab, role="hub", host=HUB_V6)
    daemons: list[Daemon] = []
    try:
        lab.add_hub()
        server.start()
        redis_cfg: dict[str, Any] = {"url": server.url, **redis}
        if signed:
            key = tmp_path / "signing.key"
            key.write_text("fleet-signing-key-0123456789abcdef\n")
            key.chmod(0o600)
            redis_cfg["signing_key_file"] = str(key)
        f = Fleet(lab, server, tmp_path, {"redis": redis_cfg}, daemons=daemons)
        f.publisher = write_state(tmp_path / "publisher.yaml", redis=redis_cfg)
        for i, role in enumerate(servers, 1):
            sfx = "" if i == 1 else str(i)
            lab.add_server(role)
            lab.join_hub(role, f"2001:db8:ff::{10 + i}")
            lab.add_client(f"unt{sfx}", *UNT, server=role)
            if i == 1:
                lab.add_client("tru", *TRU, server=role)
            lab.serve(role, (1, 2, 3, 4, 5), (53,))
            (tmp_path / role).mkdir()
            f.states[role] = f.write_state(role)
        yield f
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.kill()
        server.stop()
        lab.close()


def moved(state: Path, epoch: int) -> dict[int, int]:
    return dict(expected_moves(state, epoch)[(UNT[0], "tcp")])


def changed_port(state: Path, before: int, after: int) -> int:
    """A service port of the untrusted source that moves between the two epochs."""
    old, new = moved(state, before), moved(state, after)
    return next(p for p in sorted(new) if new[p] != old[p])


def test_trigger_moves_the_untrusted_view_within_a_second(tmp_path: Path):
    with fleet(tmp_path) as f:
        d = f.start("srv", "--metrics", "127.0.0.1:9108")
        d.wait(started)
        # Redis is off this host (the hub) and triggers are unsigned: said at start.
        warning = d.wait(lambda e: "signing_key_file is not set" in e.get("message", ""))
        assert warning["level"] == "warning" and warning["event"] == "start"
        state = f.states["srv"]
        port = changed_port(state, 0, 1)
        before, after = moved(state, 0)[port], moved(state, 1)[port]
        assert f.probe("unt", before) == f"port {port}"

        assert f.publish() == 1
        t0 = time.monotonic()
        while f.probe("unt", after) != f"port {port}":
            assert time.monotonic() - t0 < 5, "the untrusted view never changed"
        took = time.monotonic() - t0
        assert took < 1.0, f"untrusted view changed after {took:.2f} s"
        ev = d.applied(1)
        assert ev["result"] == "changed" and ev["origin"] == "redis"
        assert 0 <= ev["latency"] < 1.0  # publish time (in the message) to applied
        assert f.probe("unt", before) != f"port {port}"
        for p in (1, 2, 3, 4, 5):  # the trusted view never moved
            assert f.probe("tru", p) == f"port {p}"

        metrics = f.lab.run(
            "srv",
            [sys.executable, "-c", "import urllib.request as u;"
             "print(u.urlopen('http://127.0.0.1:9108/metrics').read().decode())"],
        ).stdout  # fmt: skip
        for line in (
            "mtd_epoch 1.0",
            'mtd_reconciles_total{result="changed"} 2.0',
            'mtd_triggers_total{outcome="accepted"} 1.0',
            "mtd_trigger_to_applied_seconds_count 1.0",
            "mtd_reconcile_duration_seconds_count 2.0",
            "mtd_redis_connected 1.0",
            "mtd_drift_corrections_total 0.0",
        ):
            assert line in metrics.splitlines(), line
        secret = Path(files.load_state(state).secret_file).read_bytes()
        log = d.text()
        assert secret.hex() not in log and f'"{port}":' not in log  # no secret, no mapping


def test_outages_lose_no_rotation_and_apply_none_twice(tmp_path: Path):
    with fleet(tmp_path) as f:
        d = f.start("srv")
        d.wait(started)
        assert f.publish() == 1
        d.applied(1)

        # Redis restarts without persistence: the table stays, the epoch is put back.
        mark = d.mark()
        f.redis.stop()
        d.wait(lambda e: e.get("event") == "redis" and e.get("connected") is False, mark)
        d.wait(lambda e: e.get("event") == "redis" and e.get("attempt", 0) >= 3, mark)
        assert d.proc.poll() is None and "absent" not in table_text(f.lab)
        f.redis.start()
        d.wait(lambda e: e.get("event") == "redis" and e.get("connected") is True, mark)
        d.wait(lambda e: "put back epoch 1" in e.get("message", ""), mark)
        assert f.redis.cli("GET", "mtd:epoch") == "1"
        assert f.publish() == 2  # the next trigger still moves the host forward
        d.applied(2)

        # The link to Redis is cut: rotations published meanwhile are caught up after.
        mark = d.mark()
        f.lab.sh("hub", "ip link set to-srv down")
        d.wait(lambda e: e.get("event") == "redis" and e.get("connected") is False, mark)
        assert (f.publish(), f.publish()) == (3, 4)
        cut = d.mark()  # cut off for two more reconnect attempts: nothing reached it
        d.wait(lambda e: e.get("event") == "redis" and e.get("attempt", 0) >= 2, cut)
        assert d.epoch_file() == 2 and not d.passes(mark)
        f.lab.sh("hub", "ip link set to-srv up")
        ev = d.applied(4, mark)
        assert ev["origin"] == "redis"

        # Redis comes back holding a newer epoch, set while the host was cut off from it.
        mark = d.mark()
        f.redis.stop()
        d.wait(lambda e: e.get("event") == "redis" and e.get("connected") is False, mark)
        f.redis.start()
        f.redis.cli("SET", "mtd:epoch", "7")
        d.applied(7, mark)

        changed = [e["epoch"] for e in d.passes() if e["result"] == "changed"]
        assert changed == [0, 1, 2, 4, 7]  # each once, never backwards
        assert d.epoch_file() == 7 and d.proc.poll() is None
        assert not [e for e in d.events() if e.get("event") in ("raw", "error")]
        port = changed_port(f.states["srv"], 4, 7)
        assert f.probe("unt", moved(f.states["srv"], 7)[port]) == f"port {port}"


def test_several_daemons_reach_the_same_epoch(tmp_path: Path):
    roles = ("srv", "srv2", "srv3")
    with fleet(tmp_path, roles) as f:
        daemons = [f.start(role) for role in roles]
        for d in daemons:
            d.wait(started)
        assert f.publish() == 1
        applied = [d.applied(1) for d in daemons]
        assert [d.epoch_file() for d in daemons] == [1, 1, 1]
        assert len({ev["fingerprint"] for ev in applied}) == 3  # each its own mapping
        for i, role in enumerate(roles, 1):
            client = "unt" if i == 1 else f"unt{i}"
            moves = moved(f.states[role], 1)
            for port, hidden in moves.items():
                assert f.probe(client, hidden) == f"port {port}", (role, port)


def test_bad_unsigned_and_replayed_messages_are_ignored(tmp_path: Path):
    with fleet(tmp_path, signed=True) as f:
        d = f.start("srv")
        d.wait(started)
        assert f.publish() == 1
        d.applied(1)
        replay = f.redis.cli("GET", "mtd:epoch:last")
        forged = json.loads(replay) | {"epoch": 2}
        mark = d.mark()
        for msg in (
            "rotate now",
            "x" * 5000,
            json.dumps({"epoch": 2, "time": time.time()}),
            json.dumps(forged),
            replay,
        ):
            f.redis.cli("PUBLISH", "mtd:rotate", msg)
        f.redis.cli("SET", "mtd:epoch", "50")  # set by hand: unsigned, not followed

        def ignored_events() -> list[Event]:
            return [e for e in d.events()[mark:] if e.get("event") in ("rejected", "stale")]

        d.wait(lambda _: len(ignored_events()) >= 5, mark)
        ignored = ignored_events()
        reasons = [e["message"] for e in ignored]
        assert len(reasons) == 5, reasons
        for part, reason in zip(
            ("not JSON", "5000 bytes: expected at most 1024", "epoch 2: unsigned",
             "epoch 2: bad signature", "epoch 1 is not newer than epoch 1"),
            reasons,
            strict=True,
        ):  # fmt: skip
            assert part in reason
        assert all("\n" not in r for r in reasons)
        assert not d.passes(mark) and d.epoch_file() == 1
        # A signed publisher, too, counts from the signed last trigger, not the key.
        assert f.publish() == 2  # a signed trigger still works
        assert d.applied(2, mark)["origin"] == "redis"
        assert [e["epoch"] for e in d.passes(mark)] == [2]  # 50, set unsigned, never applied
        assert not [e for e in d.events() if "signing_key_file is not set" in e["message"]]


def test_drift_is_repaired_at_once_even_without_redis(tmp_path: Path):
    with fleet(tmp_path) as f:
        d = f.start("srv")  # the default drift timer: an hour; the events do the work
        d.wait(started)
        assert f.publish() == 1  # a rotation replaces the table without reading it...
        assert d.applied(1)["summary"] == {"~table": 1}
        for redis_up in (True, False):  # ...and drift is still repaired, Redis or not
            if not redis_up:
                f.redis.stop()
            mark = d.mark()
            nft(f.lab, "delete table inet mtd")
            t0 = time.monotonic()
            while "absent" in table_text(f.lab):
                assert time.monotonic() - t0 < 5, "the table was never restored"
                time.sleep(0.05)
            ev = d.wait(lambda e: e.get("event") == "drift", mark)
            assert ev["epoch"] == 1 and ev["level"] == "warning"
            assert ev["found_by"] == "events" and "-table" in ev["changes"]
        assert d.epoch_file() == 1 and d.proc.poll() is None


def test_sighup_keeps_the_old_state_when_the_new_one_is_broken(tmp_path: Path):
    with fleet(tmp_path) as f:
        state = f.states["srv"]
        d = f.start("srv")
        d.wait(started)
        port3 = moved(state, 1)[3]  # where port 3 hides at epoch 1, with this state
        mark = d.mark()
        state.write_text("ports: {range: [1, 20]\n")  # broken YAML
        d.proc.send_signal(signal.SIGHUP)
        ev = d.wait(lambda e: e.get("event") == "reload", mark)
        assert ev["result"] == "rejected" and f"{state}:" in ev["message"]
        assert "invalid YAML" in ev["message"]
        assert f.publish() == 1  # the old state is still enforced, at the new epoch
        assert d.applied(1, mark)["result"] == "changed"

        # A valid new state: port 3 stops moving for the untrusted source.
        f.write_state(
            "srv",
            watched=[{"source": UNT[0], "ignore": {"tcp": [1, 2, 3]}}, {"source": UNT[1]}],
        )
        mark = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        ev = d.wait(lambda e: is_pass(e) and e["origin"] == "manual", mark)
        assert ev["result"] == "changed"
        assert f.probe("unt", 3) == "port 3" and f.probe("unt", port3) != "port 3"

        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 1.0
        assert d.events()[-1]["event"] == "stop"
        assert "absent" not in table_text(f.lab)  # left in place on purpose

        d2 = f.start("srv", "--down-on-exit")
        assert d2.wait(started)["result"] == "ok"  # restart: nothing to change
        d2.proc.send_signal(signal.SIGINT)
        assert d2.proc.wait(timeout=5) == 0
        assert "absent" in table_text(f.lab)


def test_a_burst_of_triggers_costs_one_pass_per_min_interval(tmp_path: Path):
    with fleet(tmp_path, min_interval=1.0) as f:
        d = f.start("srv")
        d.wait(started)
        mark = d.mark()
        out = mtd("-s", str(f.publisher), "trigger", "--every", "0..0.02", "--count", "10",
                  ns=f.lab, role="hub")  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert [int(line.split()[2]) for line in out.stdout.splitlines()] == list(range(1, 11))
        d.applied(10, mark)
        epochs = [e["epoch"] for e in d.passes(mark)]
        # The exact coalescing and spacing are tested on the fake (test_daemon_logic.py).
        assert len(epochs) <= 2 and epochs[-1] == 10, epochs  # the last epoch wins
        assert d.epoch_file() == 10


def test_a_failing_pass_is_logged_and_retried_not_fatal(tmp_path: Path):
    with fleet(tmp_path) as f:
        d = f.start("srv", "--drift-interval", "0.5")
        d.wait(started)
        epoch = Path(files.load_state(f.states["srv"]).epoch_file)
        epoch.mkdir()  # an epoch file that cannot be read (a secret is read once, at start)
        mark = d.mark()
        assert f.publish() == 1
        # A drift pass at epoch 0 may fail first: wait for the trigger's own pass.
        ev = d.wait(
            lambda e: e.get("event") == "reconcile" and e["result"] == "error" and e["epoch"] == 1,
            mark,
        )
        assert ev["level"] == "error"
        assert f"{epoch}: unreadable epoch file" in ev["message"]
        assert "absent" not in table_text(f.lab)  # old table enforced
        epoch.rmdir()
        assert d.applied(1, mark)["origin"] == "drift"  # the retry, at the next drift check
        assert d.proc.poll() is None


def test_a_local_rotate_raises_the_fleet_epoch_and_says_so(tmp_path: Path):
    with fleet(tmp_path) as f:
        d = f.start("srv")
        d.wait(started)
        assert f.redis.cli("GET", "mtd:epoch") == ""  # an empty Redis: nothing written to it
        mark = d.mark()
        out = mtd("-s", str(f.states["srv"]), "rotate", ns=f.lab)
        assert out.returncode == 0, out.stderr
        ev = d.wait(lambda e: e.get("event") == "rotation", mark)
        assert "local rotation: the epoch file is at 1" in ev["message"]
        ev = d.wait(lambda e: "raised from epoch 0 to 1" in e.get("message", ""), mark)
        assert "a local `mtd rotate` moved this host to epoch 1" in ev["message"]
        assert ev["level"] == "info" and f.redis.cli("GET", "mtd:epoch") == "1"
        assert not [e for e in d.events()[mark:] if "put back" in e.get("message", "")]
        assert f.publish() == 2  # the fleet moves on from there
        d.applied(2, mark)


def test_without_redis_url_no_redis_is_used(tmp_path: Path):
    """A standalone or GitOps-only host: no Redis triggers, no reconnect logs, and a Redis at
    the usual address is neither read nor written."""
    lab = Lab()
    local = RedisServer(tmp_path / "redis", lab=lab, role="srv", host="127.0.0.1", port=6379)
    try:
        lab.add_server("srv")
        lab.serve("srv", (1, 2, 3, 4, 5), (53,))
        local.start()
        state = write_state(tmp_path / "state.yaml")
        d = Daemon(lab, "srv", state, tmp_path / "run.log", ["--drift-interval", "0.3"])
        ev = d.wait(lambda e: e.get("event") == "start")
        assert "no fleet (no redis.url" in ev["message"]
        d.wait(started)
        mark = d.mark()
        assert mtd("-s", str(state), "rotate", ns=lab).returncode == 0
        ev = d.wait(lambda e: e.get("event") == "rotation", mark)
        assert ev["message"].endswith("no fleet to raise")
        d.applied(1, mark)
        assert not [e for e in d.events() if e.get("event") in ("redis", "error", "raw")]
        assert local.cli("DBSIZE") == "0" and "cmd=get" not in local.cli("CLIENT", "LIST")
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=10) == 0
    finally:
        local.stop()
        lab.close()
