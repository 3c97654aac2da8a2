"""Dynamic watching without root: the entry rules (core.watch), the store, the element
transactions and the harvest against the in-memory kernel, the watch messages (pure), the
diff and the event-driven repair ignoring dynamic set contents, and the daemon applying a
watch message as a small transaction (never a pass) that a rotation keeps."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters import bus, files, watchstore
from reconciler.adapters.fake import FakeKernel
from reconciler.adapters.monitor import Change
from reconciler.core import diff, repair, watch
from reconciler.core.watch import Entry, WatchError
from reconciler.errors import MtdError
from reconciler.services import watching
from reconciler.services.daemon import Daemon, Metrics, Options
from reconciler.services.reconcile import reconcile
from tests.conftest import write_state
from tests.test_daemon_logic import NoBus, Recorder

KEY = b"k" * 32
NOW = 1_800_000_000.0

# A template with only the two dynamic sets, filled from `dynamic` as the contract says.
DYN_TEMPLATE = """{%- set T = table | tojson -%}
{"nftables": [
  {"add": {"table": {"family": "inet", "name": {{ T }}}}}
{%- for v, atype in [("4", "ipv4_addr"), ("6", "ipv6_addr")] %},
  {"add": {"set": {"family": "inet", "table": {{ T }}, "name": "dyn{{ v }}",
    "type": "{{ atype }}", "flags": ["timeout"]
    {%- if dynamic[v] %}, "elem": [
    {%- for src, left in dynamic[v] %}{"elem": {"val": {{ src | tojson }}, "timeout": {{ left }}}}
    {%- if not loop.last %}, {% endif %}{% endfor %}]{% endif %}}}}
{%- endfor %}
]}
"""


# -- entries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("192.0.2.7/32", "192.0.2.7"),
        (" 192.0.2.7 ", "192.0.2.7"),
        ("2001:db8:1:2::5", "2001:db8:1:2::"),
        ("2001:DB8:1:2:aa:bb:cc:dd", "2001:db8:1:2::"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack log's IPv4 client, not ::/64
        ("::FFFF:c000:207", "192.0.2.7"),
        ("2001:db8:1:2::/64", "2001:db8:1:2::"),
        ("2001:db8:1:2::9/64", "2001:db8:1:2::"),
    ],
)
def test_a_source_is_an_address_or_an_ipv6_64(text: str, want: str):
    assert watch.canonical(text) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("192.0.2.0/24", "expected an IPv4 address (a /32), not a prefix"),
        ("2001:db8::/48", "expected an IPv6 /64, not a prefix"),
        ("2001:db8::/128", "expected an IPv6 /64, not a prefix"),
        ("2001:db8::/x", "expected an IPv6 /64"),
        ("example.org", "not an address"),
        ("", "expected an IPv4 address"),
        ("1" * 500, "expected an IPv4 address"),
        ("::ffff:192.0.2.7/64", "IPv4-mapped: expected its IPv4 address 192.0.2.7"),  # not ::/64
    ],
)
def test_prefixes_and_garbage_are_refused_in_one_line(text: str, why: str):
    with pytest.raises(WatchError) as exc:
        watch.canonical(text)
    assert why in str(exc.value) and "\n" not in str(exc.value)


def test_a_trusted_source_is_refused_it_would_have_no_effect():
    with pytest.raises(
        WatchError, match=re.escape("inside trusted 203.0.113.0/24: would have no effect")
    ):
        watch.canonical("203.0.113.9", ["203.0.113.0/24"])
    with pytest.raises(WatchError, match="trusted 2001:db8:2::/64: would have no effect"):
        watch.canonical("2001:db8:2::77", ["2001:db8:2::/64"])
    assert watch.canonical("192.0.2.1", ["203.0.113.0/24", "2001:db8:2::/64"]) == "192.0.2.1"


@pytest.mark.parametrize(
    ("text", "want"), [("3600", 3600), ("10m", 600), ("1h", 3600), ("2d", 172800), ("45s", 45)]
)
def test_durations(text: str, want: int):
    assert watch.seconds(text) == want


@pytest.mark.parametrize("text", ["0", "31d", "1w", "-5", "1.5h", "", "9" * 20, "1h30m"])
def test_bad_durations_say_what_is_expected(text: str):
    with pytest.raises(WatchError, match="--for"):
        watch.seconds(text)


def test_reasons_are_bounded_and_printable():
    assert watch.reason("fail2ban sshd") == "fail2ban sshd"
    with pytest.raises(WatchError, match="201 characters: expected at most 200"):
        watch.reason("x" * 201)
    with pytest.raises(WatchError, match="printable text on one line"):
        watch.reason("a\nb")


def test_render_input_drops_expired_entries_and_keeps_the_time_left():
    entries = {
        "192.0.2.7": Entry("192.0.2.7", "cli", "", NOW + 100.9),
        "192.0.2.8": Entry("192.0.2.8", "redis", "", NOW - 1),
        "2001:db8:1:2::": Entry("2001:db8:1:2::", "tripwire", "tripwire", NOW + 5),
    }
    assert watch.dynamic(entries, NOW) == {"4": [("192.0.2.7", 100)], "6": [("2001:db8:1:2::", 5)]}
    assert watch.counts(entries, NOW) == {"cli": 1, "redis": 0, "tripwire": 1, "crowdsec": 0}


def test_render_input_never_exceeds_the_kernel_sets_size_and_keeps_operators_entries():
    entries = {
        f"192.0.2.{i}": Entry(f"192.0.2.{i}", "tripwire" if i % 2 else "cli", "", NOW + 10 + i)
        for i in range(1, 9)
    }
    got = watch.dynamic(entries, NOW, limit=5)
    # The four cli entries, then the tripwire entry with the most time left.
    assert sorted(s for s, _ in got["4"]) == sorted(
        ["192.0.2.2", "192.0.2.4", "192.0.2.6", "192.0.2.8", "192.0.2.7"]
    )
    assert watch.dynamic(entries, NOW)["4"] == sorted((s, 10 + int(s.rsplit(".")[-1]))
                                                      for s in entries)  # fmt: skip


def test_harvest_adds_what_only_the_kernel_holds_as_tripwire():
    entries = {"192.0.2.7": Entry("192.0.2.7", "cli", "ssh", NOW + 100)}
    kernel = watch.kernel_entries(
        [
            {"elem": {"val": "192.0.2.7", "timeout": 100, "expires": 90}},
            {"elem": {"val": "192.0.2.9", "timeout": 3600, "expires": 1200}},
            "192.0.2.10",
            {"elem": {"val": "2001:db8:5:6::", "timeout": 60, "expires": 0}},
        ]
    )
    merged = watch.harvest(entries, kernel, NOW)
    assert merged["192.0.2.7"].origin == "cli"  # the store's entry wins
    assert merged["192.0.2.9"] == Entry("192.0.2.9", "tripwire", "tripwire", NOW + 1200)
    assert merged["192.0.2.10"].origin == "tripwire"  # no timeout (by hand): a day
    assert "2001:db8:5:6::" not in merged  # expiring now


# -- the store -------------------------------------------------------------------------------


def test_the_store_round_trips_privately_and_drops_expired_entries(tmp_path: Path):
    path = tmp_path / "watch.json"
    entries = {
        "192.0.2.7": Entry("192.0.2.7", "cli", "x", NOW + 10),
        "192.0.2.8": Entry("192.0.2.8", "cli", "", NOW - 10),
    }
    watchstore.save(path, entries, NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert watchstore.load(path) == {"192.0.2.7": entries["192.0.2.7"]}


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        '{"entries": 5}',
        '{"entry": []}',
    ],
)
def test_a_damaged_store_is_one_line(tmp_path: Path, text: str):
    path = tmp_path / "watch.json"
    path.write_text(text)
    with pytest.raises(MtdError) as exc:
        watchstore.load(path)
    assert exc.value.problems == [
        f'{path}: unreadable watch store: expected {{"entries": [{{"source", "origin", '
        '"reason", "expires_at"}, ...]} (remove it to start afresh)'
    ]


def test_a_full_store_refuses_new_sources_in_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(watch, "MAX_ENTRIES", 2)
    entries: dict[str, Entry] = {}
    for n in (1, 2):
        assert watchstore.put(entries, Entry(f"192.0.2.{n}", "cli", "", NOW + 9), NOW) is None
    problem = watchstore.put(entries, Entry("192.0.2.3", "cli", "", NOW + 9), NOW)
    assert problem and problem.startswith("watch store full (2 live entries): 192.0.2.3 not added")
    # a source already there is renewed, full or not
    assert watchstore.put(entries, Entry("192.0.2.1", "cli", "", NOW + 99), NOW) is None
    assert set(entries) == {"192.0.2.1", "192.0.2.2"}


# -- store and kernel together ----------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> dict[str, Any]:
    """A state on the dynamic-sets template, its secret, and a fake kernel."""
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "dyn.json.j2").write_text(DYN_TEMPLATE)
    path = write_state(tmp_path / "state.yaml", template="dyn", redis={"min_interval": 0})
    state = files.load_state(path)
    secret = files.load_secret(state.secret_file, create=True)
    return {"path": path, "state": state, "secret": secret, "tpl": [tmp_path / "tpl"]}


def dyn(kernel: FakeKernel, name: str = "dyn4") -> dict[str, int]:
    return watch.kernel_entries(kernel.list_set("mtd", name) or [])


def replace(lab, kernel: FakeKernel, epoch: int = 0, *, check: bool = False, **kw):
    """A full pass as its callers run it (apply, rotate, the daemon, a pull round): the store
    gathered first, then the reconcile pass, which does no file I/O itself."""
    dynamic = watching.gather(lab["state"], kernel, write=not check)
    return reconcile(
        lab["state"],
        epoch,
        kernel,
        secret=lab["secret"],
        templates=lab["tpl"],
        check=check,
        dynamic=dynamic,
        **kw,
    )


def test_the_pass_alone_keeps_the_kernels_entries_and_writes_no_file(lab):
    kernel = FakeKernel()
    replace(lab, kernel)
    kernel.run(watch.commands("mtd", [("198.51.100.77", 500)]))
    store = watchstore.path_for(lab["state"].epoch_file)
    before = store.read_bytes() if store.exists() else None
    reconcile(lab["state"], 1, kernel, secret=lab["secret"], templates=lab["tpl"], read_live=False)
    assert 490 <= dyn(kernel)["198.51.100.77"] <= 500
    assert (store.read_bytes() if store.exists() else None) == before


def test_without_a_table_a_change_is_stored_only(lab):
    kernel = FakeKernel()
    out = watching.change(lab["state"], kernel, [Entry("192.0.2.7", "cli", "", time.time() + 60)])
    assert not out.kernel and "the store only" in out.line("mtd")
    assert kernel.transactions == []
    # ...and the next full replacement puts it in
    replace(lab, kernel)
    assert 58 <= dyn(kernel)["192.0.2.7"] <= 60


def test_add_and_del_are_one_small_transaction_each_and_a_pass_keeps_them(lab):
    kernel = FakeKernel()
    state = lab["state"]
    reconcile(state, 0, kernel, secret=lab["secret"], templates=lab["tpl"])
    out = watching.change(
        state,
        kernel,
        [
            Entry("192.0.2.7", "cli", "", time.time() + 600),
            Entry("2001:db8:1:2::", "cli", "", time.time() + 60),
        ],
    )
    assert out.kernel
    assert [t.op for t in kernel.applied] == ["replace", "run"]
    assert 598 <= dyn(kernel)["192.0.2.7"] <= 600
    assert "2001:db8:1:2::" in dyn(kernel, "dyn6")
    # re-adding renews the timeout (an `add` alone would not)
    watching.change(state, kernel, [Entry("192.0.2.7", "cli", "", time.time() + 9000)])
    assert dyn(kernel)["192.0.2.7"] >= 8990
    # a rotation (full replacement) keeps both, with the time left
    result = reconcile(
        state, 1, kernel, secret=lab["secret"], templates=lab["tpl"], read_live=False
    )
    assert result.status == "changed" and kernel.applied[-1].op == "replace"
    assert dyn(kernel)["192.0.2.7"] >= 8990 and "2001:db8:1:2::" in dyn(kernel, "dyn6")
    # del, twice (the second is a no-op that still succeeds)
    for _ in range(2):
        out = watching.change(state, kernel, remove=["192.0.2.7"])
        assert out.kernel and "192.0.2.7" not in dyn(kernel)
    assert "192.0.2.7" not in watchstore.load(watchstore.path_for(state.epoch_file))


def test_a_full_replacement_harvests_tripwire_entries_first(lab):
    kernel = FakeKernel()
    state = lab["state"]
    reconcile(state, 0, kernel, secret=lab["secret"], templates=lab["tpl"])
    # the kernel adds a source itself (the tripwire rule), the store does not know it
    kernel.run(watch.commands("mtd", [("198.51.100.77", 500)]))
    replace(lab, kernel, 1, read_live=False)
    assert 490 <= dyn(kernel)["198.51.100.77"] <= 500
    stored = watchstore.load(watchstore.path_for(state.epoch_file))
    assert stored["198.51.100.77"].origin == "tripwire"


def test_a_check_pass_reads_but_writes_no_store(lab):
    kernel = FakeKernel()
    reconcile(lab["state"], 0, kernel, secret=lab["secret"], templates=lab["tpl"])
    kernel.run(watch.commands("mtd", [("198.51.100.77", 500)]))
    store = watchstore.path_for(lab["state"].epoch_file)
    before = store.exists()
    replace(lab, kernel, check=True)
    assert store.exists() == before


def test_dynamic_set_contents_are_never_drift(lab):
    kernel = FakeKernel()
    state = lab["state"]
    reconcile(state, 0, kernel, secret=lab["secret"], templates=lab["tpl"])
    kernel.run(watch.commands("mtd", [("192.0.2.7", 500), ("2001:db8::", 9)]))
    watching.change(state, kernel, [Entry("192.0.2.9", "cli", "", time.time() + 60)])
    # every element, their timeouts and expiry: the compare sees no change
    result = reconcile(state, 0, kernel, secret=lab["secret"], templates=lab["tpl"], check=True)
    assert result.in_sync, result.changes
    # but the set itself is part of the table
    kernel.drift(
        "mtd", lambda t: t.remove(next(o for o in t if o.get("set", {}).get("name") == "dyn6"))
    )
    result = reconcile(state, 0, kernel, secret=lab["secret"], templates=lab["tpl"], check=True)
    assert [(c.op, c.kind, c.name) for c in result.changes] == [("+", "set", "dyn6")]


def test_element_events_of_the_dynamic_sets_need_no_repair():
    events = [("+", "element", "dyn4"), ("-", "element", "dyn6")]
    assert repair.plan("mtd", [], events) == []
    assert repair.plan("mtd", [], [*events, ("+", "element", "tcp4")]) is None
    t = diff.from_listing(
        [{"set": {"name": "dyn4", "type": "ipv4_addr", "elem": [{"elem": {"val": "192.0.2.1"}}]}}]
    )
    assert t.elements == {"dyn4": {}}


# -- watch messages -----------------------------------------------------------------------


def cfg(signed: bool = False) -> bus.BusConfig:
    return bus.BusConfig(
        url="redis://127.0.0.1:1/0",
        channel="mtd:rotate",
        epoch_key="mtd:epoch",
        signing_key=KEY if signed else None,
        max_message_bytes=512,
    )


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("op", ["add", "del"])
def test_watch_messages_round_trip(signed: bool, op: str):
    order = bus.WatchOrder(
        op, "192.0.2.7", 60 if op == "add" else 0, "f2b" if op == "add" else "", NOW
    )
    data = bus.encode_watch(cfg(signed), order)
    assert bus.decode_message(data, cfg(signed), now=NOW + 1) == order
    assert bus.decode_watch(data, cfg(signed)) == order


def _msg(**kw: Any) -> bytes:
    doc = {"watch": "add", "source": "192.0.2.7", "for": 60, "reason": "", "time": NOW} | kw
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_msg(watch="flush"), 'watch \'flush\': expected "add" or "del"'),
        (_msg(source="192.0.2.0/24"), "not a prefix"),
        (_msg(source="2001:db8:1:2::5"), "expected its canonical form 2001:db8:1:2::"),
        (_msg(source=["192.0.2.7"]), "expected an address as text"),
        (_msg(**{"for": 0}), "expected 1 second to 30 days"),
        (_msg(**{"for": "1h"}), "expected whole seconds"),
        (_msg(**{"for": None}), "no for"),
        (_msg(reason="x" * 300), "300 characters: expected at most 200"),
        (_msg(reason="a\nb"), "printable text"),
        (_msg(time=NOW - 3600), "expected within 300 s"),
        (_msg(time="now"), "expected the publish time"),
        (_msg(cmd="rm"), "unknown key 'cmd'"),
        (json.dumps({"epoch": 3, "time": NOW, "source": "x"}).encode(), "unknown key 'source'"),
        (
            json.dumps({"watch": "del", "source": "192.0.2.7", "for": 5, "time": NOW}).encode(),
            "del: expected no for",
        ),
        (b"x" * 600, "600 bytes: expected at most 512"),
    ],
)
def test_malformed_watch_messages_are_one_line(data: bytes, why: str):
    with pytest.raises(bus.BadMessage) as exc:
        bus.decode_message(data, cfg(), now=NOW)
    assert why in str(exc.value) and "\n" not in str(exc.value)


def test_with_a_signing_key_watch_messages_must_be_signed_with_it():
    unsigned = bus.encode_watch(cfg(), bus.WatchOrder("add", "192.0.2.7", 60, "", NOW))
    with pytest.raises(bus.BadMessage, match="unsigned"):
        bus.decode_message(unsigned, cfg(True), now=NOW)
    signed = json.loads(
        bus.encode_watch(cfg(True), bus.WatchOrder("add", "192.0.2.7", 60, "", NOW))
    )
    for field, value in [("for", 6000), ("source", "192.0.2.8"), ("reason", "x"), ("watch", "del")]:
        forged = dict(signed, **{field: value})
        if value == "del":
            forged.pop("for"), forged.pop("reason")
        with pytest.raises(bus.BadMessage, match="bad signature"):
            bus.decode_message(json.dumps(forged).encode(), cfg(True), now=NOW)
    # a rotation's signature is never a watch's
    trigger = json.loads(bus.encode(cfg(True), 5, NOW))
    with pytest.raises(bus.BadMessage):
        bus.decode_message(
            json.dumps(dict(signed, sig=trigger["sig"])).encode(), cfg(True), now=NOW
        )


# -- the daemon ------------------------------------------------------------------------------


class DaemonRun:
    def __init__(self, lab: dict[str, Any], kernel: FakeKernel | None = None) -> None:
        self.kernel = kernel or FakeKernel()
        self.log = Recorder()
        logger = logging.getLogger(f"mtd.watchtest{id(self)}")
        logger.addHandler(self.log)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        self.metrics = Metrics()
        self.daemon = Daemon(
            lambda: files.load_state(lab["path"]),
            self.kernel,
            templates=lab["tpl"],
            host="h1",
            options=Options(drift_interval=600, start_wait=0),
            metrics=self.metrics,
            logger=logger,
            subscribe=NoBus,
        )
        self.thread = threading.Thread(target=self.daemon.serve, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()


def test_the_daemon_applies_a_watch_as_an_element_transaction_and_a_rotation_keeps_it(lab):
    r = DaemonRun(lab)
    try:
        r.log.wait(lambda e: e["event"] == "reconcile" and e.get("result") == "changed")
        mark = len(r.log.events)
        passes = len(r.kernel.applied)
        r.daemon.watch(bus.WatchOrder("add", "192.0.2.7", 600, "ids", time.time()))
        ev = r.log.wait(lambda e: e["event"] == "watch", mark)
        assert ev["kernel"] is True and ev["added"] == ["192.0.2.7"]
        assert [t.op for t in r.kernel.applied[passes:]] == ["run"]  # not a replacement
        assert r.metrics.watched.labels("redis")._value.get() == 1
        # a rotation keeps it, with its time left
        r.daemon.trigger(bus.Trigger(1, time.time(), "message"))
        r.log.wait(lambda e: e["event"] == "reconcile" and e.get("epoch") == 1, mark)
        assert 590 <= dyn(r.kernel)["192.0.2.7"] <= 600
        # an `nft add element` by someone else is runtime state: no repair
        r.daemon.changed(Change(99, 4242, "nft", [("+", "element", "dyn4")]))
        r.daemon.watch(bus.WatchOrder("del", "192.0.2.7", 0, "", time.time()))
        r.log.wait(lambda e: e["event"] == "watch" and e.get("removed") == ["192.0.2.7"], mark)
        assert "192.0.2.7" not in dyn(r.kernel)
        assert not [e for e in r.log.events[mark:] if e["event"] == "drift"]
    finally:
        r.stop()


def test_a_restarted_daemon_puts_back_what_the_store_holds(lab):
    r = DaemonRun(lab)
    try:
        r.log.wait(lambda e: e["event"] == "reconcile" and e.get("result") == "changed")
        r.daemon.watch(bus.WatchOrder("add", "192.0.2.7", 600, "", time.time()))
        r.log.wait(lambda e: e["event"] == "watch")
    finally:
        r.stop()
    fresh = FakeKernel()  # the table was lost with the host's reboot
    r2 = DaemonRun(lab, fresh)
    try:
        r2.log.wait(lambda e: e["event"] == "reconcile" and e.get("result") == "changed")
        assert 590 <= dyn(fresh)["192.0.2.7"] <= 600
    finally:
        r2.stop()


def test_the_store_is_private_next_to_the_epoch_file(lab):
    watching.change(lab["state"], FakeKernel(), [Entry("192.0.2.7", "cli", "", time.time() + 9)])
    path = Path(lab["state"].epoch_file).with_name("watch.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_an_ipv4_mapped_source_inside_trusted_is_refused_as_its_ipv4_address():
    with pytest.raises(WatchError, match="trusted"):
        watch.canonical("::ffff:203.0.113.5", [ipaddress.ip_network("203.0.113.0/24")])


def test_a_store_full_of_trips_still_takes_an_operators_entry(monkeypatch: pytest.MonkeyPatch):
    """Trips fill the store at the next harvest (65,536 spoofed IPv4 sources and the
    65,536 /64s of one /48 are more than it holds): `mtd watch add` (fail2ban's ban) and
    watch messages must still be stored, in place of the trip with the least time left."""
    monkeypatch.setattr(watch, "MAX_ENTRIES", 3)
    entries = {
        f"2001:db8:1:{n}::": Entry(f"2001:db8:1:{n}::", "tripwire", "tripwire", NOW + 9 + n)
        for n in range(3)
    }
    for origin in ("cli", "redis"):
        ban = Entry(f"192.0.2.{len(origin)}", origin, "fail2ban sshd", NOW + 60)
        assert watchstore.put(entries, ban, NOW) is None
        assert ban.source in entries and len(entries) == 3
    assert set(entries) == {"192.0.2.3", "192.0.2.5", "2001:db8:1:2::"}
    # A trip never pushes out anything, and operators' entries are never dropped.
    trip = Entry("198.51.100.9", "tripwire", "tripwire", NOW + 600)
    assert watchstore.put(entries, trip, NOW) is not None
    monkeypatch.setattr(watch, "MAX_ENTRIES", 2)
    assert watchstore.put(entries, Entry("192.0.2.9", "cli", "", NOW + 9), NOW) is None
    assert watchstore.put(entries, Entry("192.0.2.10", "cli", "", NOW + 9), NOW) is not None


def test_a_trusted_prefix_inside_a_64_leaves_the_rest_of_it_to_watch(lab):
    """A trusted /80 (a partner's range) or /128 inside a /64 must not make a ban of
    another address of that /64 fail ('would have no effect': it would have one), nor
    drop that /64's entry (a trip, a watch message) from the next table."""
    for trusted in ("2001:db8:2::/80", "2001:db8:2::/128"):
        assert watch.canonical("2001:db8:2:0:ffff::5", [trusted]) == "2001:db8:2::"
    with pytest.raises(WatchError, match="would have no effect"):
        watch.canonical("2001:db8:2:0:ffff::5", ["2001:db8:2::/48"])
    state = dataclasses.replace(lab["state"], trusted=(ipaddress.ip_network("2001:db8:2::/80"),))
    entries = {"2001:db8:2::": Entry("2001:db8:2::", "tripwire", "tripwire", NOW + 60)}
    assert watching._render_input(state, entries, NOW)["6"] == [("2001:db8:2::", 60)]
