"""per_source prefixes, trusted sources, dynamic watching and the tripwire with real packets:
each source's view, probed port by port from inside a lab client, is the one `mtd mapping
--source` computes (so core.bucket's jhash is the kernel's), and kernel state does not grow
with the number of sources. The pure jhash is checked against known kernel values too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from reconciler.adapters import files
from reconciler.core import bucket, shuffle
from reconciler.lab.netns import Lab, nmap_open, standard_lab
from tests.conftest import ROOT, mtd, write_state
from tests.kernel import apply, seen_moves, visible

SERVICES = [1, 2, 3, 4, 5]
SERVER4, SERVER6 = "192.0.2.1", "2001:db8::1"
SOURCES4 = [f"192.0.2.{i}" for i in range(100, 112)]
# Six /64s, and a second address in the first one (same /64: same view).
SOURCES6 = [f"2001:db8:0:{i}::5" for i in range(1, 7)] + ["2001:db8:0:1::77"]
INTERNET = {
    "watched": [
        {"source": "0.0.0.0/0", "per_source": True},
        {"source": "::/0", "per_source": True},
    ],
    "trusted": ["192.0.2.2", "2001:db8::2", "203.0.113.0/24"],
    "buckets": 64,
}


def test_jhash_is_the_kernels_on_fixed_inputs():
    """Values of Linux's jhash(): lookup3's published check (empty key, seed 0 ->
    0xdeadbeef) and inputs across the 12-byte block boundary, read little-endian."""
    assert bucket.jhash(b"", 0) == 0xDEADBEEF
    assert bucket.jhash(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert bucket.jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert bucket.jhash(b"Four score and seven years ago", 1) == 0xCD628161
    assert bucket.scale(0xFFFFFFFF, 64) == 63 and bucket.scale(0, 64) == 0
    assert bucket.unit("2001:db8:0:1::5") == bucket.unit("2001:db8:0:1:ffff::1")


def views(lab: Lab, target: str, sources: list[str], role: str = "unt") -> dict[str, dict]:
    """{source: {"tcp": {port: real}, "udp": {port: real}}}: what answers, probed for real."""
    args = {"target": target, "sources": sources, "ports": list(range(1, 21)),
            "udp": [*range(1, 21), 53]}  # fmt: skip
    proc = lab.run(role, [sys.executable, "-m", "tests.views"], input=json.dumps(args),
                   cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {s: {p: {int(k): r for k, r in v.items()} for p, v in view.items()}
            for s, view in json.loads(proc.stdout).items()}  # fmt: skip


def expected(state: Path, source: str) -> dict[str, dict[int, int]]:
    """The view `mtd mapping --source` gives: {proto: {port seen: real port}}."""
    proc = mtd("-s", str(state), "mapping", "--source", source, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    return {p: {seen: int(real) for real, seen in out[p].items()} for p in ("tcp", "udp")}


def add_sources(lab: Lab) -> None:
    """The extra source addresses on the untrusted client; no ICMP rate limit on the server,
    so each closed UDP port answers at once."""
    lab.sh("srv", "sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0")
    for addr in SOURCES4:
        lab.sh("unt", f"ip addr add {addr}/24 dev eth0")
    for addr in SOURCES6:
        lab.sh("unt", f"ip -6 addr add {addr}/64 dev eth0 nodad")
    lab.sh("srv", "ip -6 route add 2001:db8::/32 dev br0 metric 2048")


def valid_shuffle(view: dict[int, int], services: list[int]) -> None:
    """Every service answers, each at a port of its own, all in the range (a service port
    too: there, another service or the same one answers)."""
    assert sorted(view.values()) == services, view
    assert all(1 <= p <= 20 for p in view), view


def test_per_source_gives_each_source_its_buckets_view_as_mtd_mapping_computes(tmp_path):
    state = write_state(tmp_path / "state.yaml", **INTERNET)
    with standard_lab() as lab:
        add_sources(lab)
        assert apply(lab, state).returncode == 0
        found4 = views(lab, SERVER4, SOURCES4)
        for source, view in found4.items():
            valid_shuffle(view["tcp"], SERVICES)
            assert list(view["udp"].values()) == [53] and 53 not in view["udp"], view
            assert view == expected(state, source), source
        assert len({json.dumps(v, sort_keys=True) for v in found4.values()}) >= 8, found4
        found6 = views(lab, SERVER6, SOURCES6)
        for source, view in found6.items():
            valid_shuffle(view["tcp"], SERVICES)
            assert view == expected(state, source), source
        assert found6["2001:db8:0:1::5"] == found6["2001:db8:0:1::77"]  # one /64, one view
        assert len({json.dumps(v, sort_keys=True) for v in found6.values()}) >= 4, found6
        # A trusted address inside 0.0.0.0/0 (and ::/0) sees the real ports.
        real = {"tcp": {p: p for p in SERVICES}, "udp": {53: 53}}
        assert views(lab, SERVER4, ["192.0.2.2"], role="tru")["192.0.2.2"] == real
        assert views(lab, SERVER6, ["2001:db8::2"], role="tru")["2001:db8::2"] == real
        assert expected(state, "192.0.2.2") == real
        # A rotation changes the seed and every bucket's shuffle; the kernel follows.
        assert apply(lab, state, cmd="rotate").returncode == 0
        again = views(lab, SERVER4, SOURCES4[:4])
        for source, view in again.items():
            assert view == expected(state, source), source
        assert again != {s: found4[s] for s in again}


@pytest.mark.parametrize("mode", ["-sS", "-sF", "-sN", "-sX", "-sF --scanflags PSH",
                                  "-sF --scanflags URG"])  # fmt: skip
def test_stateless_probes_of_a_per_source_source_match_its_syn_view(tmp_path, mode):
    state = write_state(tmp_path / "state.yaml", **INTERNET)
    with standard_lab() as lab:
        add_sources(lab)
        assert apply(lab, state).returncode == 0
        for v, target in ((4, SERVER4), (6, SERVER6)):
            want = visible(seen_moves(state, "192.0.2.3" if v == 4 else "2001:db8::3"), SERVICES)
            assert set(nmap_open(lab, "unt", target, mode)) == want, (v, mode)


# Issue 21, finding 4: were service ports never targets, the ports of the range closed in
# every view would be exactly the service ports. Explicit, per_source and dynamic sources.
SHUFFLED = {
    "watched": [
        {"source": "192.0.2.100"},
        {"source": "192.0.2.101"},
        {"source": "192.0.2.104/29", "per_source": True},
        {"source": "2001:db8:0:1::5"},
        {"source": "2001:db8:0:2::/63", "per_source": True},
    ],
}
KINDS = {
    "explicit": ["192.0.2.100", "192.0.2.101", "2001:db8:0:1::5"],
    "per_source": [*SOURCES4[4:], "2001:db8:0:2::5", "2001:db8:0:3::5"],
    "dynamic": ["192.0.2.102", "192.0.2.103", "2001:db8:0:4::5"],
}


def test_service_ports_are_shown_in_some_view_and_real_ports_stay_closed(tmp_path):
    """Over three epochs, a service port of the range is open in some view of each kind of
    source; every view holds exactly the moved services, at the ports `mtd mapping` names,
    and a real port answers only where a service is shown at it. The leak counter counts
    exactly the new connections to a real port that shows nothing to that source."""
    state = write_state(tmp_path / "state.yaml", **SHUFFLED)
    with standard_lab() as lab:
        add_sources(lab)
        assert apply(lab, state).returncode == 0
        for source in KINDS["dynamic"]:
            out = mtd("-s", str(state), "watch", "add", source, "--local", ns=lab)
            assert out.returncode == 0, out.stderr
        shown: dict[str, set[int]] = {kind: set() for kind in KINDS}
        for epoch in range(3):
            if epoch:
                assert apply(lab, state, cmd="rotate").returncode == 0
            for fam, server in (("ip", SERVER4), ("ip6", SERVER6)):
                sources = [s for k in KINDS.values() for s in k if (":" in s) == (fam == "ip6")]
                before = counter(lab, f"real_port_{fam}")
                found = views(lab, server, sources)
                leaks = 0
                for kind, members in KINDS.items():
                    for source in set(members) & set(found):
                        view = found[source]
                        assert view == expected(state, source), (epoch, source)
                        valid_shuffle(view["tcp"], SERVICES)
                        assert list(view["udp"].values()) == [53], view
                        shown[kind] |= set(view["tcp"]) & set(SERVICES)
                        leaks += len(set(SERVICES) - set(view["tcp"])) + 1  # UDP 53 too
                assert counter(lab, f"real_port_{fam}") - before == leaks, (epoch, fam)
        assert all(shown.values()), shown


def element_count(lab: Lab) -> int:
    listing = json.loads(lab.sh("srv", "nft -j list table inet mtd"))["nftables"]
    return sum(len(next(iter(o.values())).get("elem", [])) for o in listing
               if "set" in o or "map" in o)  # fmt: skip


def test_kernel_state_is_the_same_for_one_source_or_the_whole_internet(tmp_path):
    one = {**INTERNET, "watched": [{"source": "192.0.2.3", "per_source": True},
                                   {"source": "2001:db8::3/128", "per_source": True}]}  # fmt: skip
    with standard_lab() as lab:
        assert apply(lab, write_state(tmp_path / "one.yaml", **one)).returncode == 0
        small = element_count(lab)
        rules_small = lab.sh("srv", "nft -a list table inet mtd").count("# handle")
        assert apply(lab, write_state(tmp_path / "all.yaml", **INTERNET)).returncode == 0
        assert element_count(lab) == small
        assert lab.sh("srv", "nft -a list table inet mtd").count("# handle") == rules_small


def as_dynamic(state: Path, source: str) -> dict[str, dict[int, int]]:
    """The view of `source`'s bucket (as a dynamic source sees it), whatever else holds it."""
    s = files.load_state(state)
    secret, epoch = files.load_secret(s.secret_file), files.read_epoch(s.epoch_file)
    moves = shuffle.compute(s, secret, epoch).bucket_of(source)
    return {p: {hid: real for real, hid in moves.get(p, {}).items()} for p in ("tcp", "udp")}


