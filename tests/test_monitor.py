"""Root-free: the netlink parser of `adapters.monitor` and the repair planner of
`core.repair`, on hand-built nf_tables messages and rendered skeletons."""

from __future__ import annotations

import struct

from reconciler.adapters import monitor
from reconciler.core import repair, shuffle

SUBSYS = monitor.NFNL_SUBSYS_NFTABLES << 8


def nla(kind: int, value: bytes) -> bytes:
    body = struct.pack("=HH", 4 + len(value), kind) + value
    return body + bytes(-len(body) % 4)


def msg(msg_type: int, family: int, *attrs: bytes) -> bytes:
    payload = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(payload), SUBSYS | msg_type, 0, 0, 0) + payload


def newgen(gen: int, pid: int, name: str) -> bytes:
    return msg(15, 0, nla(1, struct.pack("!I", gen)), nla(2, struct.pack("!I", pid)),
               nla(3, name.encode() + b"\0"))  # fmt: skip


def rule(op: int, table: str, chain: str, family: int = monitor.NFPROTO_INET) -> bytes:
    return msg(op, family, nla(1, table.encode() + b"\0"), nla(2, chain.encode() + b"\0"))


def test_only_foreign_transactions_on_the_owned_table_are_reported():
    p = monitor.Parser("mtd", own=lambda pid: pid == 42)
    stream = (
        rule(8, "mtd", "raw_output") + rule(6, "mtd", "nat") + newgen(7, 1000, "nft")
        + rule(8, "other", "c") + newgen(8, 1001, "iptables")  # another table
        + rule(8, "mtd", "c", family=2) + newgen(9, 1002, "nft")  # ip mtd, not inet mtd
        + rule(8, "mtd", "raw_output") + newgen(10, 42, "mtd")  # our own
        + rule(8, "mtdx", "c") + newgen(11, 1003, "nft")  # a name that only starts alike
    )  # fmt: skip
    changes = p.feed(stream)
    assert [(c.generation, c.pid, c.process) for c in changes] == [(7, 1000, "nft")]
    assert changes[0].what == [("-", "rule", "raw_output"), ("+", "rule", "nat")]
    assert changes[0].text() == "-rule raw_output, +rule nat"
    assert p.generation == 11


def test_garbage_and_truncated_messages_do_not_raise():
    p = monitor.Parser("mtd", own=lambda pid: False)
    good = rule(8, "mtd", "c") + newgen(3, 5, "nft")
    for data in (b"", b"\0" * 19, b"\xff" * 64, good[:30], struct.pack("=IHHII", 3, 0, 0, 0, 0)):
        assert p.feed(data) == []
    assert len(p.feed(good)) == 1


SKELETON = [
    {"add": {"table": {"family": "inet", "name": "mtd"}}},
    {"add": {"map": {"family": "inet", "table": "mtd", "name": "tcp4", "type": "x"}}},
    {"add": {"chain": {"family": "inet", "table": "mtd", "name": "nat", "hook": "prerouting"}}},
    {"add": {"rule": {"family": "inet", "table": "mtd", "chain": "nat", "expr": [1]}}},
    {"add": {"rule": {"family": "inet", "table": "mtd", "chain": "nat", "expr": [2]}}},
    {"add": {"chain": {"family": "inet", "table": "mtd", "name": "out", "hook": "output"}}},
]


def test_chain_and_rule_changes_are_repaired_chain_by_chain():
    batch = repair.plan(
        "mtd", SKELETON, [("-", "rule", "nat"), ("+", "chain", "evil"), ("+", "set", "bad"),
                          ("+", "set", "__set0")],
    )  # fmt: skip
    assert batch is not None
    verbs = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in batch]
    assert verbs == [
        ("add", "chain"), ("add", "chain"), ("flush", "chain"), ("flush", "chain"),
        ("delete", "chain"), ("delete", "chain"), ("delete", "set"),
        ("add", "chain"), ("add", "rule"), ("add", "rule"),
    ]  # fmt: skip
    assert batch[-3] == SKELETON[2]  # the desired chain, with its hook and policy


def test_anything_else_means_replacing_the_table():
    for event in (("-", "table", ""), ("-", "element", "tcp4"), ("-", "set", "tcp4"),
                  ("+", "object", "c"), ("+", "table", "")):  # fmt: skip
        assert repair.plan("mtd", SKELETON, [("-", "rule", "nat"), event]) is None


