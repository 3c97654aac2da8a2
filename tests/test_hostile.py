"""The adversarial corpus: hostile templates and hostile commits (issue 8).

A commit of the state repository, and the templates kept in it, are written by other people
and read by mtd running as root. Each case asserts the outcome: rejected quickly with one
clear line, the owned table as before, other tables and host files byte-identical.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from reconciler.adapters import auditlog, files
from reconciler.adapters.git import Entry, Repo
from reconciler.core import render, shuffle
from reconciler.core import state as state_module
from reconciler.core.state import parse
from reconciler.errors import MtdError
from reconciler.lab.netns import Lab
from reconciler.services import gitops
from tests.conftest import MTD, ROOT, mtd, write_state
from tests.kernel import apply
from tests.test_gitops import Remote, wait_for

SECRET = b"s" * 32
STATE = """
ports: {range: [1, 20], services: {tcp: [1, 2, 3], udp: [53]}}
watched: [{source: 192.0.2.3}]
"""
MTD_TABLE = {"family": "inet", "name": "mtd"}
OPEN_FILTER = {"family": "inet", "table": "filter", "chain": "input", "expr": [{"accept": None}]}

# Each rendered document, and the words its one error line must contain.
HOSTILE_DOCUMENTS = {
    "two objects in one add": (
        [{"add": {"table": MTD_TABLE, "rule": OPEN_FILTER}}],
        "nftables[0]: add 'table', 'rule': expected exactly one object per command",
    ),
    "two verbs in one command": (
        [{"add": {"table": MTD_TABLE}, "delete": {"table": {"family": "inet", "name": "filter"}}}],
        "nftables[0]: 'add', 'delete': expected exactly one verb (add) per command",
    ),
    "delete another table": (
        [{"delete": {"table": {"family": "inet", "name": "filter"}}}],
        "nftables[0]: verb 'delete' (table of table inet filter): expected only add",
    ),
    "flush the ruleset": (
        [{"add": {"table": MTD_TABLE}}, {"flush": {"ruleset": None}}],
        "nftables[1]: verb 'flush' (ruleset): expected only add",
    ),
    "replace a rule elsewhere": (
        [{"replace": {"rule": {**OPEN_FILTER, "handle": 1}}}],
        "nftables[0]: verb 'replace' (rule of table inet filter): expected only add",
    ),
    "insert into another table": (
        [{"insert": {"rule": OPEN_FILTER}}],
        "nftables[0]: verb 'insert'",
    ),
    "a rule in inet filter": (
        [{"add": {"table": MTD_TABLE}}, {"add": {"rule": OPEN_FILTER}}],
        "nftables[1]: add rule to table inet filter: expected only table inet mtd",
    ),
    "another family": (
        [{"add": {"table": {"family": "ip", "name": "mtd"}}}],
        "nftables[0]: add table to table ip mtd: expected only table inet mtd",
    ),
    "no family": (
        [{"add": {"chain": {"table": "mtd", "name": "c"}}}],
        "nftables[0]: add chain to table None mtd",
    ),
    "an unknown object": (
        [{"add": {"ruleset": None}}],
        "nftables[0]: add 'ruleset': expected one of table, chain",
    ),
    "a command that is a list": ([["add", {}]], "nftables[0]: a list: expected exactly one verb"),
    "a table that goes with mtd's process": (
        [{"add": {"table": {**MTD_TABLE, "flags": ["owner"]}}}],
        'nftables[0]: add table inet mtd with flags ["owner"]: expected none',
    ),
    "a table switched off": (
        [{"add": {"table": {**MTD_TABLE, "flags": "dormant"}}}],
        'nftables[0]: add table inet mtd with flags "dormant": expected none',
    ),
    "extra top-level keys": (
        {"nftables": [], "metainfo": {}},
        'expected a JSON object {"nftables": [...]} and nothing else',
    ),
}


def _doc(commands: object) -> str:
    return json.dumps(commands if isinstance(commands, dict) else {"nftables": commands})


@pytest.mark.parametrize("case", sorted(HOSTILE_DOCUMENTS))
def test_hostile_rendered_commands_are_refused_by_structure(tmp_path: Path, case: str):
    commands, expected = HOSTILE_DOCUMENTS[case]
    (tmp_path / "evil.json.j2").write_text(_doc(commands))
    state = parse([("s.yaml", STATE + "template: evil\n")])
    with pytest.raises(MtdError) as exc:
        render.render(state, shuffle.compute(state, SECRET, 0), [tmp_path])
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith(f"{tmp_path}/evil.json.j2: ")
    assert expected in exc.value.problems[0]


@pytest.fixture
def host_lab() -> Iterator[Lab]:
    """One server namespace with a table mtd does not own: `inet filter`, dropping input."""
    with Lab() as lab:
        lab.add_server()
        lab.sh(
            "srv",
            "nft add table inet filter && nft add chain inet filter input "
            "'{ type filter hook input priority 0; policy drop; }' && "
            "nft add rule inet filter input iif lo accept && "
            "nft add rule inet filter input tcp dport 22 accept",
        )
        yield lab


@pytest.mark.netns
def test_hostile_templates_never_reach_other_tables(host_lab: Lab, tmp_path: Path):
    lab = host_lab
    state = write_state(tmp_path / "state.yaml", template="evil")
    good = apply(lab, write_state(tmp_path / "good.yaml"))
    assert good.returncode == 0, good.stderr
    before = lab.sh("srv", "nft list ruleset")
    for case, (commands, expected) in sorted(HOSTILE_DOCUMENTS.items()):
        (tmp_path / "evil.json.j2").write_text(_doc(commands))
        for cmd in ("apply", "diff") if case == "two objects in one add" else ("apply",):
            out = mtd("-s", str(state), "--templates", str(tmp_path), cmd, ns=lab)
            assert out.returncode == 1, (case, cmd, out.stdout)
            assert out.stderr.count("\n") == 1 and expected in out.stderr, (case, out.stderr)
        assert lab.sh("srv", "nft list ruleset") == before, case


# --- hostile state files ------------------------------------------------------------------

LAUGHS = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
)
HOSTILE_STATES = {
    "deep flow nesting": ("a: " + "[" * 200_000 + "]" * 200_000, "nested more than 64 levels"),
    "deep block nesting": (
        "".join(f"{' ' * i}k:\n" for i in range(500)) + " " * 500 + "k: 1\n",
        "nested more than 64 levels",
    ),
    "an alias bomb": (LAUGHS + STATE, "aliases are expanded: expected fewer aliases"),
    "python object tag": (
        "ports: !!python/object/apply:os.system ['touch /tmp/mtd-pwned']\n",
        "could not determine a constructor for the tag",
    ),
    "a duplicate key": (STATE + "ports: {range: [1, 99], services: {}}\n", "key 'ports'"),
    "a mapping as a key": (STATE + "? {a: 1}\n: x\n", "expected a plain text key"),
    "binary garbage": ("\x00\x01\x02\xff" * 1000, "invalid YAML"),
    # Python reads no decimal integer of over 4,300 digits: it raised inside the loader.
    "a huge number": (STATE + "buckets: 1" + "0" * 5000 + "\n", ":4: a number of 5001 characters"),
    "a huge base 60 number": (STATE + "buckets: 1:" + "0" * 5000 + "\n", "a number of 5002"),
}


def _run_bounded(*argv: str) -> subprocess.CompletedProcess:
    """mtd under a 1 GiB address-space limit and a time limit: a regression fails the test,
    not the machine."""
    return subprocess.run(
        ["prlimit", f"--as={1 << 30}", "timeout", "60", *MTD, *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.parametrize("case", sorted(HOSTILE_STATES))
def test_hostile_state_files_fail_in_one_line(tmp_path: Path, case: str):
    text, expected = HOSTILE_STATES[case]
    state = tmp_path / "mtd.yaml"
    state.write_text(text)
    out = _run_bounded("-s", str(state), "validate")
    assert out.returncode == 1, (out.returncode, out.stderr[-500:])
    assert out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert out.stderr.startswith(f"mtd: error: {state}:") and expected in out.stderr
    assert not Path("/tmp/mtd-pwned").exists()


def test_duplicate_keys_name_the_file_line_and_key():
    with pytest.raises(MtdError) as exc:
        parse([("s.yaml", "watched:\n  - source: 192.0.2.3\n    source: 192.0.2.4\n")])
    assert exc.value.problems == [
        "s.yaml:3: key 'source' appears twice in one mapping: expected each key once"
    ]


def test_a_state_file_over_the_size_limit_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(state_module, "MAX_DOCUMENT_BYTES", 1000)
    with pytest.raises(MtdError, match=r"^s\.yaml: 1001 characters: expected at most 1000"):
        parse([("s.yaml", "#" * 1001)])


def test_bounds_are_generous_for_real_states():
    """100,000 watched sources, with an anchored ignore list each, are within every bound."""
    text = "x: &ign {tcp: [1]}\nwatched:\n" + "".join(
        f"  - {{source: 10.{i >> 16}.{i >> 8 & 255}.{i & 255}, ignore: *ign}}\n"
        for i in range(100_000)
    )
    state_module._check_events("big.yaml", text)


def test_many_problems_are_located_once_and_counted(monkeypatch: pytest.MonkeyPatch):
    """10,000 duplicated sources: one compose of the file (error location is linear), the
    first problems printed and the rest counted."""
    composed = []
    yaml = state_module._yaml()  # PyYAML, which state imports when it parses
    real = yaml.compose
    monkeypatch.setattr(yaml, "compose", lambda *a, **k: composed.append(1) or real(*a, **k))
    text = (
        STATE.replace("watched: [{source: 192.0.2.3}]", "")
        + "watched:\n"
        + ("  - source: 192.0.2.3\n" * 10_001)
    )
    with pytest.raises(MtdError) as exc:
        parse([("s.yaml", text)])
    problems = exc.value.problems
    assert len(problems) == state_module.MAX_PROBLEMS + 1 and len(composed) == 1
    assert problems[0] == (
        "s.yaml:6: watched[1].source: '192.0.2.3' is already watched[0]: expected each source once"
    )
    assert problems[-1] == "... and 9980 more problems"


# --- host-local settings: only the host sets them -------------------------------------------

HOST_LOCAL_VALUES = {
    "table": "filter",
    "ownership": "ruleset",
    "mark": 1,
    "secret_file": "/etc/mtd-evil/secret",
    "epoch_file": "/etc/cron.d/mtd",
    "audit_log": "/root/.bashrc",
    "drift_interval": 0.001,
    "redis": {"url": "redis://203.0.113.9:6379/0"},
    "repository_templates": True,  # a commit may not allow its own templates
    "crowdsec": {"url": "http://203.0.113.9:8080", "key_file": "/root/.ssh/id_rsa"},
}


@pytest.mark.parametrize("key", state_module.HOST_LOCAL)
def test_a_repository_state_may_not_set_a_host_local_key(key: str):
    text = STATE + yaml.safe_dump({key: HOST_LOCAL_VALUES[key]})
    untrusted = state_module.Local(untrusted=True)
    with pytest.raises(MtdError) as exc:
        parse([("repo/mtd.yaml", text)], untrusted)
    line = 5 if key in ("redis", "crowdsec") else 4  # a mapping: its first key's line
    assert exc.value.problems == [
        f"repo/mtd.yaml:{line}: {key}: a host-local setting: expected it "
        "only in the host's local configuration (--config), never in the repository"
    ]
    parse([("local.yaml", text)])  # a local file of root's may (but it is checked)


def test_host_local_keys_come_from_the_configuration_and_default_to_the_state_dir():
    config = [("/etc/mtd/mtd.yaml", "table: fleet\naudit_log: /var/log/mtd/audit.jsonl\n")]
    local = state_module.Local(documents=config, state_dir="/srv/mtd", untrusted=True)
    state = parse([("repo/mtd.yaml", STATE)], local)
    assert (state.table, state.audit_log) == ("fleet", "/var/log/mtd/audit.jsonl")
    assert (state.secret_file, state.epoch_file) == ("/srv/mtd/secret", "/srv/mtd/epoch")
    with pytest.raises(MtdError, match=r"^/etc/mtd/mtd\.yaml:2: ports: not a host setting"):
        parse([("repo/mtd.yaml", STATE)], state_module.Local(documents=[(config[0][0], STATE)]))


def test_no_file_of_mtd_inside_the_repository_clone():
    config = [("/etc/mtd/mtd.yaml", "secret_file: /var/lib/mtd/repo/keys/secret\n")]
    local = state_module.Local(documents=config, forbidden=("/var/lib/mtd/repo",))
    with pytest.raises(MtdError) as exc:
        parse([("mtd.yaml", STATE)], local)
    assert exc.value.problems[0].startswith(
        "/etc/mtd/mtd.yaml:1: secret_file: /var/lib/mtd/repo/keys/secret is inside "
        "/var/lib/mtd/repo, the repository clone"
    )


# --- mtd's own files: never through a link, never someone else's file --------------------------


def test_the_audit_log_never_appends_to_or_re_modes_a_file_it_did_not_create(tmp_path: Path):
    profile = tmp_path / ".bashrc"
    profile.write_text("echo hello\n")
    profile.chmod(0o644)
    with pytest.raises(MtdError, match=r"mode 0644: expected 0600, the audit log is private"):
        auditlog.record(profile, host="h", origin="manual", epoch=1, result="ok", fingerprint="x")
    assert profile.read_text() == "echo hello\n" and profile.stat().st_mode & 0o777 == 0o644
    link = tmp_path / "audit.jsonl"
    link.symlink_to(profile)
    with pytest.raises(MtdError, match=r"audit log is a symbolic link: expected a regular file"):
        auditlog.record(link, host="h", origin="manual", epoch=1, result="ok", fingerprint="x")
    assert profile.read_text() == "echo hello\n"


def test_secret_epoch_and_lock_are_never_opened_through_a_link(tmp_path: Path):
    target = tmp_path / "target"
    target.write_bytes(b"k" * 32)
    target.chmod(0o600)
    (tmp_path / "secret").symlink_to(target)
    with pytest.raises(MtdError, match=r"secret file is a symbolic link"):
        files.load_secret(tmp_path / "secret", create=True)
    (tmp_path / "lock").symlink_to(tmp_path / "elsewhere")
    with (
        pytest.raises(MtdError, match=r"lock file is a symbolic link"),
        files.file_lock(tmp_path / "lock"),
    ):
        pass
    assert not (tmp_path / "elsewhere").exists()
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "dir").symlink_to(real)
    with pytest.raises(MtdError, match=r"dir is a symbolic link: expected a directory"):
        files.load_secret(tmp_path / "dir" / "secret", create=True)
    assert list(real.iterdir()) == []


def test_an_unusable_secret_path_is_one_line(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    state = write_state(
        tmp_path / "s.yaml",
        secret_file=str(blocker / "sub" / "secret"),
        audit_log=str(tmp_path / "audit.jsonl"),
    )
    out = mtd("-s", str(state), "render")  # render only reads (a preview: the epoch's path)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    out = mtd("-s", str(state), "apply")  # apply creates it, and cannot
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"mtd: error: {blocker}/sub/")  # its lock or the secret
    assert "cannot create its directory" in out.stderr


# --- hostile templates: bounded in time, memory, recursion and output --------------------------

HOSTILE_TEMPLATES = {
    "include outside the template directories": (
        '{% include "../../../../../etc/passwd" %}',
        "template '../../../../../etc/passwd' not found in",
    ),
    "include an absolute path": ('{% include "/etc/passwd" %}', "'/etc/passwd' not found in"),
    "import outside": ('{% import "../../etc/x.j2" as x %}', "'../../etc/x.j2' not found"),
    "nested loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "rendering took longer than 2 s",
    ),
    "lorem ipsum forever": ("{{ lipsum(n=100000000) }}", "'lipsum' is undefined"),  # gone: chance
    "recursive macro": (
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "template recursion too deep",
    ),
    "deeply nested expression": ("{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}", "too deep"),
    "huge output": (
        '{% for i in range(100000) %}{{ "x" * 100000 }}{% endfor %}',
        "rendered output over 4194304 characters",
    ),
    "string repetition": ('{{ "x" * 10000000000 }}', "repetition too large"),
    "list repetition": ("{{ [1] * 10000000000 }}", "repetition too large"),
    "doubling in a loop": (
        "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}",
        "concatenation too large",
    ),
    "doubling by ~": (
        "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "concatenation too large",
    ),
    "doubling by join": (
        "{% set ns = namespace(s='xx') %}{% for i in range(64) %}"
        "{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}",
        "result too large",
    ),
    "squaring by replace": (
        "{% set ns = namespace(s='x' * 1000) %}{% for i in range(8) %}"
        "{% set ns.s = ns.s.replace('x', ns.s) %}{% endfor %}",
        "replace result too large",
    ),
    "doubling a list in place": (
        "{% set l = [1, 2] %}{% for i in range(64) %}{{ l.extend(l) }}{% endfor %}",
        "refused by the template sandbox",
    ),
    "deeply nested JSON": (
        '{"nftables": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "rendered JSON nested more than 64 levels deep",
    ),
    "nested JSON just deep enough to hurt": (
        '{"nftables": ' + "[" * 900 + "]" * 900 + "}",
        "rendered JSON nested more than 64 levels deep",
    ),
    "a huge power": ("{{ 10 ** 100000000 }}", "power 10 ** 100000000 is too large"),
    "center filter": ('{{ "a"|center(2000000000) }}', "center: 2000000000 is too large"),
    "ljust method": ('{{ "a".ljust(2000000000) }}', "ljust: 2000000000 is too large"),
    "percent width": ('{{ "%999999999d" % 1 }}', "format width too large"),
    "format width": ('{{ "{:>999999999}".format(1) }}', "format width too large"),
    "format filter width": ('{{ "%999999999d"|format(1) }}', "format width too large"),
    "python internals": ("{{ state.__class__.__mro__ }}", "refused by the template sandbox"),
    "private attributes": ("{{ elements.tcp4._rows }}", "refused by the template sandbox"),
}
_RENDER_MAIN = """
import json, pathlib, sys
from reconciler.adapters.git import Entry, Repo
from reconciler.core import render, shuffle
from reconciler.core.state import parse
from reconciler.errors import MtdError
render.RENDER_SECONDS = 2.0
render.MAX_RENDERED_CHARS = 1 << 22  # quicker to reach on a busy machine; same code paths
tmp, state_text = sys.argv[1], sys.argv[2]
for name in json.loads(sys.stdin.read()):
    state = parse([("s.yaml", state_text + "template: " + name + "\\n")])
    try:
        render.render(state, shuffle.compute(state, b"s" * 32, 0), [pathlib.Path(tmp)])
        print(json.dumps([name, "rendered"]), flush=True)
    except MtdError as exc:
        print(json.dumps([name, exc.problems]), flush=True)
