"""Differential oracle: a watched source must not tell mtd's host from a twin whose services
really listen on the shuffled ports that source sees.

Two labs with the same addresses: in one, mtd runs (template `maps`) and the services sit
on their real ports; in the twin, nothing but listeners on the ports `mtd mapping --source`
reports, answering with the same banners. Hypothesis draws sequences of hand-made probes
(tests/wire.py: TCP flags, ports in and out of the range, source ports reused within a
sequence, IP options and IPv6 extension headers, fragments, payloads), scapy sends each
sequence to both, and the normalised answers must be equal. The only difference allowed is
the documented one: mtd drops packets with IPv4 options or IPv6 destination-options or
routing headers from watched sources, at every port (README, "What a watched source can
learn"). Any other difference fails with the shrunk sequence.

`make test` runs a short, derandomised run; `make fuzz` a long random one
(MTD_FUZZ_EXAMPLES), which prints how many sequences it tried.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.lab.netns import Lab, standard_lab
from tests import wire
from tests.conftest import mtd, write_state
from tests.kernel import apply
from tests.test_deception import PER_SOURCE, V, quiet

pytestmark = pytest.mark.netns

EXAMPLES = int(os.environ.get("MTD_FUZZ_EXAMPLES", "0"))  # 0: the short run of `make test`
FLAGS = ["S", "F", "", "SF", "SA", "A", "R", "RA", "PA", "FA", "FPU", "P", "U", "SR", "SFPU"]
DROPPED = {"rr", "rr-bad", "dst-param", "dst-skip", "rt0"}  # silent at every port, by design
OPTS = {4: ["rr", "rr-bad"], 6: ["dst-param", "dst-skip", "hbh-param", "rt0"]}
PORTS = [*range(1, 23), 53]  # the range is 1-20; 53 is the UDP service
_fresh = itertools.count()
tried = {"sequences": 0, "probes": 0}


@pytest.fixture(scope="module", params=["explicit", "per_source", "dynamic"])
def twins(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[wire.Prober, wire.Prober]]:
    """mtd's host and its twin, for an explicit entry, a per_source source (inside 0.0.0.0/0
    and ::/0) and a dynamic one (`mtd watch add`, listed nowhere else): for the last two the
    twin listens where the source's bucket puts the services."""
    extra = {
        "explicit": {},
        "per_source": PER_SOURCE,
        "dynamic": {"watched": [{"source": "198.51.100.0/24"}]},
    }[request.param]
    state = write_state(tmp_path_factory.mktemp("oracle") / "state.yaml", **extra)
    with standard_lab() as lab, Lab(prefix="twin") as twin:
        assert apply(lab, state).returncode == 0
        if request.param == "dynamic":
            for source in (V[4][0], V[6][0]):
                out = mtd("-s", str(state), "watch", "add", source, "--local", ns=lab)
                assert out.returncode == 0, out.stderr
        twin.add_server()
        twin.add_client("unt", "192.0.2.3", "2001:db8::3")
        for v in (4, 6):
            proc = mtd("-s", str(state), "mapping", "--source", V[v][0], "--json", ns=lab)
            assert proc.returncode == 0, proc.stderr
            view = json.loads(proc.stdout)
            if request.param == "per_source":
                assert view["bucket"] is not None and view["watched"].endswith("/0"), view
            elif request.param == "dynamic":
                assert view["bucket"] is not None and view["watched"] == "dynamic", view
            else:
                assert view["watched"] == V[v][0]
            tcp = [f"{seen}={real}" for real, seen in view["tcp"].items()]
            udp = [f"{seen}={real}" for real, seen in view["udp"].items()]
            twin.serve("srv", tcp, udp, family=v)
        for each in (lab, twin):
            quiet(each)
        yield wire.Prober(lab, "unt"), wire.Prober(twin, "unt")
    if EXAMPLES:
        print(f"\noracle: tried {tried['sequences']} probe sequences, {tried['probes']} probes")


@st.composite
def probes(draw: st.DrawFn) -> dict:
    v = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from(["tcp", "tcp", "tcp", "udp"]))
    p = {
        "v": v,
        "src": V[v][0],
        "dst": V[v][1],
        "proto": proto,
        "sport": draw(st.integers(0, 2)),  # an index: each sequence gets fresh source ports
        "dport": draw(st.sampled_from(PORTS)),
        "payload": draw(st.sampled_from(["", "", "hello\n"])),
        "opt": draw(st.sampled_from(["", "", "", "", *OPTS[v]])),
        "frag": draw(st.sampled_from([0, 0, 0, 0, 8, 16])),
    }
    if proto == "tcp":
        p["flags"] = draw(st.sampled_from(FLAGS))
        p["seq"] = draw(st.sampled_from([1000, 1000, 4_000_000_000]))
        p["ack"] = draw(st.sampled_from([0, 1]))
    return p


def silent_by_design(p: dict) -> bool:
    """Where mtd's host is silent at every port alike: options and headers it drops, and IPv6
    fragments whose first one lacks the transport header (conntrack's reassembly drops
    them; a host without netfilter answers with a parameter problem, RFC 7112)."""
    if p.get("opt") in DROPPED:
        return True
    chain = (20 if p["proto"] == "tcp" else 8) + {"rt0": 24, "": 0}.get(p.get("opt", ""), 8)
    return p["v"] == 6 and 0 < p.get("frag", 0) < chain


def concrete(seq: list[dict]) -> list[dict]:
    base = 20000 + 4 * (next(_fresh) % 10000)
    return [{**p, "sport": base + p["sport"]} for p in seq]


def canonical(answers: list[dict]) -> list[str]:
    return sorted(json.dumps(a, sort_keys=True) for a in answers)


@settings(
    max_examples=EXAMPLES or 30,
    derandomize=not EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(probes(), min_size=1, max_size=4))
def test_a_watched_source_cannot_tell_mtd_from_a_twin_on_the_shuffled_ports(twins, sequence):
    seq = concrete(sequence)
    tried["sequences"] += 1
    tried["probes"] += len(seq)
    with ThreadPoolExecutor(2) as pool:
        got_mtd, got_twin = pool.map(lambda prober: prober.send([seq])[0], twins)
    for i, (p, m, t) in enumerate(zip(seq, got_mtd, got_twin, strict=True)):
        if canonical(m) == canonical(t):
            continue
        if not m and silent_by_design(p):
            continue
        raise AssertionError(f"probe {i} of {seq}:\n  mtd:  {m}\n  twin: {t}")


def test_the_twin_really_is_the_shuffled_view(twins):
    """The oracle is only as good as its twin: a SYN scan finds the same five services on the
    same ports in both labs (and the oracle's equality is not vacuous)."""
    with_mtd, twin = twins
    syn = [{"v": 4, "src": V[4][0], "dst": V[4][1], "proto": "tcp", "sport": 19999, "dport": p,
            "flags": "S"} for p in range(1, 21)]  # fmt: skip
    opened = [
        {p["dport"] for p, a in zip(syn, answers, strict=True) if "SA" in str(a)}
        for answers in (with_mtd.send([syn])[0], twin.send([syn])[0])
    ]
    assert opened[0] == opened[1] and len(opened[0]) == 5, opened
