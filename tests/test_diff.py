import pytest

from reconciler.core import diff

CHAIN = {"type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}


def table(policy="accept", rules=None, elems=None):
    return diff.from_listing(listing_of(policy, rules, elems))


def listing_of(policy="accept", rules=None, elems=None, packets=0, handle=1):
    listing = [
        {"table": {"family": "inet", "name": "mtd", "handle": handle}},
        {
            "chain": {
                "family": "inet",
                "table": "mtd",
                "name": "c",
                "handle": 2,
                **CHAIN,
                "policy": policy,
            }
        },
        {
            "map": {
                "family": "inet",
                "table": "mtd",
                "name": "m",
                "handle": 3,
                "type": ["ipv4_addr", "inet_service"],
                "map": "inet_service",
                **({"elem": elems} if elems else {}),
            }
        },
    ]
    listing.append(
        {"counter": {"family": "inet", "table": "mtd", "name": "n", "packets": packets, "bytes": 0}}
    )
    for i, r in enumerate(rules or [[{"accept": None}]]):
        listing.append(
            {"rule": {"family": "inet", "table": "mtd", "chain": "c", "handle": 10 + i, "expr": r}}
        )
    return listing


E1 = [[{"concat": ["192.0.2.3", 3]}, 17], [{"concat": ["192.0.2.3", 17]}, 3]]


def test_equal_tables_have_no_changes_whatever_the_handles():
    assert diff.diff(table(elems=E1), table(elems=list(reversed(E1)))) == []


def test_missing_table_is_all_additions():
    changes = diff.diff(table(elems=E1), diff.MISSING)
    assert {c.op for c in changes} == {"+"}
    assert [c.text for c in changes][:2] == [
        "table mtd",
        "chain c { type filter hook prerouting priority -300; policy accept; }",
    ]


def test_policy_change_is_one_attribute_change():
    (change,) = diff.diff(table(), table(policy="drop"))
    assert (change.op, change.kind, change.name) == ("~", "chain", "c")
    assert "policy: drop -> accept" in change.text


def test_rule_changes_are_keyed_by_chain_and_position():
    want = table(rules=[[{"accept": None}], [{"notrack": None}]])
    changes = diff.diff(want, table())
    assert [(c.op, c.name, c.text) for c in changes] == [("+", "c#1", "rule c notrack")]


def test_element_changes_are_keyed():
    have = table(elems=[[{"concat": ["192.0.2.3", 3]}, 9], [{"concat": ["192.0.2.4", 3]}, 9]])
    changes = diff.diff(table(elems=E1), have)
    assert sorted(c.text for c in changes) == sorted(
        [
            "element m { 192.0.2.3 . 3 : 9 -> 17 }",
            "element m { 192.0.2.4 . 3 : 9 }",
            "element m { 192.0.2.3 . 17 : 3 }",
        ]
    )
    assert diff.summary(changes) == {"~element": 1, "-element": 1, "+element": 1}


def test_element_text_is_canonical_across_forms():
    assert (
        diff.elem_text({"concat": [{"prefix": {"addr": "2001:0db8::", "len": 32}}, 5]})
        == "2001:db8::/32 . 5"
    )
    assert diff.elem_text("2001:DB8::1") == "2001:db8::1"
    assert diff.elem_text({"range": [1, 5]}) == "1-5"


def test_skeleton_strips_elements_only():
    cmds = [
        {"add": {"map": {"name": "m", "elem": E1, "type": "x"}}},
        {"add": {"element": {"name": "m", "elem": E1}}},
        {"add": {"rule": {"chain": "c", "expr": []}}},
    ]
    assert diff.skeleton_commands(cmds) == [
        {"add": {"map": {"name": "m", "type": "x"}}},
        {"add": {"rule": {"chain": "c", "expr": []}}},
    ]


def test_large_element_sets_diff_by_key():
    n = 50_000
    a = {f"192.0.{i // 250}.{i % 250} . 3": "9" for i in range(n)}
    b = dict(a)
    b["192.0.0.1 . 3"] = "10"
    want, have = diff.Table(elements={"m": b}), diff.Table(elements={"m": a})
    (change,) = diff.diff(want, have)
    assert change.text == "element m { 192.0.0.1 . 3 : 9 -> 10 }"


class Key(str):
    """An element key that counts the comparisons made with it."""

    ops = 0

    def __eq__(self, other: object) -> bool:
        Key.ops += 1
        return str.__eq__(self, other)

    def __lt__(self, other: str) -> bool:
        Key.ops += 1
        return str.__lt__(self, other)

    __hash__ = str.__hash__


def comparisons(n: int) -> int:
    """Key comparisons of one diff of n elements where a third moved, a third went and a
    third came (every kind of element change), each side built from its own key objects."""

    def side(offset: int) -> dict[str, str | None]:
        return {Key(f"10.0.{i // 250}.{i % 250} . 3"): str(i % 7 + offset) for i in range(n)}

    have, want = side(0), side(1)
    for i in range(0, n, 3):
        del want[Key(f"10.0.{i // 250}.{i % 250} . 3")]
        want[Key(f"10.1.{i // 250}.{i % 250} . 3")] = "5"
    Key.ops = 0
    changes = diff.diff(diff.Table(elements={"m": want}), diff.Table(elements={"m": have}))
    assert len(changes) >= n  # a change for every element of `have`, and the new ones
    return Key.ops


def test_the_element_diff_scales_linearly_in_comparisons():
    """Counted, not timed: 4x the elements may cost 4x (hash lookups) or a little more
    (sorting the output), never 16x as a pairwise compare would."""
    small, large = comparisons(3_000), comparisons(12_000)
    assert small > 0
    assert large / small < 6, (small, large)


def test_anonymous_set_order_in_rules_does_not_matter():
    rule = [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "tcp", "field": "flags"}},
                "right": {"set": [0, "fin", {"|": ["fin", "syn"]}]},
            }
        }
    ]
    shuffled = [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "tcp", "field": "flags"}},
                "right": {"set": [{"|": ["fin", "syn"]}, 0, "fin"]},
            }
        }
    ]
    assert diff.diff(table(rules=[rule]), table(rules=[shuffled])) == []