def test_packet_totals_never_go_down_across_replacements():
    from reconciler.services.daemon import Packets

    live: dict[str, int] | None = {"moved_ip": 5, "real_port_ip": 1}
    p = Packets(lambda: live)
    assert p.totals()["moved_ip"] == 5 and p.totals()["stateless_ip6"] == 0
    p.replaced(p.snapshot(live))  # a rotation: the new table's counters start at zero
    live = {"moved_ip": 2, "real_port_ip": 0}
    assert p.totals()["moved_ip"] == 7 and p.totals()["real_port_ip"] == 1
    live = None  # the table deleted by hand: the last values seen are kept
    assert p.totals()["moved_ip"] == 7
    p.replaced(p.snapshot(None))
    live = {"moved_ip": 0}  # a scrape between the replacement and the carry never dips
    assert p.totals()["moved_ip"] == 7


def test_lost_events_mean_a_full_compare_and_say_so(tmp_path, caplog):
    """Root-free: the daemon's bookkeeping only (no pass runs, nothing touches the kernel)."""
    import logging

    from reconciler.adapters import files
    from reconciler.services.daemon import Daemon, Options
    from tests.conftest import write_state

    state = write_state(tmp_path / "state.yaml")
    files.load_secret(tmp_path / "secret", create=True)  # provisioned: start asks no kernel
    d = Daemon(lambda: files.load_state(state), object(), host="h", options=Options())
    d._trusted, d._dirty, d._covered = True, False, 10
    stale = monitor.Change(9, 1, "nft", [("-", "rule", "c")])  # before the last replacement
    d.changed(stale)
    d._drain(0)
    assert not d._dirty and not d._foreign  # already overwritten: nothing to do
    d.changed(monitor.Change(11, 1, "nft", [("-", "rule", "c")]))
    d._drain(0)
    assert d._dirty and len(d._foreign) == 1 and d._trusted  # repaired from the events
    with caplog.at_level(logging.WARNING, logger="mtd"):
        d.lost("netlink buffer overrun (ENOBUFS): events were lost")
        d._drain(0)
    assert not d._trusted and d._dirty  # the next pass compares in full
    assert "comparing the table in full" in caplog.text and "ENOBUFS" in caplog.text
    assert d.metrics.events_lost._value.get() == 1


# Element events as the kernel sent them (6.18, nft 1.0.6), captured from a namespace with
# `adapters.monitor`'s socket: `add element inet mtd tcp4 { 192.0.2.3 . 3 : 5000 }` and so on.
CAPTURED = {
    "+tcp4": "4c0000000c0a000400000000bc5b000001000003080001006d746400090002007463703400000000"
    "2400030020000100100001000c000100c0000203000300000c0002000600010013880000",
    "-tcp4": "4c0000000e0a000000000000bd5b000001000004080001006d746400090002007463703400000000"
    "2400030020000100100001000c000100c0000203000300000c0002000600010013880000",
    "+tcp6": "580000000c0a000400000000be5b000001000005080001006d746400090002007463703600000000"
    "300003002c0001001c0001001800010020010db8000000000000000000000003000300000c0002000600"
    "010013880000",
    "+tcp4_net": "600000000c0a000400000000bf5b000001000006080001006d7464000d000200746370345f6e65"
    "74000000003400030030000100100001000c0001000a0000000003000010000a000c0001000affffff00"
    "0300000c0002000600010013880000",
    "+svc_tcp": "3c0000000c0a000400000000c05b000001000007080001006d7464000c0002007376635f746370"
    "0014000300100001000c0001000600010000160000",
    "+src4": "3c0000000c0a000400000000c15b000001000008080001006d746400090002007372633400000000"
    "14000300100001000c00010008000100c0000209",
    # `add element inet mtd net4 { 10.0.0.0/8 }` (interval set): nft's 0.0.0.0 end element,
    # then the start and the end (flagged) of the interval, in three messages.
    "+net4": "440000000c0a000400000000c25b000001000009080001006d746400090002006e65743400000000"
    "1c000300180001000c000100080001000000000008000300000000013c0000000c0a000400000000c25b"
    "000001000009080001006d746400090002006e6574340000000014000300100001000c00010008000100"
    "0a000000440000000c0a000400000000c25b000001000009080001006d746400090002006e6574340000"
    "00001c000300180001000c000100080001000b0000000800030000000001",
}
NEWGEN_NFT = newgen(23501, 1234, "nft")
MAPS = {
    "tcp4": {"type": ["ipv4_addr", "inet_service"], "map": "inet_service"},
    "tcp6": {"type": ["ipv6_addr", "inet_service"], "map": "inet_service"},
    "tcp4_net": {"type": ["ipv4_addr", "inet_service"], "map": "inet_service",
                 "flags": ["interval"]},
}  # fmt: skip
SETS = {
    "svc_tcp": {"type": "inet_service"},
    "src4": {"type": "ipv4_addr"},
    "net4": {"type": "ipv4_addr", "flags": ["interval"]},
}