"""


def test_hostile_templates_fail_in_one_line_within_bounds(tmp_path: Path):
    """Every case in one process under a 1 GiB address-space limit and a time limit: a
    regression fails this test, not the machine."""
    names = {}
    for i, (case, (text, _)) in enumerate(sorted(HOSTILE_TEMPLATES.items())):
        names[f"t{i}"] = case
        (tmp_path / f"t{i}.json.j2").write_text(text)
    proc = subprocess.run(
        ["prlimit", f"--as={1 << 30}", "timeout", "240", sys.executable, "-c", _RENDER_MAIN,
         str(tmp_path), STATE],
        input=json.dumps(sorted(names)), capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    results = {names[n]: problems for n, problems in map(json.loads, proc.stdout.splitlines())}
    assert proc.returncode == 0 and set(results) == set(HOSTILE_TEMPLATES), proc.stderr[-3000:]
    wrong = {
        case: problems
        for case, problems in results.items()
        if not (
            isinstance(problems, list)
            and len(problems) == 1
            and problems[0].startswith(f"{tmp_path}/t")
            and HOSTILE_TEMPLATES[case][1] in problems[0]
        )
    }
    assert wrong == {}


def test_the_time_limit_works_in_any_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The daemon renders in its worker loop; SIGALRM would only work in the main thread."""
    monkeypatch.setattr(render, "RENDER_SECONDS", 0.5)
    (tmp_path / "slow.json.j2").write_text(HOSTILE_TEMPLATES["nested loops"][0])
    state = parse([("s.yaml", STATE + "template: slow\n")])
    caught: list[BaseException] = []

    def work() -> None:
        try:
            render.render(state, shuffle.compute(state, SECRET, 0), [tmp_path])
        except MtdError as exc:
            caught.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and len(caught) == 1
    assert "rendering took longer than 0.5 s" in str(caught[0])
    # The shipped template still renders, and no timeout fires later.
    good = parse([("s.yaml", STATE)])
    render.render(good, shuffle.compute(good, SECRET, 0))


