"""`mtd mapping --source`: one source's view, as the ruleset gives it; never makes a secret."""

import json
import os
from pathlib import Path

from reconciler.core import bucket, shuffle
from reconciler.core.state import parse
from tests.conftest import mtd, write_state

WATCHED = [
    {"source": "192.0.2.3", "ignore": {"tcp": [1, 2]}},
    {"source": "198.51.100.0/24"},
    {"source": "198.51.100.128/25", "ignore": {"udp": [53]}},
    {"source": "fe80::/10"},
]


def setup(tmp_path: Path) -> tuple[Path, bytes]:
    state = write_state(tmp_path / "state.yaml", watched=WATCHED)
    secret = os.urandom(32)
    fd = os.open(tmp_path / "secret", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, secret)
    os.close(fd)
    return state, secret


def view(state: Path, source: str) -> dict:
    proc = mtd("-s", str(state), "mapping", "--source", source, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_each_source_gets_the_mapping_of_its_most_specific_entry(tmp_path):
    state, secret = setup(tmp_path)
    moves = shuffle.compute(parse([("s", state.read_text())]), secret, 0).moves
    for source, label in [
        ("192.0.2.3", "192.0.2.3"),
        ("198.51.100.7", "198.51.100.0/24"),
        ("198.51.100.200", "198.51.100.128/25"),
        ("fe80::3%eth0", "fe80::/10"),
    ]:
        got = view(state, source)
        assert got["watched"] == label, got
        for proto in ("tcp", "udp"):
            moved = moves.get((label, proto), {})
            assert got[proto] == {str(p): moved.get(int(p), int(p)) for p in got[proto]}
    assert view(state, "198.51.100.200")["udp"] == {"53": 53}  # ignored: in place
    assert view(state, "203.0.113.9") == {
        "source": "203.0.113.9", "watched": None, "bucket": None, "trusted": False, "epoch": 0,
        "dynamic": None, "fixed": {"tcp": [], "udp": []},
        "tcp": {str(p): p for p in range(1, 6)}, "udp": {"53": 53},
    }  # fmt: skip


def test_mapping_reads_the_secret_and_never_creates_one(tmp_path):
    state = write_state(tmp_path / "state.yaml")
    proc = mtd("-s", str(state), "mapping", "--source", "192.0.2.3")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"mtd: error: {tmp_path / 'secret'}: no such secret file"
    assert not (tmp_path / "secret").exists()


def test_a_bad_source_is_one_line(tmp_path):
    state, _ = setup(tmp_path)
    proc = mtd("-s", str(state), "mapping", "--source", "192.0.2.300")
    assert proc.returncode == 1
    assert proc.stderr.startswith("mtd: error: --source '192.0.2.300': expected an IPv4/IPv6")
    assert len(proc.stderr.splitlines()) == 1


def test_text_output_names_the_source_and_each_port(tmp_path):
    state, _ = setup(tmp_path)
    proc = mtd("-s", str(state), "mapping", "--source", "192.0.2.3")
    lines = proc.stdout.splitlines()
    assert lines[0] == "source 192.0.2.3: watched as 192.0.2.3, epoch 0"
    assert "tcp 1 -> 1  (in place)" in lines and len(lines) == 1 + 5 + 1


def test_per_source_dynamic_and_trusted_sources_get_their_class_view(tmp_path):
    """Precedence: trusted, the most specific watched entry (a per_source one: the bucket
    jhash picks), a dynamic source (the store): its bucket; the kernel agrees
    (tests/test_buckets.py)."""
    watched = [{"source": "198.51.100.0/24", "per_source": True}, {"source": "192.0.2.3"},
               {"source": "198.51.100.128/25"}]  # fmt: skip
    setup(tmp_path)  # the secret (and a state this test replaces)
    state = write_state(tmp_path / "state.yaml", watched=watched, trusted=["198.51.100.9"])
    s = parse([("s.yaml", state.read_text())])
    secret = (tmp_path / "secret").read_bytes()
    portmap = shuffle.compute(s, secret, 0)
    got = view(state, "198.51.100.7")
    k = bucket.of("198.51.100.7", portmap.seed, s.bucket_count)
    assert (got["watched"], got["bucket"]) == ("198.51.100.0/24", k)
    assert got["tcp"] == {str(p): portmap.buckets[k]["tcp"][p] for p in range(1, 6)}
    assert view(state, "198.51.100.200")["watched"] == "198.51.100.128/25"  # more specific
    assert view(state, "198.51.100.9")["trusted"] is True  # trusted inside per_source
    assert view(state, "198.51.100.9")["tcp"] == {str(p): p for p in range(1, 6)}
    assert view(state, "203.0.113.5")["watched"] is None
    store = tmp_path / "watch.json"
    store.write_text(json.dumps({"entries": [
        {"source": "203.0.113.5", "origin": "cli", "reason": "", "expires_at": 4e9}]}))  # fmt: skip
    got = view(state, "203.0.113.5")
    k = bucket.of("203.0.113.5", portmap.seed, s.bucket_count)
    assert (got["watched"], got["bucket"]) == ("dynamic", k)
    assert got["udp"] == {"53": portmap.buckets[k]["udp"][53]}
    lines = mtd("-s", str(state), "mapping", "--source", "203.0.113.5").stdout.splitlines()
    assert lines[0].startswith(f"source 203.0.113.5: watched dynamically (cli), bucket {k}, ")


def test_a_service_drawn_to_its_own_port_is_not_called_in_place(tmp_path):
    """A moved service may be drawn to its own port for an epoch: the text says so, where
    "(in place)" names a port the state keeps in place (the source's ignore list)."""
    state, secret = setup(tmp_path)
    parsed = parse([("s", state.read_text())])
    epoch, port = next(
        (e, real)
        for e in range(1000)
        for real, seen in shuffle.compute(parsed, secret, e).moves[("192.0.2.3", "tcp")].items()
        if real == seen
    )
    proc = mtd("-s", str(state), "mapping", "--source", "192.0.2.3", "--epoch", str(epoch))
    lines = proc.stdout.splitlines()
    assert f"tcp {port} -> {port}  (drawn to its own port this epoch)" in lines, lines
    assert "tcp 1 -> 1  (in place)" in lines  # ignored