def _decoded(name: str) -> list[tuple[str, str, str | None]]:
    from reconciler.core import elements as el

    p = monitor.Parser("mtd", own=lambda pid: False)
    (change,) = p.feed(bytes.fromhex(CAPTURED[name]) + NEWGEN_NFT)
    assert change.undecoded == ""
    out = []
    for e in change.elements:
        kind = "map" if e.set in MAPS else "set"
        t = el.SetType.of(kind, {**MAPS, **SETS}[e.set])
        assert t is not None
        text, _ = el.key(t, e.key, e.key_end, e.flags)
        value = el.value(t, e.data)
        out.append((f"{e.op}{e.set}", text, value[0] if value else None))
    return out


def test_captured_element_events_decode_into_the_diffs_form():
    assert _decoded("+tcp4") == [("+tcp4", "192.0.2.3 . 3", "5000")]
    assert _decoded("-tcp4") == [("-tcp4", "192.0.2.3 . 3", "5000")]  # a deletion names it too
    assert _decoded("+tcp6") == [("+tcp6", "2001:db8::3 . 3", "5000")]
    assert _decoded("+tcp4_net") == [("+tcp4_net", "10.0.0.0/8 . 3", "5000")]  # key .. key end
    assert _decoded("+svc_tcp") == [("+svc_tcp", "22", None)]
    assert _decoded("+src4") == [("+src4", "192.0.2.9", None)]
    p = monitor.Parser("mtd", own=lambda pid: False)
    (change,) = p.feed(bytes.fromhex(CAPTURED["-tcp4"]) + NEWGEN_NFT)
    assert change.what == [("-", "element", "tcp4")] and change.text() == "-element tcp4"


def test_interval_set_elements_and_bad_layouts_are_not_guessed():
    import pytest

    from reconciler.core import elements as el

    with pytest.raises(el.Undecodable, match="start and end"):
        _decoded("+net4")
    t = el.SetType.of("map", MAPS["tcp4"])
    assert t is not None
    with pytest.raises(el.Undecodable, match="expected 8"):
        el.key(t, bytes(6), None, 0)  # a concatenation without its register padding
    with pytest.raises(el.Undecodable, match="without intervals"):
        el.key(t, bytes(8), bytes(8), 0)
    with pytest.raises(el.Undecodable):
        el.value(t, bytes(4))
    assert el.SetType.of("map", {"type": "ipv4_addr", "map": "verdict"}) is None
    assert el.SetType.of("set", {"typeof": "ip saddr"}) is None
    # A truncated message: reported as undecoded, the element still counted as an event.
    p = monitor.Parser("mtd", own=lambda pid: False)
    data = bytearray.fromhex(CAPTURED["+tcp4"])
    data[48:50] = struct.pack("=H", 200)  # the elements attribute overruns its message
    (change,) = p.feed(bytes(data) + NEWGEN_NFT)
    assert change.undecoded and change.elements == [] and change.what == [("+", "element", "tcp4")]


def _rendered(tmp_path):
    from reconciler.adapters import files
    from reconciler.core import diff, elements, render, shuffle
    from tests.conftest import write_state

    state = files.load_state(write_state(tmp_path / "state.yaml"))
    mapping = shuffle.compute(state, b"s" * 32, 0)
    commands = render.render(state, mapping)
    return diff.skeleton_commands(commands), elements.Desired.from_commands(commands), mapping


def _raw(op: str, name: str, addr: str, port: int, to: int | None = None):
    import socket

    key = socket.inet_pton(socket.AF_INET, addr) + struct.pack("!H", port) + bytes(2)
    data = None if to is None else struct.pack("!H", to)
    return monitor.RawElement(op, name, key, None, data)


def test_element_repair_puts_back_just_the_touched_elements(tmp_path):
    skeleton, desired, mapping = _rendered(tmp_path)
    inbound = shuffle.inbound(mapping.moves[("192.0.2.3", "tcp")])  # tcp4: shown -> real
    (a, to_a), (b, to_b), (c, to_c) = sorted(inbound.items())[:3]
    deleted = _raw("-", "tcp4", "192.0.2.3", a, to_a)
    changed = [_raw("-", "tcp4", "192.0.2.3", b, to_b), _raw("+", "tcp4", "192.0.2.3", b, 77)]
    extra = _raw("+", "tcp4", "192.0.2.99", 80, 8080)
    back = [_raw("-", "tcp4", "192.0.2.3", c), _raw("+", "tcp4", "192.0.2.3", c, to_c)]
    out = repair.elements("mtd", skeleton, desired, [deleted, *changed, extra, *back])
    assert not isinstance(out, str), out
    batch, changes = out
    concat = {"concat": ["192.0.2.3", b]}
    assert batch == [
        {"delete": {"element": {"family": "inet", "table": "mtd", "name": "tcp4",
                                "elem": [concat, {"concat": ["192.0.2.99", 80]}]}}},
        {"add": {"element": {"family": "inet", "table": "mtd", "name": "tcp4",
                             "elem": [[{"concat": ["192.0.2.3", a]}, to_a], [concat, to_b]]}}},
    ]  # fmt: skip
    assert [c.op for c in changes] == ["+", "~", "-"]  # restored, value put back, removed
    # The dynamic sets are runtime state; elements of a set mtd does not define, or of a type
    # it cannot read, mean replacing the table (and the reason says so).
    dyn = monitor.RawElement("+", "dyn4", bytes(4))
    assert repair.elements("mtd", skeleton, desired, [dyn]) == ([], [])
    nope = _raw("+", "nope", "192.0.2.1", 1)
    assert "does not define" in str(repair.elements("mtd", skeleton, desired, [nope]))
    net = monitor.RawElement("+", "net4", bytes(4), None, None, 1)
    assert "start and end" in str(repair.elements("mtd", skeleton, desired, [net]))