REAL = {"tcp": {p: p for p in SERVICES}, "udp": {53: 53}}


def test_watch_add_moves_a_source_a_rotation_keeps_it_and_explicit_entries_win(tmp_path):
    state = write_state(tmp_path / "state.yaml")  # 192.0.2.2 (tru) is listed nowhere
    with standard_lab() as lab:
        add_sources(lab)
        assert apply(lab, state).returncode == 0
        assert views(lab, SERVER4, ["192.0.2.2"], role="tru")["192.0.2.2"] == REAL
        for source in ("192.0.2.2", "192.0.2.3"):
            out = mtd("-s", str(state), "watch", "add", source, "--local", "--for", "1h", ns=lab)
            assert out.returncode == 0, out.stderr
        view = views(lab, SERVER4, ["192.0.2.2"], role="tru")["192.0.2.2"]
        assert view == expected(state, "192.0.2.2") == as_dynamic(state, "192.0.2.2") != REAL
        valid_shuffle(view["tcp"], SERVICES)
        # The explicit entry of 192.0.2.3 wins over its dynamic one.
        explicit = {p: {h: r for r, h in seen_moves(state, "192.0.2.3", p).items()}
                    for p in ("tcp", "udp")}  # fmt: skip
        assert explicit != as_dynamic(state, "192.0.2.3")
        got = views(lab, SERVER4, ["192.0.2.3"])["192.0.2.3"]
        assert got["tcp"] == {**{p: p for p in (1, 2)}, **explicit["tcp"]}
        # A rotation re-adds the entry (the store) with a new seed and shuffle.
        assert apply(lab, state, cmd="rotate").returncode == 0
        again = views(lab, SERVER4, ["192.0.2.2"], role="tru")["192.0.2.2"]
        assert again == as_dynamic(state, "192.0.2.2") != REAL
        out = mtd("-s", str(state), "watch", "del", "192.0.2.2", "--local", ns=lab)
        assert out.returncode == 0, out.stderr
        assert views(lab, SERVER4, ["192.0.2.2"], role="tru")["192.0.2.2"] == REAL


