from pathlib import Path

import pytest

from reconciler.adapters.files import load_state
from reconciler.core import shuffle, templates
from reconciler.core.state import parse
from reconciler.errors import MtdError
from tests.conftest import write_state


def parse_one(text: str):
    return parse([("s.yaml", text)])


def error_of(text: str) -> str:
    with pytest.raises(MtdError) as exc:
        parse_one(text)
    return str(exc.value)


BASE = "ports: {range: [1, 20], services: {tcp: [1, 2, 3]}}\n"


def test_minimal_state_gets_defaults():
    s = parse_one(BASE)
    assert (s.table, s.template, s.ownership) == ("mtd", "maps", "table")
    assert s.epoch_file == "/var/lib/mtd/epoch"
    assert s.services == {"tcp": (1, 2, 3), "udp": ()}


def test_invalid_yaml_names_file_and_line():
    msg = error_of(BASE + "watched: [\n  {source: 1\n")
    assert msg.startswith("s.yaml:") and "invalid YAML" in msg
    assert "\n" not in msg


def test_schema_error_names_key_path_and_line():
    msg = error_of(BASE + "watched:\n  - source: 192.0.2.3\n    ignore: {tcp: [70000]}\n")
    assert msg == "s.yaml:4: watched[0].ignore.tcp[0]: 70000: expected at most 65535"


def test_unknown_key_is_named_in_the_file_that_has_it(tmp_path: Path):
    assert error_of(BASE + "tabel: x\n").startswith("s.yaml:2: tabel: unknown key: expected one of")
    write_state(tmp_path / "10-base.yaml")
    (tmp_path / "05-typo.yaml").write_text("ports:\n  rnage: [1, 2]\n")
    with pytest.raises(MtdError) as exc:
        load_state(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path / '05-typo.yaml'}:2: ports.rnage: unknown key")


def test_bad_address_is_named():
    msg = error_of(BASE + "watched: [{source: 192.0.2.300}]\n")
    assert msg.startswith("s.yaml:2: watched[0].source: '192.0.2.300' is not an address")


def test_host_bits_in_prefix():
    assert "has host bits set" in error_of(BASE + "watched: [{source: 192.0.2.3/24}]\n")


