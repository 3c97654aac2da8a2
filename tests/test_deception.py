"""A careful scanner that combines tricks (issue 12) learns nothing a host whose services really
listened on the shuffled ports would not tell it. Real packets: nmap where it can, scapy
(tests/wire.py) where it cannot. Every answer is checked against the invariants:

- an answer to a probe comes from the port the probe was sent to (TCP, UDP), and an ICMP
  error quotes the ports the probe carried;
- what a port answers depends only on where the source sees services (the shuffled ports),
  never on which real port sits behind it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.lab.netns import Lab, nmap_open, standard_lab
from tests import wire
from tests.conftest import ROOT, mtd, write_state
from tests.kernel import apply, expected_moves, seen_moves, visible

pytestmark = pytest.mark.netns

SERVICES = [1, 2, 3, 4, 5]
PORTS = range(1, 21)
V = {4: ("192.0.2.3", "192.0.2.1"), 6: ("2001:db8::3", "2001:db8::1")}


# Each careful-scanner test runs for an explicit entry, a per_source source (inside
# 0.0.0.0/0 and ::/0, its bucket's mapping) and a dynamic one (`mtd watch add`, listed
# nowhere else): the same guarantees hold for all three.
PER_SOURCE = {
    "watched": [
        {"source": "0.0.0.0/0", "per_source": True, "ignore": {"tcp": [1, 2]}},
        {"source": "::/0", "per_source": True, "ignore": {"tcp": [1, 2]}},
    ],
    "trusted": ["192.0.2.2", "2001:db8::2"],
}


@pytest.fixture(scope="module", params=["explicit", "per_source", "dynamic"])
def dlab(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Lab, Path]]:
    extra = {
        "explicit": {},
        "per_source": PER_SOURCE,
        "dynamic": {"watched": [{"source": "198.51.100.0/24"}]},
    }[request.param]
    state = write_state(tmp_path_factory.mktemp("dec") / "state.yaml", **extra)
    with standard_lab() as lab:
        quiet(lab)
        assert apply(lab, state).returncode == 0
        if request.param == "dynamic":
            for source in (V[4][0], V[6][0]):
                out = mtd("-s", str(state), "watch", "add", source, "--local", ns=lab)
                assert out.returncode == 0, out.stderr
        yield lab, state


def quiet(lab: Lab, role: str = "srv") -> None:
    """No ICMP rate limit: every probe of a closed port gets its answer. Neighbours known
    both ways, so no first answer waits for neighbour discovery. The lab's clients reach the
    server through a bridge: with br_netfilter loaded (the machine's choice), the bridge
    would run the IP hooks before the IP layer parses hop-by-hop options, and answer a
    firewall's reject itself, past every output hook (README); a plain host does neither."""
    lab.run(role, ["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0",
                   "net.bridge.bridge-nf-call-ip6tables=0"])  # fmt: skip
    lab.sh(role, "sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0")
    lab.sh(role, "sysctl -qw net.ipv4.icmp_msgs_per_sec=100000 net.ipv4.icmp_msgs_burst=100000")
    for client in [r for r in lab.hosts if r != role]:
        for addr in (lab.hosts[role].v4, lab.hosts[role].v6):
            lab.run(client, ["ping", "-c1", "-W5", addr])


def moves(state: Path, v: int, proto: str = "tcp") -> dict[int, int]:
    return seen_moves(state, V[v][0], proto)


def moved_away(state: Path, v: int) -> tuple[int, int]:
    """A TCP service and the port it is shown at, not its own: a service may be drawn to
    its own port at an epoch (issue 21, finding 4), and these tests need one that moved."""
    shown = moves(state, v)
    real = next(p for p in (3, 4, 5, 1, 2) if p in shown and shown[p] != p)
    return real, shown[real]


def probe(v: int, dport: int, **kw: object) -> dict:
    src, dst = V[v]
    return {"v": v, "src": src, "dst": dst, "proto": "tcp", "sport": 40000, "dport": dport, **kw}


def check_consistent(sent: dict, answers: list[dict]) -> None:
    """Every answer names the ports the probe carried, in the right places."""
    for a in answers:
        assert a["kind"] != "no-echo", (sent, answers)
        if a["kind"] in ("tcp", "udp"):
            assert (a["sport"], a["dport"]) == (sent["dport"], sent["sport"]), (sent, a, answers)
        elif a["kind"] == "icmp" and "quote" in a:
            assert a["quote"] == [sent["sport"], sent["dport"]], (sent, a)


def shape(answers: list[dict]) -> list[tuple]:
    """What an answer says about a port, without the port: the kind, flags, ICMP type."""
    return sorted((a["kind"], a.get("flags"), a.get("type"), a.get("code")) for a in answers)


def scan(lab: Lab, probes: list[dict]) -> list[list[dict]]:
    answers = [seq[0] for seq in wire.send(lab, "unt", [[p] for p in probes])]
    for p, a in zip(probes, answers, strict=True):
        check_consistent(p, a)
    return answers


# 1. Same source port, two scans --------------------------------------------------------------


@pytest.mark.parametrize("v", [4, 6])
def test_fin_scan_after_syn_scan_from_the_same_source_port_sees_the_shuffled_view(dlab, v):
    lab, state = dlab
    target = V[v][1]
    expected = visible(moves(state, v), SERVICES)
    assert set(nmap_open(lab, "unt", target, f"-sS -g {7000 + v}")) == expected
    found = nmap_open(lab, "unt", target, f"-sF -g {7000 + v}")
    assert set(found) == expected, found


@pytest.mark.parametrize("v", [4, 6])
def test_fins_after_a_half_open_syn_from_the_same_port_answer_from_the_port_asked(dlab, v):
    lab, state = dlab
    sport = 41000 + v
    hidden = moves(state, v)[3]
    probes = [probe(v, hidden, flags="S", sport=sport)]
    probes += [probe(v, port, flags="F", sport=sport, seq=5000) for port in PORTS]
    answers = scan(lab, probes)
    assert [a["flags"] for a in answers[0]] == ["SA"]
    silent = {p["dport"] for p, a in zip(probes[1:], answers[1:], strict=True) if not a}
    assert silent == visible(moves(state, v), SERVICES)


# 2. ICMP errors quote the rewritten port -------------------------------------------------------


@pytest.mark.parametrize(
    ("v", "opt"), [(4, "rr-bad"), (4, "rr"), (6, "dst-param"), (6, "dst-skip"), (6, "rt0")]
)
@pytest.mark.parametrize("flags", ["", "F", "S", "SF"])
def test_probes_with_ip_options_get_the_same_answer_at_every_port(dlab, v, opt, flags):
    lab, _ = dlab
    answers = scan(lab, [probe(v, port, flags=flags, opt=opt, sport=42000) for port in PORTS])
    assert len({tuple(shape(a)) for a in answers}) == 1, answers


def test_hop_by_hop_errors_quote_the_port_sent(dlab):
    lab, _ = dlab
    answers = scan(lab, [probe(6, port, flags="F", opt="hbh-param", sport=42100) for port in PORTS])
    assert len({tuple(shape(a)) for a in answers}) == 1, answers


# 3. UDP answers outside conntrack --------------------------------------------------------------


def test_udp_to_broadcast_multicast_and_other_addresses_never_answers_from_the_real_port(dlab):
    lab, state = dlab
    lab.sh("unt", "ip route add 224.0.0.0/4 dev eth0")
    hidden = moves(state, 4, "udp")[53]
    probes = [
        {"v": 4, "src": "192.0.2.3", "dst": dst, "proto": "udp", "sport": 43000 + i,
         "dport": port, "payload": "hello", "barrier": "192.0.2.1"}
        for i, (dst, port) in enumerate(
            (dst, port)
            for dst in ("192.0.2.255", "224.0.0.1", "198.51.100.1", "192.0.2.1")
            for port in (53, hidden)
        )
    ]  # fmt: skip
    answers = wire.send(lab, "unt", [[p] for p in probes])
    for p, (a,) in zip(probes, answers, strict=True):
        assert all(x.get("sport") != 53 for x in a), (p, a)
        assert all(x.get("quote", [0, hidden])[1] != hidden or p["dport"] == hidden for x in a)
    # The address the route picks answers the shuffled port, from the shuffled port.
    assert answers[-1][0] == [{"from": "192.0.2.1", "kind": "udp", "sport": hidden,
                               "dport": 43007, "data": "port 53\n"}]  # fmt: skip


# 6. A host firewall beside mtd --------------------------------------------------------------

FIREWALLS = {
    "reset": "meta l4proto tcp reject with tcp reset; reject with icmpx type admin-prohibited",
    "icmpx": "reject with icmpx type admin-prohibited",
}


@pytest.mark.parametrize("style", list(FIREWALLS))
def test_a_rejecting_host_firewall_answers_every_port_consistently(tmp_path, style):
    state = write_state(tmp_path / "state.yaml")
    allowed = ", ".join(map(str, SERVICES))
    ruleset = f"""
table inet filter {{
  chain input {{
    type filter hook input priority filter; policy accept;
    ct state established,related accept
    iif lo accept
    meta l4proto {{ icmp, ipv6-icmp }} accept
    tcp dport {{ {allowed} }} accept
    udp dport 53 accept
    {FIREWALLS[style]}
  }}
}}"""
    with standard_lab() as lab:
        quiet(lab)
        lab.run("srv", ["nft", "-f", "-"], input=ruleset, check=True)
        assert apply(lab, state).returncode == 0
        for v in (4, 6):
            expected = visible(moves(state, v), SERVICES)
            for flags in ("S", "F", "", "SF", "A", "SA"):
                probes = [probe(v, port, flags=flags, sport=44000) for port in PORTS]
                answers = scan(lab, probes)
                if flags == "S":
                    opened = {p["dport"] for p, a in zip(probes, answers, strict=True)
                              if shape(a) == [("tcp", "SA", None, None)]}  # fmt: skip
                    assert opened == expected, (v, opened, answers)
                    continue
                # Elsewhere, a moved port answers as an unmoved one of the same kind does.
                kinds = {tuple(shape(a)) for p, a in zip(probes, answers, strict=True)
                         if p["dport"] not in expected}  # fmt: skip
                assert len(kinds) == 1, (v, flags, answers)


# 4. Conntrack desynchronised from the socket ----------------------------------------------


@pytest.mark.parametrize("v", [4, 6])
def test_fin_retransmissions_after_conntrack_forgot_leave_from_the_shuffled_port(dlab, v):
    lab, state = dlab
    hidden = moves(state, v)[3]
    # The client's kernel would reset the hand-made connection; only scapy's packets pass.
    script = (
        "table inet client {\n chain out {\n type filter hook output priority 0;\n"
        f" tcp flags & rst == rst meta mark != {wire.MARK} drop\n }}\n}}\n"
    )
    lab.run("unt", ["nft", "-f", "-"], check=True, input=script)
    # Conntrack forgets a closing connection after 1 s instead of 10 s or 30 s, as it would
    # under pressure or after its timeout: the test waits less.
    lab.sh("srv", "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_close=1")
    lab.sh("srv", "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_last_ack=1")
    try:
        src, dst = V[v]
        args = {"v": v, "src": src, "dst": dst, "sport": 45000 + v, "dport": hidden}
        proc = lab.run(
            "unt",
            [sys.executable, "-m", "tests.wire", "eth0", "--desync"],
            input=json.dumps(args),
            cwd=ROOT,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        segments = json.loads(proc.stdout)
        assert segments and {s["sport"] for s in segments} == {hidden}, segments
    finally:
        lab.run("unt", ["nft", "delete", "table", "inet", "client"])
        lab.sh("srv", "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_close=10")
        lab.sh("srv", "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_last_ack=30")


# 5. Link-local -----------------------------------------------------------------------------


def test_link_local_sources_are_coverable_by_watching_fe80(tmp_path):
    """Not listed, a neighbour's link-local address is trusted (README); `fe80::/10` in the
    watched list covers every link-local source like any other prefix."""
    state = write_state(
        tmp_path / "state.yaml", watched=[{"source": "fe80::/10", "ignore": {"tcp": [1]}}]
    )
    with standard_lab() as lab:
        lab.sh("srv", "ip -6 addr add fe80::1/64 dev br0 nodad")
        lab.sh("unt", "ip -6 addr add fe80::3/64 dev eth0 nodad")
        assert apply(lab, state).returncode == 0
        seen = expected_moves(state)[("fe80::/10", "tcp")]
        found = nmap_open(lab, "unt", "fe80::1%eth0", "-sS -e eth0")
        assert set(found) == visible(seen, SERVICES), found
        # A global source that is not watched still sees the services where they are.
        assert set(nmap_open(lab, "unt", "2001:db8::1", "-sS")) == set(SERVICES)


# 7. A connection held across a rotation ------------------------------------------------------

HOLD = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), source_address=("", 7000))
s.recv(64)
print("connected", flush=True)
time.sleep(120)
"""


def test_a_connection_held_across_a_rotation_does_not_link_old_and_new_ports(tmp_path):
    state = write_state(tmp_path / "state.yaml")
    with standard_lab() as lab:
        quiet(lab)
        assert apply(lab, state).returncode == 0
        old = moves(state, 4)[3]
        held = lab.spawn(
            "unt", [sys.executable, "-c", HOLD, V[4][1], str(old)], stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert held.stdout is not None and held.stdout.readline().strip() == "connected"
        while moves(state, 4)[3] == old:  # rotate until service 3 moves elsewhere
            assert apply(lab, state, cmd="rotate").returncode == 0
        new = moves(state, 4)[3]
        probes = [probe(4, new, flags=f, sport=7000, seq=5) for f in ("SF", "SA", "S", "SR")]
        for p, answers in zip(probes, scan(lab, probes), strict=True):
            assert all(a.get("sport") != old for a in answers), (p, answers)


# 8. ICMP errors from the watched source (issue 21, finding 1) ---------------------------------


def quoting(lab: Lab, v: int, **args: object) -> dict:
    """`tests.wire --quoting` from the client, whose own kernel stays out of the way (it
    would reset the hand-made handshake)."""
    script = (
        "table inet client {\n chain out {\n type filter hook output priority 0;\n"
        f" tcp flags & rst == rst meta mark != {wire.MARK} drop\n }}\n}}\n"
    )
    lab.run("unt", ["nft", "-f", "-"], check=True, input=script)
    try:
        src, dst = V[v]
        proc = lab.run(
            "unt",
            [sys.executable, "-m", "tests.wire", "eth0", "--quoting"],
            input=json.dumps({"v": v, "src": src, "dst": dst, **args}),
            cwd=ROOT,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)
    finally:
        lab.run("unt", ["nft", "delete", "table", "inet", "client"])
        lab.sh("srv", "ip route flush cache; ip -6 route flush cache")


@pytest.mark.parametrize("v", [4, 6])
def test_a_fatal_error_quoting_the_real_port_leaves_the_half_open_connection(dlab, v):
    """A SYN to the shuffled port R, then an unreachable quoting the real port behind R: a
    host listening at R has no connection at the real port, so the ACK completes the
    handshake. The same error quoting R aborts it (the control: errors are delivered)."""
    lab, state = dlab
    service, shuffled = moved_away(state, v)
    real = quoting(lab, v, kind="abort", sport=46000 + v, port=shuffled, quote=service)
    assert "R" not in real["after_ack"], real
    seen = quoting(lab, v, kind="abort", sport=46010 + v, port=shuffled, quote=shuffled)
    assert "R" in seen["after_ack"], seen


@pytest.mark.parametrize("v", [4, 6])
def test_a_path_mtu_error_quoting_the_real_udp_port_changes_nothing(dlab, v):
    """An ICMP "fragmentation needed" quoting the real UDP port 53 would lower the path MTU toward
    the source (seen in the next SYN-ACK's MSS) only because a socket sits there."""
    lab, state = dlab
    opened, plain = moves(state, v)[3], {4: 1460, 6: 1440}[v]
    got = quoting(lab, v, kind="pmtu", sport=46100 + 2 * v, quote=53, mss_port=opened)
    assert got["mss"] == plain, got
    # The control: after an exchange with the shuffled port, an error about it counts.
    udp = moves(state, v, "udp")[53]
    got = quoting(lab, v, kind="pmtu", sport=46120 + 2 * v, quote=udp, exchange=udp,
                  mss_port=opened)  # fmt: skip
    assert got["mss"] == {4: 960, 6: 1220}[v], got


@pytest.mark.parametrize("v", [4, 6])
def test_errors_forged_from_an_address_not_watched_reach_no_real_port(dlab, v):
    """The same errors with the source address of a host that is not watched (for
    explicit and dynamic sources; per_source on /0 watches it too): no answer is needed, so
    forging costs nothing."""
    lab, state = dlab
    (service, shuffled), forged = moved_away(state, v), {4: "203.0.113.9", 6: "2001:db8:f::9"}[v]
    got = quoting(lab, v, kind="abort", sport=46200 + v, port=shuffled, quote=service,
                  outer=forged)  # fmt: skip
    assert "R" not in got["after_ack"], got
    # A quoted header with options or extension headers: the kernel finds the port all the same.
    got = quoting(lab, v, kind="abort", sport=46220 + v, port=shuffled, quote=service, outer=forged,
                  inner_opt=True)  # fmt: skip
    assert "R" not in got["after_ack"], got
    got = quoting(lab, v, kind="pmtu", sport=46210 + 2 * v, quote=53, mss_port=shuffled,
                  outer=forged)  # fmt: skip
    assert got["mss"] == {4: 1460, 6: 1440}[v], got


# 9. The server's other address (issue 21, finding 3) ----------------------------------------


@pytest.mark.parametrize("v", [4, 6])
def test_udp_to_the_other_address_leaves_the_view_of_the_first_unchanged(dlab, v):
    """A datagram to the source's shuffled UDP port at the server's other address (silence,
    README) changes nothing the source then sees at either address."""
    lab, state = dlab
    src, dst = V[v]
    other = {4: "198.51.100.1", 6: "2001:db8:bad::1"}[v]
    udp = {"v": v, "src": src, "dst": other, "proto": "udp", "sport": 47000 + v,
           "dport": moves(state, v, "udp")[53], "payload": "hello", "barrier": dst}  # fmt: skip
    expected = visible(moves(state, v), SERVICES)
    for sport in (47010 + v, udp["sport"]):  # a fresh source port, and the datagram's
        answers = wire.send(lab, "unt", [[udp], [probe(v, p, sport=sport) for p in PORTS],
                                         [{**probe(v, p, sport=sport), "dst": other}
                                          for p in PORTS]])  # fmt: skip
        for scanned in answers[1:]:
            # Only answers to this port: an earlier test's connection may still retransmit.
            scanned = [[a for a in got if a.get("dport", sport) == sport] for got in scanned]
            opened = {p for p, a in zip(PORTS, scanned, strict=True)
                      if shape(a) == [("tcp", "SA", None, None)]}  # fmt: skip
            assert opened == expected, (v, sport, opened, scanned)
