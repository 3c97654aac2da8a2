"""`ports.fixed`: a port that never moves for any class of source, and is never a target.

Real nmap scans from four clients, one per class of watched source (an explicit address, a
per_source prefix, a source the tripwire caught, one added with `mtd watch`), over IPv4 and
IPv6, before and after a rotation: the fixed port answers in place, every other service
where the mapping puts it.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from reconciler.adapters import files
from reconciler.core import audit, shuffle, watch
from reconciler.core import state as state_mod
from reconciler.lab.netns import Lab, nmap_open, standard_lab
from tests.conftest import mtd, write_state
from tests.kernel import apply, visible

SERVICES = [1, 2, 3, 4, 5]
FIXED = 1  # "SSH": reachable in place by everyone
SERVERS = {"v4": "192.0.2.1", "v6": "2001:db8::1"}
CLIENTS = {  # role -> (IPv4, IPv6) of a source of that class
    "unt": ("192.0.2.3", "2001:db8::3"),  # explicit entries
    "net": ("198.51.100.7", "2001:db8:bad::7"),  # per_source prefixes
    "trp": ("192.0.2.9", "2001:db8:7::9"),  # tripped
    "wat": ("192.0.2.10", "2001:db8:8::10"),  # mtd watch add
    "tru": ("192.0.2.2", "2001:db8::2"),  # trusted
}
CLASS = {  # role -> what `mtd mapping --json` says of its sources: watched, dynamic, trusted
    "unt": (lambda a: a, None, False),
    "net": (lambda a: "198.51.100.0/24" if "." in a else "2001:db8:bad::/48", None, False),
    "trp": (lambda a: "dynamic", "tripwire", False),
    "wat": (lambda a: "dynamic", "cli", False),
    "tru": (lambda a: None, None, True),
}
STATE = {
    "ports": {
        "range": [1, 20],
        "services": {"tcp": SERVICES, "udp": [53]},
        "fixed": {"tcp": [FIXED, 6]},  # 6: no service, and never a target either
    },
    "watched": [
        {"source": "192.0.2.3", "ignore": {"tcp": [2]}},
        {"source": "2001:db8::3"},
        {"source": "198.51.100.0/24", "per_source": True},
        {"source": "2001:db8:bad::/48", "per_source": True},
    ],
    "trusted": ["192.0.2.2", "2001:db8::2"],
    "buckets": 4,
    "tripwire": {"tcp": [23], "for": 600},
}


def test_fixed_ports_leave_every_mapping_and_every_pool():
    """The pure side, with and without a per_source entry (dynamic sources then take the
    fixed ports alone as what stays in place)."""
    for watched in (STATE["watched"], STATE["watched"][:2]):
        doc = {**STATE, "watched": watched}
        s = state_mod.build([("s.yaml", doc)], {})
        assert FIXED not in s.free_ports("tcp") and 6 not in s.free_ports("tcp")
        assert s.watched[1].ignore is s.watched[-1].ignore  # shared, not one per entry
        portmap = shuffle.compute(s, b"k" * 32, 7)
        for moves in [*portmap.moves.values(), *(b["tcp"] for b in portmap.buckets)]:
            assert FIXED not in moves and not {FIXED, 6} & set(moves.values()), moves
        assert portmap.moves[("192.0.2.3", "tcp")].keys() == {3, 4, 5}
        assert all(b["tcp"].keys() == {2, 3, 4, 5} for b in portmap.buckets)


def test_a_tripwire_port_may_not_be_fixed():
    doc = {**STATE, "tripwire": {"tcp": [6], "for": 60}}
    with pytest.raises(state_mod.StateError, match=r"tripwire\.tcp: \[6\] in ports\.fixed\.tcp"):
        state_mod.build([("s.yaml", doc)], {})


def _expected(state: Path, source: str, dynamic: set[str]) -> set[int]:
    """Where `source` finds the services (ports), from the secret mtd made."""
    s = files.load_state(state)
    secret, epoch = files.load_secret(s.secret_file), files.read_epoch(s.epoch_file)
    moves = audit.mapping_of(s, secret, epoch, source, dynamic).moves.get("tcp", {})
    assert moves and FIXED not in moves, (source, moves)  # watched, and the fixed one stays
    return visible(dict(moves), SERVICES)


def _scan_all(lab: Lab, state: Path, dynamic: set[str]) -> None:
    """Each client's scan finds the services where `mtd mapping --source` (run on the host,
    where it also reads the tripwire's kernel entries) says, the fixed port in place."""
    for role, addrs in CLIENTS.items():
        for family, source in zip(("v4", "v6"), addrs, strict=True):
            found = nmap_open(lab, role, SERVERS[family], "-sS")
            out = mtd("-s", str(state), "mapping", "--source", source, "--json", ns=lab)
            assert out.returncode == 0, out.stderr
            view = json.loads(out.stdout)
            label, origin, trusted = CLASS[role]
            assert (view["watched"], view["dynamic"], view["trusted"]) == (
                label(source),
                origin,
                trusted,
            ), (role, view)
            assert set(found) == set(view["tcp"].values()), (role, family, found, view)
            assert view["tcp"][str(FIXED)] == FIXED and view["fixed"]["tcp"] == [FIXED, 6]
            if not trusted:  # watched: the rest moved, as the library computes it
                assert set(found) == _expected(state, source, dynamic) != set(SERVICES)