def test_one_deleted_rule_is_one_line_whatever_follows_it():
    rules = [[{"accept": None}], [{"notrack": None}], [{"drop": None}], [{"return": None}]]
    changes = diff.diff(table(rules=rules[:1] + rules[2:]), table(rules=rules))
    assert [(c.op, c.name, c.text) for c in changes] == [("-", "c#1", "rule c notrack")]
    changes = diff.diff(table(rules=rules), table(rules=rules[:1] + rules[2:]))
    assert [(c.op, c.name, c.text) for c in changes] == [("+", "c#1", "rule c notrack")]
    changed = [rules[0], [{"continue": None}], *rules[2:]]  # one rule edited: - then +
    changes = diff.diff(table(rules=changed), table(rules=rules))
    assert [(c.op, c.text) for c in changes] == [("-", "rule c notrack"), ("+", "rule c continue")]


FLAGS = {"payload": {"protocol": "tcp", "field": "flags"}}
RULES = [[{"match": {"op": "==", "left": FLAGS, "right": {"set": [0, "fin"]}}}, {"drop": None}]]


def rendered(elems=E1):
    """`add` commands whose skeleton the kernel would list as `listing_of(rules=RULES)`."""
    return [{"add": item} for item in listing_of(rules=RULES, elems=elems)]


def slow(canonical, commands, live):
    return diff.diff(diff.desired(diff.from_listing(canonical), commands), diff.live(live))


LIVE_CASES = {
    "in sync": listing_of(rules=RULES, elems=list(reversed(E1))),
    "counters moved": listing_of(rules=RULES, elems=E1, packets=7),
    "the table replaced since": listing_of(rules=RULES, elems=E1, handle=9),
    "an element changed": listing_of(rules=RULES, elems=[E1[0], [E1[1][0], 4]]),
    "an element gone": listing_of(rules=RULES, elems=E1[:1]),
    "no elements": listing_of(rules=RULES),
    "a policy changed": listing_of("drop", rules=RULES, elems=E1),
    "a rule added": listing_of(rules=[*RULES, [{"accept": None}]], elems=E1),
    "an anonymous set in another order": listing_of(
        rules=[
            [{"match": {"op": "==", "left": FLAGS, "right": {"set": ["fin", 0]}}}, {"drop": None}]
        ],
        elems=E1,
    ),
    "no table": None,
}


@pytest.mark.parametrize("case", sorted(LIVE_CASES))
def test_compare_says_what_the_keyed_diff_says(case):
    """`compare` takes its shortcut only where the listing is the canonical skeleton plus
    elements, and then reports exactly what the keyed diff of every object would."""
    canonical = listing_of(rules=RULES)
    live = LIVE_CASES[case]
    assert diff.compare(canonical, rendered(), live) == slow(canonical, rendered(), live)


def test_compare_takes_the_shortcut_for_what_mtd_left():
    canonical = listing_of(rules=RULES)
    shortcut = ("in sync", "counters moved", "the table replaced since", "an element changed")
    for case in (*shortcut, "no elements"):
        assert diff.same_skeleton(canonical, LIVE_CASES[case]), case
    for case in ("a policy changed", "a rule added", "an anonymous set in another order"):
        assert not diff.same_skeleton(canonical, LIVE_CASES[case]), case
    assert diff.compare(canonical, rendered(), LIVE_CASES["in sync"]) == []
    (change,) = diff.compare(canonical, rendered(), LIVE_CASES["an element changed"])
    assert change.text == "element m { 192.0.2.3 . 17 : 4 -> 3 }"