def test_a_timeout_swallowed_by_a_gc_callback_is_raised_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """An exception raised inside a gc callback or `__del__` is ignored by Python: the
    watchdog keeps raising until the rendering ends (seen with hypothesis's gc callback)."""
    monkeypatch.setattr(render, "RENDER_SECONDS", 0.3)
    (tmp_path / "slow.json.j2").write_text(HOSTILE_TEMPLATES["nested loops"][0])
    state = parse([("s.yaml", STATE + "template: slow\n")])
    swallowed = []

    def busy_callback(phase: str, info: dict) -> None:
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:  # the timeout lands in here, and is lost
            swallowed.append(1)

    gc.callbacks.append(busy_callback)
    try:
        with pytest.raises(MtdError, match=r"rendering took longer than 0\.3 s"):
            render.render(state, shuffle.compute(state, SECRET, 0), [tmp_path])
    finally:
        gc.callbacks.remove(busy_callback)


# --- hostile commits: rejected before anything is applied ---------------------------------------

GOOD = STATE.lstrip()


def _commit_symlink(remote: Remote, link: str, target: str, files_: dict[str, str]) -> str:
    for rel, text in files_.items():
        (remote.work / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote.work / rel).write_text(text)
    (remote.work / link).parent.mkdir(parents=True, exist_ok=True)
    (remote.work / link).symlink_to(target)
    return remote.commit({}, "a link")


