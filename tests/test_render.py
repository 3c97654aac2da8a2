import json
import re
from pathlib import Path

import pytest

from reconciler.core import render, shuffle
from reconciler.core.state import parse
from reconciler.errors import MtdError

SECRET = b"s" * 32
STATE = """
ports: {range: [1, 20], services: {tcp: [1, 2, 3], udp: [53]}}
watched:
  - {source: 192.0.2.3, ignore: {tcp: [1]}}
  - {source: 198.51.100.0/24}
  - {source: 198.51.100.128/25}
  - {source: 198.51.100.130}
  - {source: "2001:db8:bad::/48"}
"""


def rendered(text: str = STATE, template: str | None = None):
    state = parse([("s.yaml", text + (f"template: {template}\n" if template else ""))])
    mapping = shuffle.compute(state, SECRET, 7)
    return state, mapping, render.render(state, mapping)


def objects(commands, kind):
    return {c["add"][kind]["name"]: c["add"][kind] for c in commands if kind in c["add"]}


def test_maps_rule_count_is_constant_whatever_the_number_of_sources():
    ports = "ports: {range: [1000, 60000], services: {tcp: [22, 80, 443], udp: [53]}}\n"

    def rules(watched: str, extra: str = "") -> int:
        return sum("rule" in c["add"] for c in rendered(ports + watched + extra)[2])

    def hosts(n: int) -> str:
        return "watched:\n" + "".join(f"  - source: 192.0.2.{i}\n" for i in range(1, n + 1))

    # One IPv4 address or 199 of them: the same rules. 10 whatever the state (the host's own
    # traffic, the guard's), 6 drop ICMP errors forged from elsewhere, dynamic sources (always
    # there, for `mtd watch`) 9 for IPv4 and 10 for IPv6, 4 leak jumps (a family and
    # protocol each, after NAT) to 3 rules a family that count watched sources only, one
    # shared bucket 16 (no per_source entry): 61. Each class a family uses adds 4 (IPv6: 5)
    # and, addresses and prefixes, 8 for their maps; per_source pieces, 5 jumps to the buckets.
    # More than one bucket: 10 one-rule chains (a base chain and family each) hold the seeded
    # dispatch, so a new seed rewrites only those.
    base = 10 + 6 + 9 + 10 + 4 + 6 + 16
    assert rules(hosts(199)) == rules(hosts(1)) == base + 4 + 8
    assert sum("rule" in c["add"] for c in rendered()[2]) == base + 12 + 12 + 13 == 98
    internet = (
        "watched: [{source: 0.0.0.0/0, per_source: true}, {source: '::/0', per_source: true}]\n"
    )
    per_source = (4 + 5) + (5 + 5)
    assert rules(internet) == base + per_source + 10 + 16 * 15  # the default 16 buckets
    everything = "trusted: [203.0.113.0/24]\ntripwire: {tcp: [23], udp: [69], for: 60}\n"
    # Trusted prefixes of one family: 6 rules (one in its leak chain); a tripwire of two
    # protocols, 2 per family.
    everything_rules = base + per_source + 6 + 4 + 10 + 16 * 2
    assert rules(internet, everything + "buckets: 3\n") == everything_rules
    prefix = internet.replace("]\n", ", {source: 198.51.100.0/24}]\n")
    assert rules(prefix, "buckets: 3\n") == rules(internet, "buckets: 3\n") + 4 + 8


def test_maps_hold_the_permutation_inbound_and_its_inverse_outbound():
    _, mapping, commands = rendered()
    maps = objects(commands, "map")
    into = {tuple(e[0]["concat"]): e[1] for e in maps["tcp4"]["elem"]}
    out = {tuple(e[0]["concat"]): e[1] for e in maps["tcp4_out"]["elem"]}
    for real, shown in mapping.moves[("192.0.2.3", "tcp")].items():
        if shown != real:
            assert into[("192.0.2.3", shown)] == real and out[("192.0.2.3", real)] == shown
    assert {(s, to): p for (s, p), to in into.items()} == out
    assert ("192.0.2.3", 1) not in into  # ignored for this source


def test_most_specific_source_wins():
    _, _, commands = rendered()
    nets = objects(commands, "map")["tcp4_net"]["elem"]
    prefixes = {
        (e[0]["concat"][0]["prefix"]["addr"], e[0]["concat"][0]["prefix"]["len"]) for e in nets
    }
    # The /24 is split around the /25 inside it; each piece carries its own source's mapping.
    assert prefixes == {("198.51.100.0", 25), ("198.51.100.128", 25)}
    hosts = objects(commands, "set")["src4"]["elem"]
    assert set(hosts) == {"192.0.2.3", "198.51.100.130"}  # hosts bypass the prefix maps


