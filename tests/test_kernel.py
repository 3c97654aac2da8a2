"""mtd against the real kernel, inside lab namespaces: apply, diff, drift, ownership."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from reconciler.adapters import files
from reconciler.core.state import merge
from reconciler.lab.netns import Lab
from tests.conftest import ROOT, mtd, write_state
from tests.kernel import apply, expected_moves, nft, plant_secret, table_text

pytestmark = pytest.mark.netns


def test_apply_then_in_sync_then_ok(lab: Lab, state_file: Path):
    first = apply(lab, state_file)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("changed: table inet mtd epoch 0: ")
    assert apply(lab, state_file).stdout.startswith("ok: table inet mtd epoch 0")
    diff = apply(lab, state_file, cmd="diff")
    assert diff.returncode == 0, diff.stdout + diff.stderr
    status = json.loads(apply(lab, state_file, "--json", cmd="status").stdout)
    assert status | {"summary": None, "fingerprint": None, "packets": None} == {
        "epoch": 0,
        "table": "mtd",
        "in_sync": True,
        "summary": None,
        "fingerprint": None,
        "packets": None,
        "dynamic": {
            "watched": 0,
            "in_kernel": 0,
            "origins": {"cli": 0, "redis": 0, "tripwire": 0, "crowdsec": 0},
        },
    }
    assert set(status["packets"].values()) == {0}  # the ruleset's counters, none hit yet
    assert Path(files.load_state(state_file).secret_file).stat().st_mode & 0o777 == 0o600


def test_check_mode_changes_nothing(lab: Lab, state_file: Path):
    files.load_secret(state_file.parent / "secret", create=True)  # --check only reads it
    out = apply(lab, state_file, "--check")
    assert out.returncode == 0 and out.stdout.startswith("would change:")
    assert "absent" in table_text(lab)


def test_sysctls_set_by_apply_inside_the_namespace(lab: Lab, state_file: Path):
    apply(lab, state_file)
    assert lab.sh("srv", "cat /proc/sys/net/ipv4/fwmark_reflect").strip() == "1"
    assert lab.sh("srv", "cat /proc/sys/net/ipv6/fwmark_reflect").strip() == "1"


@pytest.mark.parametrize(
    ("tamper", "expect"),
    [
        # The desired rule is missing from the live table: one `+`, the rules after it align.
        (
            "delete rule inet mtd raw_prerouting handle {handle}",
            r"^\+ rule raw_prerouting .*accept",
        ),
        (
            "chain inet mtd raw_prerouting '{{ policy drop; }}'",
            r"^~ chain raw_prerouting: policy: 'drop' -> 'accept'|^~ chain raw_prerouting: policy",
        ),
        (
            "delete element inet mtd tcp4 '{{ 192.0.2.3 . {port} }}'; "
            "nft add element inet mtd tcp4 '{{ 192.0.2.3 . {port} : {other} }}'",
            r"^~ map tcp4: ~1 elements \(secret\)$",  # the ports with --show-mapping
        ),
        ("delete table inet mtd", r"^\+ table mtd"),
    ],
    ids=["rule-deleted", "policy-changed", "element-changed", "table-deleted"],
)
def test_drift_is_seen_and_repaired(lab: Lab, state_file: Path, tamper: str, expect: str):
    apply(lab, state_file)
    before = table_text(lab)
    handle = re.search(
        r"accept # handle (\d+)", lab.sh("srv", "nft -a list chain inet mtd raw_prerouting")
    )
    port, target = next(iter(expected_moves(state_file)[("192.0.2.3", "tcp")].items()))
    other = 19 if target != 19 else 18  # a value that really differs from the desired one
    nft(lab, tamper.format(handle=handle.group(1) if handle else 0, port=port, other=other))
    diff = apply(lab, state_file, cmd="diff")
    assert diff.returncode == 2, diff.stdout + diff.stderr
    assert re.search(expect, diff.stdout, re.M), diff.stdout
    rules = [line for line in diff.stdout.splitlines() if line[2:].startswith("rule ")]
    if not tamper.startswith("delete table"):  # one line per rule changed, not a shift
        assert len(rules) == (1 if tamper.startswith("delete rule") else 0), diff.stdout
    assert json.loads(apply(lab, state_file, "--json", cmd="status").stdout)["in_sync"] is False
    assert apply(lab, state_file).stdout.startswith("changed:")
    assert apply(lab, state_file, cmd="diff").returncode == 0
    assert table_text(lab) == before


def test_other_tables_untouched_across_applies_and_rotations(lab: Lab, state_file: Path):
    nft(lab, "add table inet filter")
    nft(lab, "add chain inet filter input '{ type filter hook input priority 0; policy accept; }'")
    nft(lab, "add rule inet filter input tcp dport 22 accept")
    nft(lab, "add table ip nat")
    before = lab.sh("srv", "nft list table inet filter; nft list table ip nat")
    for cmd in ("apply", "rotate", "rotate", "apply", "rotate"):
        assert apply(lab, state_file, cmd=cmd).returncode == 0
    assert lab.sh("srv", "nft list table inet filter; nft list table ip nat") == before
    assert files.read_epoch(files.load_state(state_file).epoch_file) == 3


def test_ownership_ruleset_flushes_other_tables_only_when_asked(lab: Lab, tmp_path: Path):
    state = write_state(tmp_path / "s.yaml", ownership="ruleset")
    files.load_secret(tmp_path / "secret", create=True)  # diff and --check only read it
    nft(lab, "add table inet filter")
    nft(lab, "add table ip nat")
    for cmd, args in (("diff", ()), ("apply", ("--check", "--diff"))):
        out = apply(lab, state, *args, cmd=cmd)
        assert "- table inet filter (ownership: ruleset flushes it)" in out.stdout, out.stdout
        assert "- table ip nat (ownership: ruleset flushes it)" in out.stdout
    assert "inet filter" in lab.sh("srv", "nft list tables")  # a preview changes nothing
    assert apply(lab, state).returncode == 0
    tables = lab.sh("srv", "nft list tables")
    assert "inet filter" not in tables and "inet mtd" in tables
    assert apply(lab, state).stdout.startswith("ok: ")  # nothing foreign left: in sync


def test_rotation_moves_ports_and_keeps_established_connections(lab: Lab, state_file: Path):
    apply(lab, state_file)
    before = expected_moves(state_file, 0)[("192.0.2.3", "tcp")]
    after = expected_moves(state_file, 1)[("192.0.2.3", "tcp")]
    # A port whose hiding place changes with the rotation: the case that needs conntrack.
    port = next(p for p in sorted(before) if before[p] != after[p])
    _held_across_rotation(lab, state_file, port, before[port], after[port])
    assert lab.probe("unt", "tcp", "192.0.2.1", before[port]) != f"port {port}"


def test_a_connection_to_a_service_shown_at_its_own_port_survives_the_rotation(
    lab: Lab, state_file: Path
):
    """A service may be drawn to its own port for an epoch: its connections then need no NAT.
    When the next epoch moves it, such a connection keeps its mapping like any other held
    across a rotation (guard_output's drops spare the replies of a connection)."""
    from reconciler.core import shuffle

    state = files.load_state(state_file)

    def own_then_moved(secret: bytes) -> int | None:
        before, after = (shuffle.compute(state, secret, e).moves[("192.0.2.3", "tcp")]
                         for e in (0, 1))  # fmt: skip
        return next((p for p in sorted(before) if before[p] == p != after[p]), None)

    plant_secret(state_file, lambda s: own_then_moved(s) is not None,
                 "a service at its own port at epoch 0, moved at 1")  # fmt: skip
    apply(lab, state_file)
    port = own_then_moved(files.load_secret(state.secret_file))
    assert port is not None
    after = expected_moves(state_file, 1)[("192.0.2.3", "tcp")]
    _held_across_rotation(lab, state_file, port, port, after[port])


def test_a_real_port_answers_nothing_the_host_keeps_out_of_conntrack(lab: Lab, state_file: Path):
    """A host that keeps DNS out of conntrack (its own `notrack`, before mtd's chains): a
    watched source's datagram to the real port 53 is moved by nothing, reaches the socket,
    and its answer leaves untracked from the real port: guard_output drops it, as it drops
    every packet from a moved real port that belongs to no established connection."""
    from reconciler.core import shuffle

    state = files.load_state(state_file)
    udp = ("192.0.2.3", "udp")
    plant_secret(state_file, lambda s: shuffle.compute(state, s, 0).moves[udp][53] != 53,
                 "UDP 53 moved at epoch 0")  # fmt: skip
    apply(lab, state_file)
    assert lab.probe("unt", "udp", "192.0.2.1", 53) != "port 53"
    lab.run("srv", ["nft", "-f", "-"], check=True, input=(
        "table inet host {\n chain pre { type filter hook prerouting priority -310;\n"
        "  udp dport 53 notrack\n }\n}\n"))  # fmt: skip
    assert lab.probe("unt", "udp", "192.0.2.1", 53) == "timeout"
    assert lab.probe("tru", "udp", "192.0.2.1", 53) == "port 53"  # trusted: answered


def _held_across_rotation(lab: Lab, state: Path, port: int, shown: int, then: int) -> None:
    """A connection to service `port` at `shown` (epoch 0) still talks after the rotation,
    and a new one finds the service at `then`."""
    client = lab.spawn(
        "unt",
        [sys.executable, "-u", "-c", _HOLD_CONNECTION, "192.0.2.1", str(shown)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert client.stdout.readline().strip() == f"port {port}"
    assert apply(lab, state, cmd="rotate").stdout.startswith("changed: table inet mtd epoch 1")
    client.stdin.write("still here\n")
    client.stdin.flush()
    assert client.stdout.readline().strip() == f"port {port}: still here"
    assert lab.probe("unt", "tcp", "192.0.2.1", then) == f"port {port}"


_HOLD_CONNECTION = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rw")
print(f.readline().strip())
for line in sys.stdin:
    f.write(line); f.flush()
    print(f.readline().strip())
"""


BAD_TEMPLATE_KERNEL = """{"nftables": [
 {"add": {"table": {"family": "inet", "name": {{ table | tojson }}}}},
 {"add": {"set": {"family": "inet", "table": {{ table | tojson }}, "name": "tiny",
   "type": "ipv4_addr", "size": 1, "elem": ["192.0.2.7", "192.0.2.8"]}}}
]}"""


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda p: p.write_text("ports: [\n"), r"s\.yaml:\d+:\d+: invalid YAML"),
        (
            lambda p: _edit(p, ports={"range": [1, 99999]}),
            r"s\.yaml:\d+: ports\.range\[1\]: 99999: expected at most 65535",
        ),
        (
            lambda p: _edit(p, ports={"range": [1, 4]}),
            r"tcp moves 3 ports but ports\.range \[1, 4\] has only 2 tcp ports to show them at",
        ),
        (lambda p: _custom_template(p, "{{ nope }}"), r"bad\.json\.j2: undefined in template"),
        (lambda p: _custom_template(p, "{% if %}"), r"bad\.json\.j2:1: template syntax error"),
        (lambda p: _custom_template(p, "not json"), r"rendered output is not JSON"),
        (
            lambda p: _custom_template(p, BAD_TEMPLATE_KERNEL),
            r"nftables refused rendered command 1 \(add set tiny\)",
        ),
    ],
    ids=["yaml", "schema", "range", "undefined", "syntax", "not-json", "kernel"],
)
def test_bad_input_one_line_and_table_unchanged(lab: Lab, tmp_path: Path, break_it, message):
    state = write_state(tmp_path / "s.yaml")
    assert apply(lab, state).returncode == 0
    before = table_text(lab)
    break_it(state)
    out = mtd("-s", str(state), "--templates", str(tmp_path / "templates"), "apply", ns=lab)
    assert out.returncode == 1
    # One line per problem (a state can have several), never a traceback.
    assert all(ln.startswith("mtd: error: ") for ln in out.stderr.strip().splitlines())
    assert "Traceback" not in out.stderr
    assert re.search(message, out.stderr), out.stderr
    assert table_text(lab) == before


def _edit(state: Path, **changes: object) -> None:
    state.write_text(yaml.safe_dump(merge(yaml.safe_load(state.read_text()), changes)))


def _custom_template(state: Path, text: str) -> None:
    tdir = state.parent / "templates"
    tdir.mkdir(exist_ok=True)
    (tdir / "bad.json.j2").write_text(text)
    state.write_text(state.read_text() + "template: bad\n")


def test_secret_is_never_printed(lab: Lab, state_file: Path):
    apply(lab, state_file)
    secret = Path(files.load_state(state_file).secret_file).read_bytes()
    outputs = [
        apply(lab, state_file, *a, cmd=c)
        for c, a in [("apply", ()), ("diff", ()), ("status", ("--json",)), ("rotate", ("--diff",))]
    ]
    for out in outputs:
        for text in (out.stdout, out.stderr):
            assert secret.hex() not in text and secret.decode("latin-1") not in text


def test_many_rotations_are_quick_and_stay_in_sync(lab: Lab, state_file: Path):
    apply(lab, state_file)
    start = time.monotonic()
    for _ in range(3):
        assert apply(lab, state_file, cmd="rotate").returncode == 0
    assert apply(lab, state_file, cmd="diff").returncode == 0
    assert time.monotonic() - start < 60


def test_down_removes_only_the_owned_table(lab: Lab, state_file: Path):
    nft(lab, "add table inet filter")
    apply(lab, state_file)
    assert apply(lab, state_file, cmd="down").stdout.startswith("changed: table inet mtd removed")
    assert apply(lab, state_file, cmd="down").stdout.startswith("ok: table inet mtd absent")
    assert lab.sh("srv", "nft list tables").split() == ["table", "inet", "filter"]


REFUSED_AFTER_ELEMENTS = """{"nftables": [
 {"add": {"table": {"family": "inet", "name": {{ table | tojson }}}}},
 {"add": {"set": {"family": "inet", "table": {{ table | tojson }}, "name": "s",
   "type": "ipv4_addr"}}},
 {"add": {"element": {"family": "inet", "table": {{ table | tojson }}, "name": "s",
   "elem": ["192.0.2.7"]}}},
 {"add": {"rule": {"family": "inet", "table": {{ table | tojson }}, "chain": "nope",
   "expr": [{"accept": null}]}}}
]}"""


@pytest.mark.parametrize("cmd", ["apply", "diff", "rotate", "status"])
def test_a_refused_template_command_reads_the_same_in_every_command(
    lab: Lab, tmp_path: Path, cmd: str
):
    """One format, numbered as in the rendered document (the element command counts, mtd's
    own create-and-delete does not), whether the kernel refuses it while learning the
    canonical form (apply, diff, status) or while replacing the table (rotate)."""
    state = write_state(tmp_path / "s.yaml")
    files.load_secret(tmp_path / "secret", create=True)
    _custom_template(state, REFUSED_AFTER_ELEMENTS)
    out = mtd("-s", str(state), "--templates", str(tmp_path / "templates"), cmd, ns=lab)
    assert out.returncode == 1
    assert out.stderr == (
        "mtd: error: nftables refused rendered command 3 (add rule nope): "
        "Could not process rule: No such file or directory\n"
    )
    assert "absent" in table_text(lab)
