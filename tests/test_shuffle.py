import collections
import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core import shuffle
from reconciler.core.state import parse

SECRET = b"k" * 32


def make_state(lo: int, hi: int, services: list[int], n_sources: int = 3):
    watched = "".join(f"  - source: 192.0.2.{i + 1}\n" for i in range(n_sources))
    return parse(
        [
            (
                "s.yaml",
                f"ports: {{range: [{lo}, {hi}], services: {{tcp: {services}}}}}\n"
                f"watched:\n{watched}",
            )
        ]
    )


@st.composite
def states(draw):
    """Valid states whose services lie mostly inside the range (where they are targets too),
    sometimes outside it."""
    lo = draw(st.integers(1, 60000))
    hi = draw(st.integers(lo + 1, min(65535, lo + 300)))
    inside = draw(
        st.lists(st.integers(lo, hi), min_size=1, max_size=min(8, (hi - lo + 1) // 2), unique=True)
    )
    outside = draw(
        st.lists(st.integers(1, 65535).filter(lambda p: not lo <= p <= hi), max_size=3, unique=True)
    )
    room = (hi - lo + 1) - 2 * len(inside)  # every service must find a free target
    return make_state(lo, hi, sorted(inside + outside[:room]))


@settings(max_examples=150, deadline=None)
@given(states(), st.integers(0, 10**9), st.binary(min_size=16, max_size=64))
def test_targets_are_distinct_ports_of_the_range_and_deterministic(state, epoch, secret):
    m = shuffle.compute(state, secret, epoch)
    services = set(state.services["tcp"])
    lo, hi = state.port_range
    assert services & set(range(lo, hi + 1))  # the case that matters is always there
    for moves in m.moves.values():
        assert sorted(moves) == sorted(services)  # every service moves (no ignore lists)
        targets = list(moves.values())
        assert len(set(targets)) == len(targets)  # no two moved ports share a target
        assert all(lo <= t <= hi for t in targets)  # service ports included
        check_permutation(moves, services)
    assert shuffle.compute(state, secret, epoch) == m  # same inputs, same mapping


def check_permutation(moves: dict[int, int], services: set[int]) -> None:
    """The maps the ruleset holds: inbound is a permutation of its ports, outbound its
    inverse; each service is reached at its target, and a moved service's real port that
    shows no service leads to a port no service listens on (it looks closed)."""
    inbound, outbound = shuffle.inbound(moves), shuffle.outbound(moves)
    assert sorted(inbound) == sorted(inbound.values()) and len(inbound) == shuffle.size(moves)
    assert {real: shown for shown, real in inbound.items()} == outbound
    for real, shown in moves.items():
        assert inbound.get(shown, shown) == real  # at its own port: not in the maps at all
    for port, to in inbound.items():
        if port not in moves.values():  # a real port that shows nothing
            assert port in services and to not in services


def test_a_permutation_with_overlaps_and_a_fixed_point():
    moves = {1: 7, 2: 1, 3: 3, 4: 12}  # 2 shown at 1's port, 3 at its own
    assert shuffle.inbound(moves) == {7: 1, 1: 2, 12: 4, 2: 7, 4: 12}
    assert shuffle.outbound(moves) == {1: 7, 2: 1, 4: 12, 7: 2, 12: 4}
    check_permutation(moves, {1, 2, 3, 4})


def test_classic_keeps_swaps_of_free_ports():
    """A template that writes swaps gets free targets: two swaps never share a port."""
    state = dataclasses.replace(make_state(1, 20, [1, 2, 3, 4, 5]), template="classic")
    for epoch in range(50):
        for moves in shuffle.compute(state, SECRET, epoch).moves.values():
            assert not set(moves.values()) & {1, 2, 3, 4, 5}


def test_epochs_secrets_and_sources_differ():
    state = make_state(1, 1000, [1, 2, 3, 4, 5])
    a = shuffle.compute(state, SECRET, 1)
    assert shuffle.compute(state, SECRET, 2).moves != a.moves
    assert shuffle.compute(state, b"x" * 32, 1).moves != a.moves
    per_source = [tuple(m.values()) for m in a.moves.values()]
    assert len(set(per_source)) == len(per_source)  # each source its own mapping


def test_uniform_over_many_epochs():
    """Each port of the range, service ports included, is chosen about equally often as the
    target of a given service (issue 21, finding 4: no port is never chosen)."""
    state = make_state(1, 20, [1, 2, 3, 4, 5], n_sources=1)
    counts: collections.Counter[int] = collections.Counter()
    n = 6000
    for epoch in range(n):
        counts[shuffle.compute(state, SECRET, epoch).moves[("192.0.2.1", "tcp")][3]] += 1
    ports = range(1, 21)
    assert set(counts) == set(ports)
    expected = n / len(ports)
    chi2 = sum((counts[p] - expected) ** 2 / expected for p in ports)
    assert chi2 < 43.8  # chi-square, 19 degrees of freedom, p = 0.001


def test_draw_takes_the_whole_pool_when_asked():
    out = shuffle.draw(SECRET, b"x", list(range(10)), 10)
    assert sorted(out) == list(range(10))


def test_fingerprint_is_keyed_and_depends_on_the_whole_mapping():
    state = make_state(1, 100, [1, 2])
    m = shuffle.compute(state, SECRET, 1)
    fp = m.fingerprint(SECRET)
    assert len(fp) == 32 and fp == shuffle.compute(state, SECRET, 1).fingerprint(SECRET)
    assert fp != m.fingerprint(b"y" * 32)  # keyed
    assert fp != shuffle.compute(state, SECRET, 2).fingerprint(SECRET)  # another epoch
    # One moved port of one source pointing elsewhere changes it.
    (key, moves), *rest = sorted(m.moves.items())
    port, target = next(iter(moves.items()))
    other = shuffle.PortMap(m.epoch, {key: {**moves, port: target + 1}, **dict(rest)})
    assert other.fingerprint(SECRET) != fp
    # The same moves with the epoch number alone changed: same mapping, same fingerprint.
    assert dataclasses.replace(m, epoch=m.epoch + 1).fingerprint(SECRET) == fp