def _round(tmp_path: Path, remote: Remote, path: str = "") -> gitops.Outcome:
    puller = gitops.Puller(
        gitops.PullConfig(url=str(remote.bare), path=path, state_dir=tmp_path / "sd", host="h1")
    )
    return puller.round(nft=None)  # a rejected commit never reaches the kernel


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    return Remote(tmp_path)


def test_a_commit_aiming_the_audit_log_at_a_shell_profile_is_rejected(
    tmp_path: Path, remote: Remote
):
    profile = tmp_path / ".profile"
    profile.write_text("echo hello\n")
    profile.chmod(0o644)
    for text in (GOOD + f"audit_log: {profile}\n", f"audit_log: {profile}\nports: nope\n"):
        sha = remote.commit({"state.yaml": text})
        outcome = _round(tmp_path, remote)
        assert outcome.status == "rejected" and outcome.problems[0] == (
            f"commit {sha[:12]}: state.yaml:{3 if 'nope' not in text else 1}: audit_log: a "
            "host-local setting: expected it only in the host's local configuration (--config), "
            "never in the repository"
        )
    assert profile.read_text() == "echo hello\n" and profile.stat().st_mode & 0o777 == 0o644
    assert not (tmp_path / "sd" / "secret").exists()  # nothing was derived from the commit