@pytest.mark.netns
def test_a_fixed_port_stays_in_place_for_every_class_of_source(tmp_path):
    state = write_state(tmp_path / "state.yaml", **STATE)
    with standard_lab() as lab:
        for role in ("trp", "wat"):
            lab.add_client(role, *CLIENTS[role])
        lab.sh("srv", "ip -6 route add 2001:db8::/32 dev br0 metric 2048")
        assert apply(lab, state).returncode == 0
        for source in CLIENTS["wat"]:
            out = mtd("-s", str(state), "watch", "add", source, "--for", "1h", ns=lab)
            assert out.returncode == 0, out.stderr
        for target in SERVERS.values():
            assert lab.probe("trp", "tcp", target, 23) == "closed"  # the trip
        listed = lab.sh("srv", "nft list set inet mtd dyn4; nft list set inet mtd dyn6")
        assert "192.0.2.9" in listed and "2001:db8:7::" in listed, listed
        dynamic = {watch.unit_of(a) for a in (*CLIENTS["trp"], *CLIENTS["wat"])}
        _scan_all(lab, state, dynamic)
        before = files.read_epoch(files.load_state(state).epoch_file)
        assert apply(lab, state, cmd="rotate").returncode == 0
        assert files.read_epoch(files.load_state(state).epoch_file) == before + 1
        _scan_all(lab, state, dynamic)


WARNING_CASES = [
    ({"watched": [{"source": "0.0.0.0/0", "per_source": True},
                  {"source": "::/0", "per_source": True}]},
     "tripwire: every IPv4 and IPv6 source is watched or trusted already"),
    ({"watched": [{"source": "0.0.0.0/1"}], "trusted": ["128.0.0.0/1"]},
     "tripwire: every IPv4 source is watched or trusted already"),
    ({"tripwire": {"tcp": [], "for": 60}}, "tripwire: no port listed: it can never fire"),
    ({"ports": {"range": [1, 20], "services": {"tcp": [1, 2]}, "fixed": {"tcp": [1, 2]}}},
     "ports.fixed: every service port is fixed: this state hides nothing"),
    ({"watched": [], "tripwire": None}, "watched: no source and no tripwire"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "line"), WARNING_CASES)
def test_validate_warns_in_one_line_for_what_cannot_work(tmp_path, overrides, line):
    doc = {**STATE, **overrides}
    state = write_state(tmp_path / "s.yaml", **{k: v for k, v in doc.items() if v is not None})
    out = mtd("-s", str(state), "validate")
    assert out.returncode == 0 and out.stdout.startswith("ok: "), out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("mtd: warning: "), out.stderr
    assert f"{state}: {line}" in out.stderr, out.stderr


def test_a_state_that_works_warns_nothing(tmp_path):
    out = mtd("-s", str(write_state(tmp_path / "s.yaml", **STATE)), "validate")
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_mtd_run_logs_what_cannot_work_at_start(tmp_path):
    from reconciler.adapters.fake import FakeKernel
    from reconciler.services.daemon import Daemon, Options
    from tests.test_daemon_logic import NoBus, Recorder

    everyone = [{"source": "0.0.0.0/0", "per_source": True}, {"source": "::/0", "per_source": True}]
    state = write_state(tmp_path / "s.yaml", watched=everyone, tripwire={"tcp": [23], "for": 60})
    log, logger = Recorder(), logging.getLogger("mtd.test.fixed")
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    daemon = Daemon(
        lambda: files.load_state(state),
        FakeKernel(),
        host="h1",
        options=Options(drift_interval=60, start_wait=0),
        logger=logger,
        subscribe=NoBus,
    )
    thread = threading.Thread(target=daemon.serve, daemon=True)
    thread.start()
    try:
        ev = log.wait(lambda e: e["event"] == "state")
        assert ev["level"] == "warning" and ev["message"].startswith("tripwire: every IPv4 and")
    finally:
        daemon.request_stop()
        thread.join(timeout=20)
    assert not thread.is_alive()