def counter(lab: Lab, name: str) -> int:
    listing = json.loads(lab.sh("srv", f"nft -j list counter inet mtd {name}"))["nftables"]
    return next(o["counter"]["packets"] for o in listing if "counter" in o)


BACKEND = "Nft"
TRIPS = (
    "import json; from reconciler.adapters.kernel import {cls}; "
    "from reconciler.services.daemon import Packets; "
    "print(json.dumps(Packets(lambda: {cls}().counters('mtd')).totals()))"
)


def exported_trips(lab: Lab) -> dict[str, int]:
    """What the daemon's `mtd_packets_total` exports, read from the lab's kernel."""
    code = TRIPS.format(cls=BACKEND)
    proc = lab.run("srv", [sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-1000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize(("v", "source", "target"), [(4, "192.0.2.2", SERVER4),
                                                    (6, "2001:db8::2", SERVER6)])  # fmt: skip
def test_a_source_that_touches_a_tripwire_port_sees_the_shuffled_view_from_then_on(
    tmp_path, v, source, target
):
    state = write_state(tmp_path / "state.yaml", tripwire={"tcp": [23], "udp": [69], "for": 600})
    with standard_lab() as lab:
        add_sources(lab)
        assert apply(lab, state).returncode == 0
        assert views(lab, target, [source], role="tru")[source] == REAL
        fam = "ip" if v == 4 else "ip6"
        assert counter(lab, f"trip_{fam}") == 0
        assert lab.probe("tru", "tcp", target, 23) == "closed"  # the trip
        assert counter(lab, f"trip_{fam}") == 1
        assert exported_trips(lab)[f"tripwire_{fam}"] == 1  # mtd_packets_total{kind=tripwire}
        view = views(lab, target, [source], role="tru")[source]
        assert view == as_dynamic(state, source) != REAL
        valid_shuffle(view["tcp"], SERVICES)
        listed = json.loads(mtd("-s", str(state), "watch", "list", "--json", ns=lab).stdout)
        unit = source if v == 4 else "2001:db8::/64"
        assert [(r["source"], r["origin"], r["in_kernel"]) for r in listed] == [
            (unit, "tripwire", True)
        ]
        assert 590 <= listed[0]["seconds_left"] <= 600
        # The kernel's own addition is runtime state, not drift.
        diff = mtd("-s", str(state), "diff", ns=lab)  # exit 0: in sync
        assert diff.returncode == 0, diff.stdout + diff.stderr
        # Touching it again neither counts as a new trip nor renews the entry.
        assert lab.probe("tru", "tcp", target, 23) == "closed"
        assert counter(lab, f"trip_{fam}") == 1
        # A full replacement (an apply, a rotation) keeps the trip, now in the store too.
        assert apply(lab, state, cmd="rotate").returncode == 0
        assert views(lab, target, [source], role="tru")[source] == expected(state, source)
        assert expected(state, source) == as_dynamic(state, source) != REAL


SPOOF = """
import socket, struct, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def csum(b):
    b += b"\\0" * (len(b) % 2)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
s4, d4 = socket.inet_aton(src), socket.inet_aton(dst)
tcp = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
tcp = tcp[:16] + struct.pack("!H", csum(s4 + d4 + struct.pack("!BBH", 0, 6, 20) + tcp)) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, s4, d4)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
    s.sendto(ip + tcp, (dst, 0))
"""


@pytest.mark.parametrize("how", ["spoofed own address", "local client"])
def test_the_tripwire_never_catches_the_hosts_own_addresses(tmp_path, how):
    """A packet to a tripwire port from one of the host's own addresses (spoofed from the
    link: raw_prerouting sees it before the martian check; or a local process touching
    127.0.0.1:23) must not put that address into dyn4: the host's own connections to its
    services (an application to its local database, the daemon to a local Redis) come
    from it, and guard_output would drop every answer to them."""
    state = write_state(tmp_path / "state.yaml", tripwire={"tcp": [23], "udp": [], "for": 600})
    with standard_lab() as lab:
        assert apply(lab, state).returncode == 0
        own = SERVER4 if how == "spoofed own address" else "127.0.0.1"
        assert lab.probe("srv", "tcp", own, 1) == "port 1"
        if how == "spoofed own address":
            proc = lab.run("unt", [sys.executable, "-c", SPOOF, own, SERVER4, "23"])
            assert proc.returncode == 0, proc.stderr
            # The next packet on the same link is answered only after the spoofed one
            # went through the server's raw_prerouting.
            assert lab.probe("unt", "tcp", SERVER4, 23) == "closed"
        else:
            assert lab.probe("srv", "tcp", own, 23) == "closed"
        listing = json.loads(lab.sh("srv", "nft -j list set inet mtd dyn4"))["nftables"]
        members = next(o["set"] for o in listing if "set" in o).get("elem", [])
        assert members == [], members
        assert lab.probe("srv", "tcp", own, 1) == "port 1"


def test_the_whole_internet_per_source_leaves_the_hosts_own_connections_alone(tmp_path):
    """`0.0.0.0/0` and `::/0` per_source (README's example) hold 127.0.0.1, ::1 and the
    host's own addresses: its connections to itself must keep reaching its services."""
    state = write_state(tmp_path / "state.yaml", **INTERNET)
    with standard_lab() as lab:
        assert apply(lab, state).returncode == 0
        for own in ("127.0.0.1", SERVER4, "::1", SERVER6):
            assert lab.probe("srv", "tcp", own, 1) == "port 1", own
            assert lab.probe("srv", "udp", own, 53) == "port 53", own


def _dyn(lab: Lab, name: str) -> list[str]:
    listing = json.loads(lab.sh("srv", f"nft -j list set inet mtd {name}"))["nftables"]
    elems = next(o["set"] for o in listing if "set" in o).get("elem", [])
    return [e["elem"]["val"] if isinstance(e, dict) else e for e in elems]


def test_a_dynamic_set_full_of_trips_still_takes_an_operators_watch(tmp_path):
    """One /48 holds 65,536 /64s: trips from all of them (no spoofing needed) fill dyn6,
    and the kernel refuses any add to a full set. `mtd watch add` (fail2ban's ban) and
    `watch del` must still work, now and after a rotation (which puts the set back full)."""
    state = write_state(tmp_path / "state.yaml", tripwire={"tcp": [23], "udp": [], "for": 600})
    with standard_lab() as lab:
        assert apply(lab, state).returncode == 0
        trips = ", ".join(f"2001:db8:1:{i:x}:: timeout 600s" for i in range(65536))
        (tmp_path / "trips.nft").write_text(f"add element inet mtd dyn6 {{ {trips} }}\n")
        filled = lab.run("srv", ["nft", "-f", str(tmp_path / "trips.nft")])
        assert filled.returncode == 0, filled.stderr
        for ban in ("2001:db8:2:7::1", "2001:db8:2:8::1"):
            add = mtd("-s", str(state), "watch", "add", "--local", ban, "--for", "1h", ns=lab)
            assert add.returncode == 0, add.stderr
            unit = ban.removesuffix("1")
            live = _dyn(lab, "dyn6")
            assert unit in live and len(live) == 65536
            assert apply(lab, state, cmd="rotate").returncode == 0
            assert unit in _dyn(lab, "dyn6")
        gone = mtd("-s", str(state), "watch", "del", "--local", "2001:db8:3::1", ns=lab)
        assert gone.returncode == 0, gone.stderr


def test_the_leak_counter_counts_watched_sources_only(tmp_path):
    """Another table's DNAT of a service port to a port that is no service's (a redirect, for
    everyone) looks like a leak after NAT: a trusted source's connection through it must not
    count, while a watched source's connection to a real port that shows it nothing does
    (UDP 53: outside the range, never shown)."""
    state = write_state(tmp_path / "state.yaml", trusted=["192.0.2.2", "2001:db8::2"])
    with standard_lab() as lab:
        assert apply(lab, state).returncode == 0
        lab.sh("srv", "nft add table inet other && nft add chain inet other pre "
               "'{ type nat hook prerouting priority -100; }' && "
               "nft add rule inet other pre tcp dport 3 redirect to :7")  # fmt: skip
        for fam, server in (("ip", SERVER4), ("ip6", SERVER6)):
            before = counter(lab, f"real_port_{fam}")
            assert lab.probe("tru", "tcp", server, 3) == "closed"  # redirected to port 7
            assert counter(lab, f"real_port_{fam}") == before, fam
            lab.probe("unt", "udp", server, 53)
            assert counter(lab, f"real_port_{fam}") == before + 1, fam