def jhash_rule(seed):
    key = {
        "jhash": {"mod": 4, "seed": seed, "expr": {"payload": {"protocol": "ip", "field": "saddr"}}}
    }
    return {"add": {"rule": {"chain": "c", "expr": [{"vmap": {"key": key, "data": "@v"}}]}}}


def test_the_seed_is_learnt_as_a_stand_in_and_put_back():
    skeleton = [{"add": {"chain": {"name": "c"}}}, jhash_rule(7), jhash_rule(7), jhash_rule(9)]
    standin, swapped = diff.without_seed(skeleton, 7)
    assert swapped == 2 and standin[1:] == [jhash_rule(diff.SEED_STAND_IN)] * 2 + [jhash_rule(9)]
    assert skeleton[1] == jhash_rule(7)  # not changed in place
    listing = [c["add"] for c in standin]  # as a kernel would list it back
    assert diff.with_seed(listing, 7, swapped) == [c["add"] for c in skeleton]
    assert diff.with_seed(listing, 7, 3) is None  # not every stand-in found again: learn anew
    # No jhash, the seed being the stand-in, or a template's own stand-in value: none.
    assert diff.without_seed(skeleton[:1], 7) is None
    assert diff.without_seed(skeleton, diff.SEED_STAND_IN) is None
    assert diff.without_seed([*skeleton, jhash_rule(diff.SEED_STAND_IN)], 7) is None


def set_cmd(name, **extra):
    return {
        "add": {
            "set": {"family": "inet", "table": "mtd", "name": name, "type": "ipv4_addr", **extra}
        }
    }


def rule_cmd(*expr):
    return {"add": {"rule": {"family": "inet", "table": "mtd", "chain": "c", "expr": list(expr)}}}


def add_to(target):
    saddr = {"payload": {"protocol": "ip", "field": "saddr"}}
    return {"set": {"op": "add", "elem": saddr, "set": target}}


@pytest.mark.parametrize(
    "commands",
    [
        [set_cmd("allow", flags=["timeout"])],  # its elements expire: no transaction says so
        [set_cmd("allow", timeout=60)],
        [set_cmd("allow", flags="dynamic")],
        [set_cmd("allow", elem=[{"elem": {"val": "192.0.2.1", "timeout": 60}}])],
        [set_cmd("allow"), rule_cmd(add_to("@allow"))],  # packets fill it
        [rule_cmd({"match": {"op": "==", "left": 1, "right": 1}}, {"meter": {"name": "m"}})],
        # Gone when the netlink socket of the process that made it closes (its exit).
        [{"add": {"table": {"family": "inet", "name": "mtd", "flags": ["owner"]}}}],
        [{"add": {"table": {"family": "inet", "name": "mtd", "flags": "persist"}}}],
        [
            {
                "add": {
                    "chain": {
                        "family": "inet",
                        "table": "mtd",
                        "name": "i",
                        "type": "filter",
                        "hook": "ingress",
                        "dev": "eth0",  # goes when the device does
                        "prio": 0,
                    }
                }
            }
        ],
    ],
)
def test_a_table_that_changes_by_itself_has_no_digest(commands):
    """Such a table moves with no nf_tables generation: only a listing can tell."""
    assert diff.digest("mtd", commands) is None


def test_the_dynamic_watch_sets_change_nothing_the_digest_covers():
    watched = [
        set_cmd("dyn4", flags=["timeout"], elem=[{"elem": {"val": "192.0.2.1", "timeout": 60}}]),
        rule_cmd(add_to("@dyn4")),
    ]
    later = [set_cmd("dyn4", flags=["timeout"]), watched[1]]
    assert diff.digest("mtd", watched) == diff.digest("mtd", later) is not None
    assert diff.digest("mtd", watched) != diff.digest("other", watched)


def with_objects(limit_rate=10, quota_bytes=1000, used=0):
    return [
        *listing_of(rules=RULES, elems=E1),
        {
            "limit": {
                "family": "inet",
                "table": "mtd",
                "name": "l",
                "rate": limit_rate,
                "per": "second",
            }
        },
        {
            "quota": {
                "family": "inet",
                "table": "mtd",
                "name": "q",
                "bytes": quota_bytes,
                "used": used,
            }
        },
    ]


def test_every_named_object_a_template_may_add_is_compared():
    """A limit's rate or a quota's size changed by hand is drift; what packets move (a
    quota's use, like a counter's values) is not."""
    canonical = [
        {k: {a: b for a, b in v.items() if a != "elem"}}
        for o in with_objects()
        for k, v in o.items()
    ]
    commands = [{"add": o} for o in with_objects()]
    assert diff.compare(canonical, commands, with_objects(used=500)) == []
    for live in (with_objects(limit_rate=10_000), with_objects(quota_bytes=10**9)):
        changes = diff.compare(canonical, commands, live)
        assert [c.op + c.kind for c in changes] in (["~limit"], ["~quota"]), changes
        assert changes == slow(canonical, commands, live)