@pytest.mark.parametrize(
    ("key", "given", "expected"),
    [
        ("watched: [{source: '%s'}]", "::ffff:192.0.2.3", "192.0.2.3"),
        ("watched: [{source: '%s'}]", "::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("trusted: ['%s']", "::ffff:203.0.113.0/120", "203.0.113.0/24"),
        ("trusted: ['%s']", "::ffff:0:0/96", "0.0.0.0/0"),
    ],
)
def test_an_ipv4_mapped_source_is_refused_with_its_ipv4_form(key: str, given: str, expected: str):
    """No packet carries an IPv4-mapped source: taken as written, a watched entry would
    hide nothing and a trusted one exempt no one, silently."""
    msg = error_of(BASE + key % given + "\n")
    assert msg.endswith(f"{given!r} is IPv4-mapped: expected its IPv4 form {expected}")


@pytest.mark.parametrize(
    "key", ["watched: [{source: '%s'}]", "watched: [{source: '%s', per_source: true}]",
            "trusted: ['%s']"],
)  # fmt: skip
@pytest.mark.parametrize("given", ["2001:db8::1%eth0", "2001:db8::%x/64", "fe80::1%1"])
def test_an_ipv6_zone_is_refused_where_the_kernel_would_refuse_it(key: str, given: str):
    """libnftables refuses a zone in a set element: `validate` said ok to a commit that every
    host's kernel then refused. The same line as `mtd watch` gives a dynamic entry."""
    msg = error_of(BASE + key % given + "\n")
    assert msg.endswith(
        f"{given!r} has an IPv6 zone (%ZONE), which names a local interface: expected an "
        "address or prefix without one"
    )


def test_prefixes_around_the_ipv4_mapped_range_are_kept():
    s = parse_one(BASE + "watched: [{source: '::/64'}, {source: '::fffe:0:0/95'}]\n")
    assert [str(w.source) for w in s.watched] == ["::/64", "::fffe:0:0/95"]
    assert parse_one(BASE + "watched: [{source: '::/0', per_source: true}]\n").watched


def test_duplicate_source():
    msg = error_of(BASE + "watched: [{source: 192.0.2.3}, {source: 192.0.2.3/32}]\n")
    assert "watched[1].source" in msg and "already watched[0]" in msg


def test_range_too_small_names_source_protocol_and_counts():
    msg = error_of(
        "ports: {range: [1, 2], services: {tcp: [1, 2, 3]}}\nwatched: [{source: 192.0.2.3}]\n"
    )
    assert "192.0.2.3: tcp moves 3 ports but ports.range [1, 2] has only 2 tcp ports" in msg
    # A template that writes swaps draws from the free ports only (classic).
    five = "ports: {range: [1, 5], services: {tcp: [1, 2, 3]}}\nwatched: [{source: 192.0.2.3}]\n"
    msg = error_of("template: classic\n" + five)
    assert "192.0.2.3: tcp moves 3 ports but ports.range [1, 5] has only 2 free tcp ports" in msg


def test_a_range_with_fewer_free_ports_than_services_works_with_maps():
    """`maps` shows services at any port the source does not keep in place, service ports
    included: a range of 8 ports holds a permutation of 5 services, 3 of them free."""
    state = parse_one(
        "ports: {range: [1, 8], services: {tcp: [1, 2, 3, 4, 5]}}\n"
        "watched: [{source: 192.0.2.3, ignore: {tcp: [1]}}, {source: '::/0', per_source: true}]\n"
    )
    moves = shuffle.compute(state, b"k" * 32, 0)
    assert sorted(moves.moves[("192.0.2.3", "tcp")]) == [2, 3, 4, 5]


def test_ignore_must_name_a_service():
    msg = error_of(BASE + "watched: [{source: 192.0.2.3, ignore: {tcp: [9]}}]\n")
    assert "watched[0].ignore.tcp: [9] not in ports.services.tcp" in msg


def test_range_order():
    assert "expected [low, high] with low <= high" in error_of(
        "ports: {range: [20, 1], services: {tcp: [1]}}\n"
    )


def test_classic_refuses_ipv6_and_udp():
    msg = error_of(
        "template: classic\nports: {range: [1, 20], services: {tcp: [1], udp: [53]}}\n"
        "watched: [{source: '2001:db8::3'}]\n"
    )
    assert msg.splitlines() == [
        "s.yaml:3: watched[0].source: 2001:db8::3 is IPv6: template classic handles IPv4 only "
        "(use template: maps)",
        "s.yaml:2: ports.services.udp: template classic moves TCP only: expected no udp "
        "services (use template: maps)",
    ]


def test_validation_reads_what_a_template_declares(monkeypatch: pytest.MonkeyPatch):
    """The limits come from core.templates alone: a new entry is enforced with no code."""
    state = "template: mine\nports: {range: [1, 20], services: {tcp: [1], udp: [53]}}\n"
    state += "watched: [{source: 192.0.2.3}, {source: '198.51.100.0/24'}]\n"
    assert parse_one(state).template == "mine"  # undeclared: no limit
    monkeypatch.setitem(
        templates.TEMPLATES,
        "mine",
        templates.Support(
            families=frozenset({6}), protocols=frozenset({"udp"}), features=frozenset({"prefixes"})
        ),
    )
    lines = error_of(state).splitlines()
    assert [ln.split(": ", 1)[1] for ln in lines] == [
        "watched[0].source: 192.0.2.3 is IPv4: template mine handles IPv6 only",
        "watched[0].source: 192.0.2.3: template mine handles no addresses",
        "watched[1].source: 198.51.100.0/24 is IPv4: template mine handles IPv6 only",
        "ports.services.tcp: template mine moves UDP only: expected no tcp services",
    ]


def test_directory_merges_in_name_order(tmp_path: Path):
    write_state(tmp_path / "10-base.yaml")
    (tmp_path / "20-more.yaml").write_text("ports: {range: [1, 30]}\ntable: other\n")
    s = load_state(tmp_path)
    assert s.port_range == (1, 30)
    assert s.table == "other"
    assert s.services["tcp"] == (1, 2, 3, 4, 5)  # maps merge, lists replace


def test_error_in_second_file_names_that_file(tmp_path: Path):
    write_state(tmp_path / "10-base.yaml")
    (tmp_path / "20-bad.yaml").write_text("ports:\n  range: [1, 99999]\n")
    with pytest.raises(MtdError) as exc:
        load_state(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path / '20-bad.yaml'}:2: ports.range[1]: 99999")


def test_missing_state_path(tmp_path: Path):
    with pytest.raises(MtdError, match="no such file or directory"):
        load_state(tmp_path / "nope")


# -- coverage keys: trusted, per_source, buckets, tripwire -----------------------------------


def test_coverage_keys_build_the_model():
    s = parse_one(
        BASE + "trusted: [203.0.113.0/24, '2001:db8:2::/64']\nbuckets: 64\n"
        "watched: [{source: 0.0.0.0/0, per_source: true, ignore: {tcp: [1]}},\n"
        "          {source: '::/0', per_source: true, ignore: {tcp: [1]}}, {source: 192.0.2.3}]\n"
        "tripwire: {tcp: [23], for: 60}\n"
    )
    assert [str(n) for n in s.trusted] == ["203.0.113.0/24", "2001:db8:2::/64"]
    assert s.buckets == 64 and s.bucket_ports("tcp") == [2, 3]
    assert [w.per_source for w in s.watched] == [True, True, False]
    assert s.tripwire is not None and s.tripwire.ports == {"tcp": (23,), "udp": ()}
    assert s.tripwire.seconds == 60 and s.doc["buckets"] == 64


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (
            "watched: [{source: 0.0.0.0/0, per_source: true, ignore: {tcp: [1]}},\n"
            "          {source: '::/0', per_source: true}]\n",
            "s.yaml:3: watched[1].per_source: ::/0: ignore {} differs from watched[0] "
            "(0.0.0.0/0: {tcp: [1]}): expected one ignore list for every per_source entry "
            "(they share the bucket mappings)",
        ),
        (
            "trusted: [203.0.113.1/24]\n",
            "s.yaml:2: trusted[0]: '203.0.113.1/24' has host bits set: expected an IPv4/IPv6 "
            "address or a CIDR prefix such as 203.0.113.0/24 or 2001:db8:2::/64",
        ),
        (
            "tripwire: {tcp: [2, 23], for: 60}\n",
            "s.yaml:2: tripwire.tcp: [2] in ports.services.tcp: expected ports no service "
            "uses (every client of that service would trip it)",
        ),
        ("buckets: 0\n", "s.yaml:2: buckets: 0: expected at least 1"),
        ("buckets: 1025\n", "s.yaml:2: buckets: 1025: expected at most 1024"),
        (
            "tripwire: {tcp: [23]}\n",
            "s.yaml:2: tripwire: missing key: 'for' is a required property",
        ),
    ],
)
def test_coverage_keys_are_validated_in_one_line(extra: str, line: str):
    assert error_of(BASE + extra) == line


def test_classic_refuses_the_coverage_keys():
    msg = error_of(
        BASE + "template: classic\ntrusted: [203.0.113.0/24]\ntripwire: {tcp: [23], for: 9}\n"
        "watched: [{source: 192.0.2.0/24, per_source: true}]\n"
    )
    assert "watched[0].per_source: 192.0.2.0/24: template classic handles no per_source" in msg
    assert "trusted: template classic handles no trusted (use template: maps)" in msg
    assert "tripwire: template classic handles no tripwire (use template: maps)" in msg