def test_template_variables_documented_shape():
    state, mapping, _ = rendered()
    ctx = render.context(state, mapping)
    assert set(ctx) == {
        "table", "family", "epoch", "mark", "state", "elements", "sources", "networks",
        "services", "pairs", "dynamic", "bucketed", "buckets", "seed", "trusted", "tripwire",
        "dynamic_size", "dynamic_elements", "fixed",
    }  # fmt: skip
    assert ctx["epoch"] == 7 and str(ctx["table"]) == json.dumps("\0mtd:table")  # written only
    # Watched prefixes as disjoint pieces (the /24 split around the /25 inside it).
    assert ctx["networks"]["4"] == [
        {"prefix": {"addr": "198.51.100.0", "len": 25}},
        {"prefix": {"addr": "198.51.100.128", "len": 25}},
    ]
    assert ctx["networks"]["6"] == [{"prefix": {"addr": "2001:db8:bad::", "len": 48}}]
    assert ctx["services"] == {"tcp": [1, 2, 3], "udp": [53]}
    assert {"source", "family", "proto", "port", "to"} == set(ctx["pairs"][0])


def test_classic_has_nine_rules_per_pair():
    text = (
        "ports: {range: [1, 20], services: {tcp: [1, 2, 3, 4, 5]}}\n"
        "watched: [{source: 192.0.2.3, ignore: {tcp: [1, 2]}}]\n"
    )
    _, _, commands = rendered(text, "classic")
    assert sum("rule" in c["add"] for c in commands) == 9 * 3


# A state every shipped template can render (classic: IPv4 TCP only), in a table whose name
# no template can have written by hand.
OWNED = """
table: owned_x
ports: {range: [1, 20], services: {tcp: [1, 2, 3]}}
watched: [{source: 192.0.2.3, ignore: {tcp: [1]}}, {source: 198.51.100.0/24}]
"""


@pytest.mark.parametrize(
    "template", sorted(p.name.removesuffix(".json.j2") for p in render.template_dirs()[0].iterdir())
)
def test_every_shipped_template_keeps_to_the_owned_table(template: str):
    """Checked on the template's own output (json.loads of the rendered text), not through
    render's check, so the test fails on its own if a template names another table."""
    state = parse([("s.yaml", OWNED + f"template: {template}\n")])
    env = render.environment(render.template_dirs())
    text = env.get_template(f"{template}.json.j2").render(
        render.context(state, shuffle.compute(state, SECRET, 0))
    )
    commands = json.loads(text)["nftables"]
    assert len(commands) > 3
    for c in commands:
        ((verb, body),) = c.items()
        ((kind, obj),) = body.items()
        assert verb == "add" and obj["family"] == "inet", c
        # The table's placeholder: a template writes the host's table, never reads its name.
        assert (obj["name"] if kind == "table" else obj["table"]) == "\0mtd:table", c


def test_a_template_that_touches_another_table_is_refused(tmp_path: Path):
    (tmp_path / "evil.json.j2").write_text(
        json.dumps({"nftables": [{"add": {"table": {"family": "ip", "name": "filter"}}}]})
    )
    state = parse([("s.yaml", STATE + "template: evil\n")])
    with pytest.raises(MtdError, match=r"add table to table ip filter: expected only table inet"):
        render.render(state, shuffle.compute(state, SECRET, 0), [tmp_path])


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "'__class__' of 'str'"),
        ("{{ range.__globals__ }}", "'__globals__' of 'function'"),
        ("{{ cycler.__init__.__globals__ }}", "'__init__' of 'type'"),
    ],
)
def test_sandbox_blocks_python_internals(tmp_path: Path, text: str, what: str):
    (tmp_path / "x.json.j2").write_text(text)
    state = parse([("s.yaml", STATE + "template: x\n")])
    with pytest.raises(
        MtdError, match=f"refused by the template sandbox: access to attribute {what}"
    ):
        render.render(state, shuffle.compute(state, SECRET, 0), [tmp_path])


def test_missing_template_names_the_directories(tmp_path: Path):
    state = parse([("s.yaml", STATE + "template: nope\n")])
    with pytest.raises(MtdError, match=re.escape(f"no nope.json.j2 in {tmp_path}")):
        render.render(state, shuffle.compute(state, SECRET, 0), [tmp_path])


def test_buckets_only_as_many_as_the_state_needs():
    """Without a per_source entry, dynamic and tripped sources share one bucket, unless the
    state sets `buckets` itself."""
    state, mapping, commands = rendered()
    assert state.bucket_count == len(mapping.buckets) == 1
    text = json.dumps(commands, default=str)
    # One bucket: a plain jump to its chains, no hash, so a new epoch rewrites no rule.
    assert '"jhash"' not in text and '"b0_nat4"' in text and '"b1_nat4"' not in text
    assert mapping.bucket_of("203.0.113.9") == mapping.buckets[0]
    state, mapping, commands = rendered(STATE + "buckets: 4\n")
    assert state.bucket_count == len(mapping.buckets) == 4
    assert '"mod": 4,' in json.dumps(commands, default=str)
    state, mapping, _ = rendered(STATE + "  - {source: 203.0.113.0/24, per_source: true}\n")
    assert state.bucket_count == len(mapping.buckets) == 16