def test_desired_elements_are_found_by_source_without_a_copy_per_element(tmp_path):
    _, desired, mapping = _rendered(tmp_path)
    moves = mapping.moves[("192.0.2.3", "tcp")]
    for shown, real in shuffle.inbound(moves).items():  # both maps, from the same rows
        assert desired.get("tcp4", f"192.0.2.3 . {shown}") == (True, str(real))
        assert desired.get("tcp4_out", f"192.0.2.3 . {real}") == (True, str(shown))
    assert desired.get("tcp4", "192.0.2.3 . 1") == (False, None)  # ignored port: not moved
    assert desired.get("tcp4_out", "192.0.2.3 . 1") == (False, None)
    assert desired.get("tcp4", "192.0.2.4 . 3") == (False, None)
    rows, _ = desired._index["tcp4"]
    assert rows["192.0.2.3"][1] is moves  # the shuffle's own dict, not a copy
    net = shuffle.inbound(mapping.moves[("198.51.100.0/24", "tcp")])
    p = next(iter(net))
    assert desired.get("tcp4_net", f"198.51.100.0/24 . {p}") == (True, str(net[p]))
    assert desired.get("svc_tcp", "3") == (True, None)
    assert desired.get("svc_tcp", "6") == (False, None)


class _Socket:
    """A stand-in for the netlink socket: what it holds, and the membership calls made."""

    def __init__(self, held: list[bytes]) -> None:
        self.held, self.calls = held, []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.calls.append(option)

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.held:
            raise BlockingIOError
        return self.held.pop(0)


def _window(monkeypatch, held: list[bytes], generations: list[int], fed: bytes = b"", own=0):
    """One `quiet` window, `own` commits in it, on a monitor that has seen generation 10
    and fed `fed`; what it reported through its callbacks."""
    got: list[tuple[str, object]] = []
    m = monitor.Monitor("mtd")
    m._changed = lambda c: got.append(("changed", c))
    m._lost = lambda r: got.append(("lost", r))
    m._parser.generation, m._parser.synced = 10, True
    m._parser.feed(fed)
    m._sock = _Socket(held)  # type: ignore[assignment]
    monkeypatch.setattr(monitor, "generation", lambda: generations.pop(0))
    commits = iter([0, own])
    with m.quiet(lambda: next(commits)):
        pass
    return got


def test_a_foreign_transaction_at_the_edge_of_an_own_window_is_never_swallowed(monkeypatch):
    """The cause found for a repair once missed: leaving the group threw away the events the
    reader had parsed of a foreign transaction whose NEWGEN it had not read yet, and the
    generation, read after leaving, already counted that transaction as seen."""
    element = bytes.fromhex(CAPTURED["-tcp4"])
    gen11 = newgen(11, 1234, "nft")
    # Its events read, its NEWGEN still in the socket: the window reads it and hands it on.
    got = _window(monkeypatch, [gen11], [11, 11], fed=element)
    assert [k for k, _ in got] == ["changed"], got
    assert got[0][1].what == [("-", "element", "tcp4")]  # type: ignore[union-attr]
    # Cut off by leaving the group (NEWGEN never delivered): reported as lost.
    got = _window(monkeypatch, [], [11, 11], fed=element)
    assert got == [("lost", "a transaction by another process was cut off by mtd's own")]
    # Committed, nothing delivered before the group was left: the generation says so.
    got = _window(monkeypatch, [], [11, 11])
    assert [k for k, _ in got] == ["lost"] and "generation 11" in str(got[0][1]), got
    # Nothing foreign: nothing reported (the own commit moves the generation by one)...
    assert _window(monkeypatch, [], [10, 11], own=1) == []
    # ...and one more than the own commits is someone else's.
    got = _window(monkeypatch, [], [10, 12], own=1)
    assert got == [("lost", "1 transaction(s) by other processes during mtd's own")]
