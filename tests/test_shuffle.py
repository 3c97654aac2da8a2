import collections

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
    lo = draw(st.integers(1, 60000))
    hi = draw(st.integers(lo, min(65535, lo + 300)))
    services = draw(st.lists(st.integers(1, 65535), min_size=1, max_size=8, unique=True))
    free = [p for p in range(lo, hi + 1) if p not in services]
    if len(free) < len(services):
        services = services[: len(free)] or [lo]
        free = [p for p in range(lo, hi + 1) if p not in services]
    return make_state(lo, hi, sorted(services)) if len(free) >= len(services) else None


@settings(max_examples=150, deadline=None)
@given(states(), st.integers(0, 10**9), st.binary(min_size=16, max_size=64))
def test_targets_are_distinct_free_ports_and_deterministic(state, epoch, secret):
    if state is None:
        return
    m = shuffle.compute(state, secret, epoch)
    services = set(state.services["tcp"])
    lo, hi = state.port_range
    for moves in m.moves.values():
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


def test_fingerprint_is_keyed():
    state = make_state(1, 100, [1, 2])
    m = shuffle.compute(state, SECRET, 1)
    assert m.fingerprint(SECRET) != m.fingerprint(b"y" * 32)
    assert len(m.fingerprint(SECRET)) == 32