@pytest.mark.parametrize(
    ("link", "target", "path", "expected"),
    [
        ("hosts", "/etc", "", "hosts: a symbolic link (mode 120000)"),
        ("templates", "../elsewhere", "", "templates: a symbolic link (mode 120000)"),
        ("mtd", "real", "mtd", "mtd: not a directory (mode 120000)"),
        ("base.yaml", "/etc/mtd/mtd.yaml", "", "base.yaml: a symbolic link (mode 120000)"),
    ],
)
def test_a_commit_with_a_symbolic_link_is_rejected(
    tmp_path: Path, remote: Remote, link: str, target: str, path: str, expected: str
):
    sha = _commit_symlink(remote, link, target, {"state.yaml": GOOD, "real/state.yaml": GOOD})
    outcome = _round(tmp_path, remote, path)
    assert outcome.status == "rejected" and len(outcome.problems) == 1, outcome.message
    assert outcome.problems[0].startswith(f"commit {sha[:12]}: {expected}")


def test_a_commit_with_a_huge_file_is_rejected_before_it_is_read(
    tmp_path: Path, remote: Remote, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(gitops, "MAX_DOCUMENT_BYTES", 1000)
    sha = remote.commit({"state.yaml": GOOD + "#" * 2000 + "\n"})
    outcome = _round(tmp_path, remote)
    assert outcome.problems == [
        f"commit {sha[:12]}: state.yaml: {len(GOOD) + 2001} bytes: expected at most 1000 in a "
        "state file or template"
    ]


def test_hostile_yaml_in_a_commit_is_one_line(tmp_path: Path, remote: Remote):
    for text, expected in (
        HOSTILE_STATES["an alias bomb"],
        HOSTILE_STATES["python object tag"],
        HOSTILE_STATES["deep flow nesting"],
        HOSTILE_STATES["a duplicate key"],
    ):
        sha = remote.commit({"state.yaml": text})
        outcome = _round(tmp_path, remote)
        assert outcome.status == "rejected" and len(outcome.problems) == 1
        assert outcome.problems[0].startswith(f"commit {sha[:12]}: state.yaml:")
        assert expected in outcome.problems[0]
    (remote.work / "state.yaml").write_bytes(b"\xff\xfe\x00garbage")
    sha = remote.commit({}, "binary")
    assert _round(tmp_path, remote).problems == [
        f"commit {sha[:12]}: state.yaml: cannot read: 'utf-8' codec can't decode byte 0xff in "
        "position 0: invalid start byte"
    ]


def test_export_refuses_names_that_leave_the_state_directory(tmp_path: Path):
    class Tree:
        def files(self, commit: str, base: str) -> list[Entry]:
            return [Entry("../../etc/cron.d/x.yaml", "100644", "0" * 40, 10)]

        def entry(self, commit: str, path: str) -> None:
            return None

    with pytest.raises(MtdError, match=r"a path out of the state directory"):
        gitops.export(Tree(), "c" * 40, "", tmp_path)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.netns
def test_the_daemon_outlives_hostile_commits(host_lab: Lab, remote: Remote, tmp_path: Path):
    """`mtd run --pull`: each hostile commit is recorded as rejected, the last good state
    stays enforced (drift repaired), other tables stay as they were, the next good commit
    is applied."""
    lab, sd = host_lab, tmp_path / "sd"
    first = remote.commit({"state.yaml": GOOD})
    argv = [*MTD, "--state-dir", str(sd), "run", "--pull", str(remote.bare), "--pull-interval",
            "0.2", "--drift-interval", "0.5", "--reconnect-max", "0.5", "--log-json",
            "--metrics", "127.0.0.1:9108"]  # fmt: skip
    with (tmp_path / "err").open("w") as err:
        proc = lab.spawn("srv", argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: Repo(sd / "repo").head() == first)
        filter_before = lab.sh("srv", "nft list table inet filter")
        mtd_before = lab.sh("srv", "nft list table inet mtd")
        smuggle = _doc(HOSTILE_DOCUMENTS["two objects in one add"][0])
        recursive = HOSTILE_TEMPLATES["recursive macro"][0]
        for commit in (
            {"state.yaml": GOOD + "template: evil\n", "templates/evil.json.j2": smuggle},
            {"templates/evil.json.j2": recursive},
            {"state.yaml": HOSTILE_STATES["an alias bomb"][0]},
            {"state.yaml": HOSTILE_STATES["deep flow nesting"][0]},
            {"state.yaml": GOOD + "ownership: ruleset\n"},
        ):
            sha = remote.commit(commit)
            wait_for(lambda sha=sha: _rejected(sd) == sha)
            assert proc.poll() is None
        lab.sh("srv", "nft delete table inet mtd")  # drift repair still runs
        wait_for(lambda: lab.run("srv", ["nft", "list", "table", "inet", "mtd"]).returncode == 0)
        status = json.loads(
            mtd("--state-dir", str(sd), "-s", str(sd / "repo"), "status", "--json", ns=lab).stdout
        )
        assert status["pull"]["applied"] == first and status["pull"]["rejected"] == sha
        assert not status["pull"]["healthy"] and status["in_sync"]
        assert "mtd_pull_head_rejected 1.0" in _metrics(lab)
        good = remote.commit({"state.yaml": GOOD + "# fixed\n", "templates/evil.json.j2": None})
        wait_for(lambda: Repo(sd / "repo").head() == good)
        assert proc.poll() is None
        assert lab.sh("srv", "nft list table inet filter") == filter_before
        assert lab.sh("srv", "nft list table inet mtd") == mtd_before
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert "Traceback" not in (tmp_path / "err").read_text()


def _rejected(sd: Path) -> str | None:
    return (gitops.read_record(sd / "pull.json").get("rejected") or {}).get("commit")


def test_validate_repository_checks_a_checkout_as_hosts_will(tmp_path: Path):
    """A state repository's CI sees the rejection before any host does."""
    (tmp_path / "base.yaml").write_text(GOOD + "audit_log: /root/.bashrc\n")
    (tmp_path / "hosts").mkdir()
    (tmp_path / "hosts" / "h1.yaml").write_text("watched: [{source: 192.0.2.9}]\n")
    assert mtd("-s", str(tmp_path), "validate").returncode == 0  # a local file may
    out = mtd("-s", str(tmp_path), "validate", "--repository")
    assert out.returncode == 1 and out.stderr == (
        f"mtd: error: h1: {tmp_path}/base.yaml:3: audit_log: a host-local setting: expected it "
        "only in the host's local configuration (--config), never in the repository\n"
    )


def _metrics(lab: Lab) -> str:
    """The daemon's Prometheus page, read from inside its namespace."""
    read = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9108').read().decode())"
    out = lab.run("srv", [sys.executable, "-c", read])
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_largest_coverage_a_commit_may_ask_for_renders_within_bounds(tmp_path: Path):
    """A commit may set the coverage keys (fleet state): the most it can ask for (1024
    buckets, the whole internet per source, 60,000 trusted prefixes, every other port a
    tripwire) validates and renders under the same memory and time limits, and one step
    beyond the bound is one line."""
    trusted = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(60_000)]
    doc = {
        "ports": {"range": [1, 65535], "services": {"tcp": [22, 80, 443], "udp": [53]}},
        "watched": [
            {"source": "0.0.0.0/0", "per_source": True},
            {"source": "::/0", "per_source": True},
        ],
        "trusted": trusted,
        "buckets": 1024,
        "tripwire": {
            "tcp": [p for p in range(1, 65536) if p not in (22, 80, 443)],
            "udp": [69],
            "for": 2592000,
        },
        "secret_file": str(tmp_path / "secret"),
    }
    state = tmp_path / "mtd.yaml"
    state.write_text(json.dumps(doc))
    fd = os.open(tmp_path / "secret", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"s" * 32)
    os.close(fd)
    out = _run_bounded("-s", str(state), "render")
    assert out.returncode == 0, out.stderr[-500:]
    assert json.loads(out.stdout)  # the whole document
    state.write_text(json.dumps({**doc, "buckets": 1025}))
    out = _run_bounded("-s", str(state), "validate")
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr[-500:]
    assert "buckets: 1025: expected at most 1024" in out.stderr


