"""CrowdSec decisions as dynamic sources: the pure translation (scopes, ranges, durations,
two decisions on one source, trusted prefixes), the Local API client against hostile
answers (bounded, under a memory limit and a timeout), and a real CrowdSec Local API in a
lab namespace followed by `mtd run`, its decisions reaching a second daemon through Redis."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters import bus
from reconciler.adapters import crowdsec as lapi
from reconciler.core import crowdsec
from reconciler.core.crowdsec import Book
from reconciler.core.watch import WatchError
from reconciler.errors import MtdError
from reconciler.lab.netns import Lab
from reconciler.services.crowdsec import Follower
from tests.conftest import ROOT, write_state
from tests.crowdsec_fixtures import lapi as crowdsec_lapi
from tests.crowdsec_fixtures import needs_crowdsec
from tests.redis_fixtures import needs_redis
from tests.test_bus import config
from tests.test_watch_redis import Daemons

NOW = 1_800_000_000.0


def ban(ident: int, value: str, duration: str = "1h", scope: str = "Ip", **kw: Any) -> dict:
    return {"id": ident, "type": "ban", "scope": scope, "value": value, "duration": duration,
            "origin": "cscli", "scenario": "crowdsecurity/ssh-bf"} | kw  # fmt: skip


def test_durations_scopes_and_ranges():
    assert crowdsec.duration("3h59m58.5s") == pytest.approx(14398.5)
    assert crowdsec.duration("-20.744114ms") == pytest.approx(-0.020744114)
    assert crowdsec.units("ip", "192.0.2.7") == ("192.0.2.7",)
    assert crowdsec.units("ip", "2001:db8:1:2::5") == ("2001:db8:1:2::",)
    assert crowdsec.units("ip", "::ffff:192.0.2.9") == ("192.0.2.9",)
    assert crowdsec.units("range", "192.0.2.4/30") == tuple(f"192.0.2.{i}" for i in (4, 5, 6, 7))
    assert len(crowdsec.units("range", "2001:db8:0:100::/56")) == 256
    assert crowdsec.units("range", "2001:db8:1:2::/80") == ("2001:db8:1:2::",)
    d = crowdsec.decision(ban(3, "192.0.2.7", "9999h"), NOW)
    assert d is not None and d.expires_at == NOW + 30 * 86400  # capped as `mtd watch` caps
    assert d.reason == "crowdsec crowdsecurity/ssh-bf"
    assert crowdsec.decision(ban(4, "192.0.2.7", "-1s"), NOW) is None  # already over


@pytest.mark.parametrize(
    ("item", "line"),
    [
        (ban(7, "10.0.0.0/16", scope="Range"),
         "decision 7: 10.0.0.0/16: 65536 addresses: mtd watches at most 256 sources for one "
         "decision (a /24 of IPv4)"),
        (ban(8, "2001:db8::/48", scope="Range"),
         "decision 8: 2001:db8::/48: 65536 /64s: mtd watches at most 256 sources for one "
         "decision (a /56 of IPv6)"),
        (ban(9, "192.0.2.7", type="captcha"),
         "decision 9: type 'captcha': mtd acts on ban decisions only"),
        (ban(10, "FR", scope="Country"), "decision 10: scope 'Country': expected Ip or Range"),
        (ban(11, "192.0.2.0/24"), "decision 11: '192.0.2.0/24': scope Ip: expected one address"),
        (ban(12, "not-an-ip"), "decision 12: 'not-an-ip': expected an address or a prefix"),
        (ban(13, "192.0.2.7", duration="forever"),
         "decision 13: duration 'forever': expected a Go duration such as 3h59m58s"),
        ({"id": "x"}, "decision id 'x': expected a whole number"),
        # A zone is refused as at every other entrance: a range's network address kept it,
        # and the fleet's watch hash then held a source libnftables refuses.
        (ban(14, "2001:db8::%eth0/64", scope="Range"),
         "decision 14: '2001:db8::%eth0/64': an IPv6 zone (%ZONE) names a local interface: "
         "expected an address without one"),
        (ban(15, "2001:db8::1%eth0"),
         "decision 15: '2001:db8::1%eth0': an IPv6 zone (%ZONE) names a local interface: "
         "expected an address without one"),
    ],
)  # fmt: skip
def test_what_mtd_cannot_express_is_refused_in_one_line(item: dict, line: str):
    with pytest.raises(WatchError) as err:
        crowdsec.decision(item, NOW)
    assert str(err.value) == line


def test_two_decisions_on_one_source_end_when_both_have():
    book = Book()
    assert book.full([ban(1, "192.0.2.7", "1h"), ban(2, "192.0.2.7", "2h")], NOW) == []
    before = book.units(NOW)
    assert before == {"192.0.2.7": (NOW + 7200, "crowdsec crowdsecurity/ssh-bf")}
    book.delta([], [ban(2, "192.0.2.7")], NOW)
    add, remove, _ = crowdsec.changes(before, book.units(NOW), NOW)
    assert [(e.source, e.expires_at) for e in add] == [("192.0.2.7", NOW + 3600)] and not remove
    after = book.units(NOW)
    book.delta([], [ban(1, "192.0.2.7")], NOW)
    assert crowdsec.changes(after, book.units(NOW), NOW)[:2] == ([], ["192.0.2.7"])


def test_a_resync_applies_nothing_twice_and_trusted_is_never_watched():
    import ipaddress

    book = Book()
    book.full([ban(1, "192.0.2.7"), ban(2, "203.0.113.9")], NOW)
    trusted = [ipaddress.ip_network("203.0.113.0/24")]
    first = book.units(NOW)
    add, remove, problems = crowdsec.changes({}, first, NOW, trusted)
    assert [e.source for e in add] == ["192.0.2.7"] and not remove
    assert problems == ["203.0.113.9: inside trusted 203.0.113.0/24: not watched"]
    assert all(e.origin == "crowdsec" for e in add)
    # the same list a second later (the Local API restarted): no change at all
    book.full([ban(1, "192.0.2.7", "59m59s"), ban(2, "203.0.113.9")], NOW + 1)
    assert crowdsec.changes(first, book.units(NOW + 1), NOW + 1, trusted)[:2] == ([], [])


class FakeLapi:
    """The stream as a Local API answers it, and its failures."""

    def __init__(self) -> None:
        self.decisions: dict[int, dict] = {}
        self.deleted: list[dict] = []
        self.down = False
        self.startups = 0

    def stream(self, startup: bool) -> tuple[list, list]:
        if self.down:
            raise lapi.LapiError("crowdsec http://127.0.0.1:8080: unreachable: refused")
        if startup:
            self.startups += 1
            self.deleted = []
            return list(self.decisions.values()), []
        new, self.new = getattr(self, "new", []), []
        deleted, self.deleted = self.deleted, []
        return new, deleted

    def add(self, item: dict) -> None:
        self.decisions[item["id"]] = item
        self.new = [*getattr(self, "new", []), item]

    def delete(self, ident: int) -> None:
        self.deleted.append(self.decisions.pop(ident))


def follower(client: FakeLapi, held: dict | None = None) -> Follower:
    import logging

    config = lapi.Config("http://127.0.0.1:8080", "/nonexistent", 1.0)
    return Follower(
        config, lambda orders: None, held=lambda: dict(held or {}), trusted=list,
        logger=logging.getLogger("test"), client=client,
    )  # fmt: skip


def test_the_follower_loses_nothing_while_the_lapi_is_away():
    api = FakeLapi()
    api.add(ban(1, "192.0.2.7"))
    # a previous run handed on 192.0.2.8, whose decision was deleted while mtd was down
    f = follower(api, held={"192.0.2.8": (NOW + 600, "crowdsec x")})
    orders = f.pull(NOW)
    assert sorted((o.op, o.source, o.origin) for o in orders) == [
        ("add", "192.0.2.7", "crowdsec"),
        ("del", "192.0.2.8", "crowdsec"),
    ]
    assert f.pull(NOW + 1) == []
    api.down = True
    with pytest.raises(MtdError):
        f.pull(NOW + 2)
    # while it was away: one decision deleted, one added (the deltas are gone with it)
    api.down = False
    api.delete(1)
    api.add(ban(2, "2001:db8:1:2::5"))
    api.deleted, api.new = [], []
    orders = f.pull(NOW + 3)
    assert api.startups == 2
    assert sorted((o.op, o.source) for o in orders) == [
        ("add", "2001:db8:1:2::"),
        ("del", "192.0.2.7"),
    ]
    assert f.pull(NOW + 4) == []


@contextmanager
def serving(
    body: bytes, status: int = 200, length: int | None = None, dribble: float = 0.0
) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            with suppress(OSError):
                if not dribble:
                    self.wfile.write(body)
                for i in range(len(body) if dribble else 0):  # a byte at a time, slowly
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(dribble)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _stream_in_a_box(url: str, total: float = 60.0) -> subprocess.CompletedProcess:
    code = (
        f"import sys\nfrom reconciler.adapters import crowdsec\ncrowdsec.TOTAL = {total}\n"
        "try:\n    print(crowdsec.Lapi(sys.argv[1], 'k' * 32).stream(True))\n"
        "except crowdsec.LapiError as e:\n    print(e)\n"
    )
    return subprocess.run(
        ["prlimit", "--as=600000000", "timeout", "30", sys.executable, "-c", code, url],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "length", "line"),
    [
        (b"x" * (lapi.MAX_BYTES + 10), 200, None,
         f"an answer of {lapi.MAX_BYTES + 1} bytes: expected at most {lapi.MAX_BYTES}"),
        (b"{}", 200, 1 << 40, f"an answer of {1 << 40} bytes: expected at most {lapi.MAX_BYTES}"),
        (b"[" * 100000, 200, None, "an answer that is not JSON: expected"),
        # Within the byte bound, but 11 million lists: 857 MB once parsed, at every pull.
        (b'{"new": [' + b"[]," * (lapi.MAX_BYTES // 3 - 10) + b'[]]}', 200, None,
         f"an answer of about {2 * (lapi.MAX_BYTES // 3 - 10) + 4} JSON values: expected at "
         f"most {lapi.MAX_VALUES}"),
        (b'{"new": {"a": 1}}', 200, None, "new is not a list: expected"),
        (b"", 403, None, "the bouncer key was refused (HTTP 403): expected a key made by "
         "`cscli bouncers add NAME -o raw` in crowdsec.key_file"),
    ],
)  # fmt: skip
def test_hostile_answers_are_bounded_and_refused_in_one_line(
    body: bytes, status: int, length: int | None, line: str
):
    with serving(body, status, length) as url:
        out = _stream_in_a_box(url)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith(f"crowdsec {url}: {line}"), out.stdout
    assert "k" * 32 not in out.stdout


def test_an_answer_dribbled_byte_by_byte_is_given_up_on_time():
    with serving(b'{"new": [' + b" " * 200, dribble=0.05) as url:
        start = time.monotonic()
        out = _stream_in_a_box(url, total=1.0)
        took = time.monotonic() - start
    assert out.stdout == (
        f"crowdsec {url}: an answer still coming after 1 s: expected the decision stream at once\n"
    ), out.stdout + out.stderr
    assert took < 5


def test_the_key_file_must_be_private(tmp_path: Path):
    key = tmp_path / "key"
    key.write_text("a" * 32 + "\n")
    key.chmod(0o644)
    with pytest.raises(MtdError) as err:
        lapi.read_key(str(key))
    assert str(err.value) == (
        f"{key}: crowdsec.key_file has mode 0644: expected 0600 (run: chmod 600 {key})"
    )
    key.chmod(0o600)
    assert lapi.read_key(str(key)) == "a" * 32


class CrowdsecDaemons(Daemons):
    """Daemon `a` follows the Local API in its namespace; `b` has only Redis."""

    crowdsec: dict[str, Any] | None = None

    def state(self, name: str) -> Path:
        (self.tmp / name).mkdir(exist_ok=True)
        extra = {"crowdsec": self.crowdsec} if name == "a" and self.crowdsec else {}
        return write_state(
            self.tmp / name / "state.yaml", template="dyn", redis=self.redis,
            trusted=["203.0.113.0/24"], **extra,
        )  # fmt: skip


def _added(events: list[dict], source: str) -> int:
    return sum(1 for e in events if e.get("event") == "watch" and source in e.get("added", []))


@pytest.mark.netns
@needs_crowdsec
@needs_redis
def test_real_crowdsec_decisions_reach_the_fleet_and_survive_a_lapi_restart(tmp_path: Path):
    from tests.test_bus_hostile import unix_redis

    with unix_redis(tmp_path / "r") as r, Lab(prefix="mtdcs") as lab:
        d = CrowdsecDaemons(lab, tmp_path, r.url)
        lab.add_server("a")
        with crowdsec_lapi(lab, "a", tmp_path / "cs") as cs:
            key = cs.bouncer_key(tmp_path / "bouncer.key")
            d.crowdsec = {"url": cs.url, "key_file": str(key), "interval": 0.3}
            d.start("a")
            d.start("b")
            cs.cscli("decisions", "add", "-i", "192.0.2.7", "-d", "1h", "-R", "ssh-bf")
            took = d.until(lambda: all("192.0.2.7" in d.dyn4(n) for n in ("a", "b")))
            assert took < 5
            assert 3500 < d.dyn4("b")["192.0.2.7"] <= 3600
            cs.cscli("decisions", "add", "-r", "198.51.100.4/30", "-d", "10m")
            cs.cscli("decisions", "add", "-i", "203.0.113.9", "-d", "10m")  # trusted
            quad = {f"198.51.100.{i}" for i in (4, 5, 6, 7)}
            d.until(lambda: quad <= set(d.dyn4("b")))
            # the Local API restarts: nothing lost, nothing applied again
            cs.stop()
            d.wait("a", lambda e: e.get("event") == "crowdsec" and "unreachable" in e["message"])
            cs.start()
            d.wait("a", lambda e: e.get("event") == "crowdsec" and "answers again" in e["message"])
            cs.cscli("decisions", "delete", "-i", "192.0.2.7")
            d.until(lambda: not any("192.0.2.7" in d.dyn4(n) for n in ("a", "b")))
            assert quad <= set(d.dyn4("a")) and quad <= set(d.dyn4("b"))
            assert "203.0.113.9" not in d.dyn4("a") and "203.0.113.9" not in d.dyn4("b")
            for name in ("a", "b"):
                assert _added(d.events(name), "192.0.2.7") == 1, d.events(name)
                assert _added(d.events(name), "198.51.100.5") == 1
            client = bus.connect(config(url=r.url))
            listed = json.loads(client.hget("mtd:epoch:watch", "198.51.100.5"))
            assert listed["origin"] == "crowdsec"
            logs = (tmp_path / "a.log").read_text()
            assert key.read_text().strip() not in logs
            assert "203.0.113.9: inside trusted 203.0.113.0/24: not watched" in logs
            for name in ("a", "b"):
                d.stop(name)
        # started again with the Local API gone: the store keeps what was decided
        d.start("a")
        d.until(lambda: quad <= set(d.dyn4("a")))


def test_a_watch_message_carries_its_origin_signed():
    cfg = config(signed=True)
    order = bus.WatchOrder("add", "192.0.2.7", 600, "crowdsec x", round(time.time(), 6), "crowdsec")
    raw = bus.encode_watch(cfg, order)
    assert bus.decode_watch(raw, cfg) == order
    msg = json.loads(raw)
    for forged in ({k: v for k, v in msg.items() if k != "origin"}, msg | {"origin": "cli"}):
        with pytest.raises(bus.BadMessage) as err:
            bus.decode_watch(json.dumps(forged), cfg)
        assert "signature" in str(err.value) or "origin 'cli'" in str(err.value), err.value
    plain = bus.WatchOrder("add", "192.0.2.7", 600, "", round(time.time(), 6))
    assert "origin" not in json.loads(bus.encode_watch(cfg, plain))  # as before: the fleet's


def test_crowdsec_is_a_host_setting_never_from_a_repository(tmp_path: Path):
    from tests.conftest import mtd

    path = write_state(
        tmp_path / "s.yaml", crowdsec={"url": "http://127.0.0.1:8080", "key_file": "/k"}
    )
    out = mtd("-s", str(path), "validate", "--repository")
    assert out.returncode == 1
    assert "crowdsec: a host-local setting: expected it only in the host's local" in out.stderr
    assert mtd("-s", str(path), "validate").returncode == 0


def test_ranges_cannot_grow_the_book_past_what_the_store_holds(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(crowdsec, "MAX_HELD", 600)
    book = Book()
    items = [ban(i, f"10.0.{i}.0/24", scope="Range") for i in range(3)]
    assert book.full(items, NOW) == [
        "decision 2: 256 more sources would pass the 600 mtd watches: not added"
    ]
    assert book.held == 512 and len(book.units(NOW)) == 512
    book.delta([], [ban(0, "10.0.0.0/24")], NOW)
    assert book.delta([items[2]], [], NOW) == [] and book.held == 512
    assert book.full(items[:2], NOW) == [] and book.held == 512  # a resync starts afresh


def test_a_reload_follows_a_changed_local_api_and_stops_a_removed_one(tmp_path: Path):
    import logging
    from types import SimpleNamespace

    from reconciler.adapters import files
    from reconciler.services import crowdsec as service
    from reconciler.services.daemon import Metrics

    key = tmp_path / "key"
    key.write_text("k" * 32)
    key.chmod(0o600)

    def state(url: str | None) -> Any:
        extra = {"crowdsec": {"url": url, "key_file": str(key), "interval": 60}} if url else {}
        return files.load_state(write_state(tmp_path / "s.yaml", **extra))

    first = state("http://127.0.0.1:1")
    daemon = SimpleNamespace(state=first, metrics=Metrics(), log=logging.getLogger("t"),
                             crowdsec=None, crowdsec_orders=lambda orders: None)  # fmt: skip
    daemon.crowdsec = service.reloaded(daemon, first)
    following = daemon.crowdsec
    assert following is not None and following.config.url == "http://127.0.0.1:1"
    assert service.reloaded(daemon, state("http://127.0.0.1:1")) is following  # unchanged
    other = service.reloaded(daemon, state("http://127.0.0.1:2"))
    assert other is not None and other.config.url == "http://127.0.0.1:2"
    assert not following._thread.is_alive()
    daemon.crowdsec = other
    assert service.reloaded(daemon, state(None)) is None
    assert not other._thread.is_alive()


def test_decisions_kept_while_redis_is_down_keep_their_origin(tmp_path: Path):
    from reconciler.adapters import watchstore

    epoch = tmp_path / "epoch"
    change = {"op": "add", "source": "192.0.2.7", "reason": "crowdsec x",
              "expires_at": NOW, "origin": "crowdsec"}  # fmt: skip
    forged = change | {"source": "192.0.2.8", "origin": "tripwire"}  # not an origin to publish
    watchstore.keep_unpublished(epoch, [change, forged])
    assert watchstore.take_unpublished(epoch) == [change]
