"""Differential oracle: a watched source must not tell mtd's host from a twin whose services
really listen on the shuffled ports that source sees.

Two labs with the same addresses: in one, mtd runs (template `maps`) and the services sit
on their real ports; in the twin, nothing but listeners on the ports `mtd mapping --source`
reports, answering with the same banners. Hypothesis draws sequences of hand-made probes
(tests/wire.py: TCP flags, ports in and out of the range, source ports reused within a
sequence, IP options and IPv6 extension headers, fragments, payloads, the server's other
address, handshakes completed and connections kept open for probes on them, ICMP errors
quoting chosen ports to a half-open or open connection's client port, from the client or
forged with another address), scapy sends each
sequence to both, and the normalised answers
must be equal. The only differences allowed are the documented ones (README, "What a
watched source can learn"): mtd drops packets with IPv4 options or IPv6 destination-options
or routing headers from watched sources, at every port; UDP asked at an address its route
does not answer from gets silence; an ICMP error about a UDP port the source exchanged
nothing with is dropped (the twin lowers the path MTU if its socket sits there); a SYN on an
established connection gets silence, not a challenge ACK. Any other difference fails with
the shrunk sequence.

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
OTHER = {4: "198.51.100.1", 6: "2001:db8:bad::1"}  # the server's other address, same link
FORGED = {4: "203.0.113.9", 6: "2001:db8:f::9"}
CLIENT = (
    "table inet client {\n chain out {\n type filter hook output priority 0;\n"
    f" tcp flags & rst == rst meta mark != {wire.MARK} drop\n }}\n}}\n"
)
# Symbolic ports: "o<k>" is the k-th open TCP port of the source's view, "u0" its UDP
# service's port (a scanner finds both with one scan), resolved per lab in `concrete`.
OPEN = ["o0", "o1", "o2", "o3", "o4"]
# Flags on an established connection the kernel answers at once (a FIN or data would wait
# for the service's own answer, which may come after the probe's echo).
ON_CONNECTION = ["S", "SA", "SF", "A", "R", "RA", "U"]
VIEW: dict[int, dict[str, list[int]]] = {4: {}, 6: {}}
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
            for proto in ("tcp", "udp"):  # open ports, and the real port behind each
                seen = sorted((int(s), int(r)) for r, s in view[proto].items())
                VIEW[v][proto] = [s for s, _ in seen]
                VIEW[v]["real_" + proto] = [r for _, r in seen]
        for each in (lab, twin):
            quiet(each)
            # Half-open connections stay open (the client's kernel resets nothing of
            # scapy's, so an error can quote one) without retransmitting their SYN-ACKs
            # into a later probe's answers.
            each.sh("srv", "sysctl -qw net.ipv4.tcp_synack_retries=0")
            # Every challenge ACK is sent: a rate limit would make one probe's answer depend
            # on an earlier one's (mtd is silent to some, by design).
            each.sh("srv", "sysctl -qw net.ipv4.tcp_invalid_ratelimit=0")
            each.run("unt", ["nft", "-f", "-"], check=True, input=CLIENT)
        yield wire.Prober(lab, "unt"), wire.Prober(twin, "unt")
    if EXAMPLES:
        print(f"\noracle: tried {tried['sequences']} probe sequences, {tried['probes']} probes")


@st.composite
def probes(draw: st.DrawFn) -> dict:
    v = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from(["tcp", "tcp", "tcp", "udp", "icmp"]))
    p = {
        "v": v,
        "src": V[v][0],
        "dst": draw(st.sampled_from([V[v][1], V[v][1], OTHER[v]])),
        "barrier": V[v][1],
        "proto": proto,
        "sport": draw(st.integers(0, 2)),  # an index: each sequence gets fresh source ports
    }
    if proto == "icmp":  # an error quoting a chosen port, to the client port `sport`
        p["qproto"] = draw(st.sampled_from(["tcp", "tcp", "udp"]))
        p["quote"] = draw(st.sampled_from([*PORTS, *OPEN, "u0"]))
        p["code"] = draw(st.sampled_from(["unreach", "pmtu"]))
        return p
    p["dport"] = draw(st.sampled_from([*PORTS, *OPEN, "u0"]))
    p["payload"] = draw(st.sampled_from(["", "", "hello\n"]))
    p["opt"] = draw(st.sampled_from(["", "", "", "", *OPTS[v]]))
    p["frag"] = draw(st.sampled_from([0, 0, 0, 0, 8, 16]))
    if proto == "tcp":
        p["flags"] = draw(st.sampled_from(FLAGS))
        p["seq"] = draw(st.sampled_from([1000, 1000, 4_000_000_000]))
        p["ack"] = draw(st.sampled_from([0, 1]))
        # The ACK that completes the handshake of the port's last SYN-ACK (banner, reset).
        p["complete"] = draw(st.sampled_from([False, False, False, True]))
    return p


def silent_by_design(p: dict) -> bool:
    """Where mtd's host is silent at every port alike: options and headers it drops, UDP
    asked at the address its route does not answer from, and IPv6 fragments whose first one
    lacks the transport header (conntrack's reassembly drops them; a host without netfilter
    answers with a parameter problem, RFC 7112)."""
    if p.get("opt") in DROPPED or p["proto"] == "icmp":
        return True
    if p["proto"] == "udp" and p["dst"] == OTHER[p["v"]]:
        return True
    chain = (20 if p["proto"] == "tcp" else 8) + {"rt0": 24, "": 0}.get(p.get("opt", ""), 8)
    return p["v"] == 6 and 0 < p.get("frag", 0) < chain


@st.composite
def scenario(draw: st.DrawFn) -> list[dict]:
    """A connection (half-open, or completed) to an open port, an ICMP error about a chosen
    port to the same client port, then what would show its effect: the handshake's ACK (a
    reset if the error aborted it) or a SYN elsewhere (its SYN-ACK's MSS: the path MTU)."""
    v = draw(st.sampled_from([4, 6]))
    base = {"v": v, "src": V[v][0], "dst": V[v][1], "barrier": V[v][1], "payload": ""}
    tcp = {**base, "proto": "tcp", "opt": "", "frag": 0, "seq": 1000, "ack": 0}
    k = draw(st.integers(0, len(OPEN) - 1))
    port = OPEN[k]
    seq = [{**tcp, "sport": 0, "dport": port, "flags": "S"}]
    if draw(st.booleans()):
        seq.append({**tcp, "sport": 0, "dport": port, "flags": "A", "complete": True})
        if draw(st.booleans()):  # kept open: probes on the established connection
            seq[-1]["keep"] = True
            for flags in draw(st.lists(st.sampled_from(ON_CONNECTION), min_size=1, max_size=2)):
                seq.append({**tcp, "sport": 0, "dport": port, "flags": flags, "est": True})
    if draw(st.booleans()):  # an exchange with the UDP service first
        seq.append({**base, "proto": "udp", "sport": 0, "dport": "u0", "opt": "", "frag": 0})
    # The quote: the real port behind the connection's (what a scanner would try to find),
    # the connection's own, the UDP service's real or open port, or any port.
    quote, qproto = draw(st.sampled_from(
        [(f"r{k}", "tcp"), (port, "tcp"), ("r53", "udp"), ("u0", "udp"), ("any", "")]
    ))  # fmt: skip
    if quote == "any":
        quote = draw(st.sampled_from([*PORTS, *OPEN, "u0"]))
        qproto = draw(st.sampled_from(["tcp", "udp"]))
    seq.append(
        {**base, "proto": "icmp", "sport": 0, "qproto": qproto, "quote": quote,
         "code": draw(st.sampled_from(["unreach", "pmtu"])),
         # from the client, or forged with an address no entry lists (no answer needed)
         "outer": draw(st.sampled_from(["", "", FORGED[v]]))}
    )  # fmt: skip
    if draw(st.booleans()):
        seq.append({**tcp, "sport": 0, "dport": port, "flags": "A", "complete": True})
    else:
        seq.append({**tcp, "sport": 1, "dport": draw(st.sampled_from(OPEN)), "flags": "S"})
    return seq


def concrete(seq: list[dict]) -> list[dict]:
    """Fresh source ports, and the symbolic ports of the view resolved."""
    base = 20000 + 4 * (next(_fresh) % 10000)

    def port(p: dict, value: int | str) -> int:
        if isinstance(value, int):
            return value
        view = VIEW[p["v"]]
        if value in ("u0", "r53"):
            return view["udp" if value == "u0" else "real_udp"][0]
        return view["tcp" if value[0] == "o" else "real_tcp"][int(value[1:])]

    out = []
    for p in seq:
        q = {**p, "sport": base + p["sport"]}
        for key in ("dport", "quote"):
            if key in q:
                q[key] = port(q, q[key])
        out.append(q)
    return out


def canonical(answers: list[dict]) -> list[str]:
    return sorted(json.dumps(a, sort_keys=True) for a in answers)


@settings(
    max_examples=EXAMPLES or 30,
    derandomize=not EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.one_of(st.lists(probes(), min_size=1, max_size=4), scenario()))
def test_a_watched_source_cannot_tell_mtd_from_a_twin_on_the_shuffled_ports(twins, sequence):
    seq = concrete(sequence)
    tried["sequences"] += 1
    tried["probes"] += len(seq)
    try:
        with ThreadPoolExecutor(2) as pool:
            got_mtd, got_twin = pool.map(lambda prober: prober.send([seq])[0], twins)
    finally:  # a path MTU an error lowered must not reach the next sequence
        if any(p.get("code") == "pmtu" for p in seq):
            for prober in twins:
                prober.lab.sh("srv", "ip route flush cache; ip -6 route flush cache")
    exchanged: set[tuple[int, int]] = set()
    kept: set[tuple[int, int]] = set()
    blind = False  # after an error about a UDP port nothing was exchanged with: see below
    for i, (p, m, t) in enumerate(zip(seq, got_mtd, got_twin, strict=True)):
        if p["proto"] == "udp" and p["dst"] == p["barrier"]:
            exchanged.add((p["dport"], p["sport"]))
        if p.get("keep"):
            kept.add((p["dport"], p["sport"]))
        if p.get("est") and "S" in p["flags"] and not m and (p["dport"], p["sport"]) in kept:
            continue  # silence for SYNs on an established connection (README)
        if p["proto"] == "icmp" and p["qproto"] == "udp" and p["code"] == "pmtu":
            # mtd drops one about a port nothing was exchanged with (README): the twin
            # lowers the path MTU if its socket sits there.
            unsolicited = (p["quote"], p["sport"]) not in exchanged
            blind = blind or (unsolicited and p["quote"] in VIEW[p["v"]]["udp"])
        if canonical(m if not blind else no_mss(m)) == canonical(t if not blind else no_mss(t)):
            continue
        if not m and silent_by_design(p):
            continue
        raise AssertionError(f"probe {i} of {seq}:\n  mtd:  {m}\n  twin: {t}")


def no_mss(answers: list[dict]) -> list[dict]:
    """Answers without what the path MTU sets: the MSS, and the window (a multiple of it)."""
    return [
        {
            **{k: x for k, x in a.items() if k != "win"},
            "opts": [o for o in a.get("opts", []) if o[0] != "MSS"],
        }
        for a in answers
    ]


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
    # A completed handshake gets the banner in both (the probes on connections are real).
    port = min(opened[0])
    handshake = concrete([{**syn[0], "sport": 0, "dport": port},
                          {**syn[0], "sport": 0, "dport": port, "complete": True}])  # fmt: skip
    banners = [prober.send([handshake])[0][1] for prober in twins]
    assert banners[0] == banners[1] and banners[0][0]["data"].startswith("port "), banners
