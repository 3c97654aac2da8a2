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
    """Valid states whose services lie mostly inside the range (where a careless shuffle
    would pick them as targets), sometimes outside it too."""
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
def test_targets_are_distinct_free_ports_and_deterministic(state, epoch, secret):
    m = shuffle.compute(state, secret, epoch)
    services = set(state.services["tcp"])
    lo, hi = state.port_range
    assert services & set(range(lo, hi + 1))  # the case that matters is always there
    for moves in m.moves.values():
        assert sorted(moves) == sorted(services)  # every service moves (no ignore lists)
        targets = list(moves.values())
        assert len(set(targets)) == len(targets)  # no two moved ports share a target
        assert not services & set(targets)  # never a service port
        assert all(lo <= t <= hi for t in targets)
    assert shuffle.compute(state, secret, epoch) == m  # same inputs, same mapping


def test_epochs_secrets_and_sources_differ():
    state = make_state(1, 1000, [1, 2, 3, 4, 5])
    a = shuffle.compute(state, SECRET, 1)
    assert shuffle.compute(state, SECRET, 2).moves != a.moves
    assert shuffle.compute(state, b"x" * 32, 1).moves != a.moves
    per_source = [tuple(m.values()) for m in a.moves.values()]
    assert len(set(per_source)) == len(per_source)  # each source its own mapping


def test_uniform_over_many_epochs():
    """Each free port is chosen about equally often as the target of a given service."""
    state = make_state(1, 20, [1, 2, 3, 4, 5], n_sources=1)
    counts: collections.Counter[int] = collections.Counter()
    n = 6000
    for epoch in range(n):
        counts[shuffle.compute(state, SECRET, epoch).moves[("192.0.2.1", "tcp")][3]] += 1
    free = range(6, 21)
    assert set(counts) == set(free)
    expected = n / len(free)
    chi2 = sum((counts[p] - expected) ** 2 / expected for p in free)
    assert chi2 < 36.1  # chi-square, 14 degrees of freedom, p = 0.001


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
