"""Root-free: the netlink parser of `adapters.monitor` and the repair planner of
`core.repair`, on hand-built nf_tables messages and rendered skeletons."""

from __future__ import annotations

import struct

from reconciler.adapters import monitor
from reconciler.core import repair

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
