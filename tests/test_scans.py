"""Real nmap scans from untrusted, prefix and trusted clients: what each of them sees.

One lab per module (scans are slow); every scan mode the proof of concept handled, and the
stateless probes it did not (PSH, URG, SYN|FIN), over IPv4 and IPv6, TCP and UDP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.lab.netns import Lab, nmap_open, standard_lab
from tests.conftest import write_state
from tests.kernel import apply, expected_moves, visible

pytestmark = pytest.mark.netns

SERVICES = [1, 2, 3, 4, 5]
STATEFUL = ["-sS", "-sT"]
STATELESS = ["-sF", "-sN", "-sX", "--scanflags PSH", "--scanflags URG", "--scanflags SYNFIN"]
CLIENTS = {  # role -> (IPv4 source label, IPv6 source label); None: trusted
    "unt": ("192.0.2.3", "2001:db8::3"),
    "net": ("198.51.100.0/24", "2001:db8:bad::/48"),
    "tru": None,
}
# Each client asks the server address on its own subnet, as a real client would (a wildcard
# UDP listener answers from the address the route picks).
TARGETS = {
    "unt": {"v4": "192.0.2.1", "v6": "2001:db8::1"},
    "tru": {"v4": "192.0.2.1", "v6": "2001:db8::1"},
    "net": {"v4": "198.51.100.1", "v6": "2001:db8:bad::1"},
}


@pytest.fixture(scope="module")
def maps_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    state = write_state(tmp_path_factory.mktemp("maps") / "state.yaml")
    with standard_lab() as lab:
        # Closed UDP ports answer ICMP at full speed, so nmap -sU is not rate-limited.
        lab.sh("srv", "sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0")
        assert apply(lab, state).returncode == 0
        yield lab, state


def where_services_are(state: Path, role: str, family: str) -> set[int]:
    labels = CLIENTS[role]
    if labels is None:
        return set(SERVICES)
    moves = expected_moves(state)[(labels[0 if family == "v4" else 1], "tcp")]
    return visible(moves, SERVICES)


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("role", list(CLIENTS))
@pytest.mark.parametrize("mode", STATEFUL + STATELESS)
def test_tcp_scans_see_services_only_where_expected(maps_lab, role, family, mode):
    lab, state = maps_lab
    found = nmap_open(lab, role, TARGETS[role][family], mode)
    expected = where_services_are(state, role, family)
    assert set(found) == expected, (mode, found, expected)
    if mode in STATEFUL:
        assert set(found.values()) == {"open"}
    else:  # no answer at a listening port, RST (closed) everywhere else
        assert set(found.values()) <= {"open|filtered", "filtered"}


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("role", list(CLIENTS))
def test_udp_reaches_the_service_at_its_shuffled_port(maps_lab, role, family):
    lab, state = maps_lab
    labels = CLIENTS[role]
    target = TARGETS[role][family]
    port = 53 if labels is None else expected_moves(state)[(labels[family == "v6"], "udp")][53]
    assert lab.probe(role, "udp", target, port) == "port 53"
    if port != 53:
        assert lab.probe(role, "udp", target, 53) == "closed"
        found = nmap_open(lab, role, target, "-sU", ports=f"{port},53")
        assert found.get(port) == "open" and 53 not in found, found


def test_ignored_ports_stay_in_place_for_that_source(maps_lab):
    lab, _ = maps_lab
    assert lab.probe("unt", "tcp", "192.0.2.1", 1) == "port 1"
    assert lab.probe("unt", "tcp", "2001:db8::1", 2) == "port 2"


def test_classic_template_deceives_the_scans_the_seed_handled(tmp_path: Path):
    state = write_state(
        tmp_path / "state.yaml",
        template="classic",
        ports={"range": [1, 20], "services": {"tcp": SERVICES}},
        watched=[{"source": "192.0.2.3", "ignore": {"tcp": [1, 2]}}],
    )
    with standard_lab() as lab:
        assert apply(lab, state).returncode == 0
        assert apply(lab, state, cmd="diff").returncode == 0
        expected = visible(expected_moves(state)[("192.0.2.3", "tcp")], SERVICES)
        for mode in ["-sS", "-sT", "-sF", "-sN", "-sX"]:
            assert set(nmap_open(lab, "unt", "192.0.2.1", mode)) == expected, mode
            assert set(nmap_open(lab, "tru", "192.0.2.1", mode)) == set(SERVICES), mode