def test_many_services_and_buckets_from_a_commit_stay_bounded(tmp_path: Path):
    """Service ports are fleet state. 30,000 of them made every draw quadratic (each free
    port found by scanning every service port): one watched source took minutes, and 1024
    buckets of them asked for 61 million bucket elements (gigabytes). Now a source of
    30,000 ports renders within the bounds, and buckets x moved ports is bounded in one
    line, with the largest allowed rendering within the bounds too."""
    secret = tmp_path / "secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"s" * 32)
    os.close(fd)
    state = tmp_path / "mtd.yaml"

    def write(services: list[int], **more: object) -> None:
        ports = {"range": [1, 65535], "services": {"tcp": services, "udp": []}}
        state.write_text(json.dumps({"ports": ports, "secret_file": str(secret), **more}))

    # (16 default buckets x 30,000: within the bucket bound)
    write(list(range(1, 30_001)), watched=[{"source": "192.0.2.3"}])
    out = _run_bounded("-s", str(state), "render")
    assert out.returncode == 0, out.stderr[-500:]
    internet = {"watched": [{"source": "0.0.0.0/0", "per_source": True}], "buckets": 1024}
    write(list(range(1, 30_001)), **internet)
    out = _run_bounded("-s", str(state), "validate")
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr[-500:]
    assert "1024 buckets x 30000 moved ports = 30,720,000 bucket mappings" in out.stderr
    write(list(range(1, 513)), **internet)  # 524,288: the most allowed
    out = _run_bounded("-s", str(state), "render")
    assert out.returncode == 0, out.stderr[-500:]
