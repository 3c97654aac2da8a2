"""Templates kept in the state repository: code written by other people, run by root.

By default a commit may only choose one of the host's templates by name; a host that allows
repository templates (`repository_templates: true` in its own configuration) gets each one
checked against an allow-list of what the shipped templates write. Each case asserts the
outcome: rejected in one line naming the file or command, no host setting in any output or
record, the next good commit applied.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.adapters import files
from reconciler.adapters.fake import FakeKernel
from reconciler.core import render, shuffle, templates
from reconciler.core.bulk import dumps
from reconciler.core.state import Local, parse
from reconciler.errors import MtdError
from reconciler.services import gitops
from tests.conftest import MTD, ROOT, mtd, write_state
from tests.test_gitops import Remote

SECRET = b"s" * 32
PASSWORD = "hunter2-redis-password"
CONFIG = f"repository_templates: true\nredis: {{url: 'redis://:{PASSWORD}@192.0.2.1:6379/0'}}\n"
STATE = """
ports: {range: [1, 40], services: {tcp: [1, 2, 3], udp: [53]}}
watched:
  - {source: 192.0.2.3}
  - {source: 198.51.100.0/24}
  - {source: "2001:db8::/48", per_source: true}
trusted: [203.0.113.0/24]
tripwire: {tcp: [30], udp: [31], for: 600}
"""
HEAD = '{"nftables": [{"add": {"table": {"family": "inet", "name": {{ table | tojson }}}}}'
T = '"family": "inet", "table": {{ table | tojson }}'


def _state(text: str = STATE, *, allow: bool = True, template: str = "maps") -> Any:
    config = [("/etc/mtd/mtd.yaml", CONFIG if allow else "")] if allow else []
    local = Local(documents=config, untrusted=True)
    return parse([("s.yaml", text + f"template: {template}\n")], local)


_names = itertools.count()


def _render_repo(tmp_path: Path, text: str, *, allow: bool = True, dynamic: Any = None) -> list:
    """`text` as a template of a repository directory, rendered for an (allowing) host."""
    repo = tmp_path / "repo-templates"
    repo.mkdir(parents=True, exist_ok=True)
    name = f"t{next(_names)}"  # a new file each time: Jinja2 reloads by modification time
    (repo / f"{name}.json.j2").write_text(text)
    state = _state(allow=allow, template=name)
    search = [render.RepositoryDir(repo), *render.template_dirs()]
    return render.render(state, shuffle.compute(state, SECRET, 3), search, dynamic)


def _refusal(tmp_path: Path, text: str, **kwargs: Any) -> str:
    with pytest.raises(MtdError) as exc:
        _render_repo(tmp_path, text, **kwargs)
    assert len(exc.value.problems) == 1, exc.value.problems
    return exc.value.problems[0]


# --- the shipped templates are within the allow-list, every variant -------------------------


@pytest.mark.parametrize("template", ["maps", "classic"])
def test_the_shipped_templates_pass_the_allow_list(tmp_path: Path, template: str):
    """Copied into a repository directory, with every feature on (tripwire, per_source,
    trusted, dynamic entries, both families): the check accepts them as they are."""
    source = (render.template_dirs()[0] / f"{template}.json.j2").read_text()
    text = STATE if template == "maps" else "ports: {range: [1, 40], services: {tcp: [1, 2]}}\n"
    if template == "classic":
        text += "watched: [{source: 192.0.2.3}, {source: 198.51.100.0/24}]\n"
    dynamic = {"4": [("192.0.2.99", 30)], "6": [("2001:db8:5::", 40)]}
    repo = tmp_path / "repo-templates"
    repo.mkdir()
    (repo / "copy.json.j2").write_text(source)
    state = parse([("s.yaml", text + f"template: {template}\n")])
    mapping = shuffle.compute(state, SECRET, 3)  # classic's copy is no longer declared swaps
    shipped = render.render(state, mapping, None, dynamic)
    mtds = lambda value: isinstance(value, render.Elements)  # noqa: E731
    assert templates.check_repository(shipped, state.mark, mtds) is None
    allowing = parse(
        [("s.yaml", text + "template: copy\n")],
        Local(documents=[("/etc/mtd/mtd.yaml", "repository_templates: true\n")]),
    )
    copied = render.render(
        allowing,
        mapping,
        [render.RepositoryDir(repo), *render.template_dirs()],
        dynamic,
    )
    assert dumps({"nftables": copied}) == dumps({"nftables": shipped})


# --- findings 3 and 4: only what the shipped templates use ------------------------------------

# Each rendered command list (after the table), and the words of its one error line.
OUTSIDE = {
    "a conntrack helper object": (
        f'{{"add": {{"ct helper": {{{T}, "name": "ftp", "type": "ftp", "protocol": "tcp"}}}}}}',
        "nftables[1]: add ct helper: expected one of table, chain, set, map, counter, rule",
    ),
    "a helper set on connections": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"ct helper": "ftp"}}]}}}}}}',
        "nftables[2]: add rule: statement 'ct helper': expected one of match",
    ),
    "a queue to user space": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"queue": {{"num": 1}}}}]}}}}}}',
        "nftables[2]: add rule: statement 'queue'",
    ),
    "a conntrack mark other software reads": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"mangle": {{"key": {{"ct": '
        '{"key": "mark"}}, "value": 1}}]}}}',
        'nftables[2]: add rule: mangle {"ct": {"key": "mark"}} to 1: expected a port of',
    ),
    "other mark bits": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"mangle": {{"key": {{"meta": '
        '{"key": "mark"}}, "value": 1}}]}}}',
        'nftables[2]: add rule: mangle {"meta": {"key": "mark"}} to 1',
    ),
    "a NAT to another host": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"dnat": {{"family": "ip", '
        '"addr": "203.0.113.9", "port": 22}}]}}}',
        'nftables[2]: add rule: dnat to "203.0.113.9": expected the packet\'s own address',
    ),
    "an input chain that drops (everyone locked out)": (
        f'{{"add": {{"chain": {{{T}, "name": "c", "type": "filter", "hook": "prerouting", '
        '"prio": -300, "policy": "drop"}}}',
        'nftables[1]: add chain: policy "drop": expected one of accept',
    ),
    "a hook the shipped templates do not use": (
        f'{{"add": {{"chain": {{{T}, "name": "c", "type": "filter", "hook": "input", '
        '"prio": -300}}}',
        'nftables[1]: add chain: hook "input": expected one of output, prerouting',
    ),
    "another priority": (
        f'{{"add": {{"chain": {{{T}, "name": "c", "type": "filter", "hook": "output", '
        '"prio": 0}}}',
        "nftables[1]: add chain: priority 0: expected one of -100, -150, -300",
    ),
    "a set that pins a gigabyte of kernel memory": (
        f'{{"add": {{"set": {{{T}, "name": "s", "type": "ipv4_addr", "size": 16777216}}}}}}',
        "nftables[1]: add set: size 16777216: expected at most 65536",
    ),
    "many sets that together pin a gigabyte": (
        ", ".join(
            f'{{"add": {{"set": {{{T}, "name": "s{i}", "type": "ipv4_addr", "size": 65536}}}}}}'
            for i in range(300)
        ),
        "nftables[5]: add set: size 65536 makes 327680 for every set and map together: "
        "expected at most 262144",
    ),
    "sets filled by the template itself past what sizes may pin": (
        ", ".join(
            f'{{"add": {{"set": {{{T}, "name": "p{i}", "type": "inet_service", '
            '"elem": {{ range(1, 65536) | list | tojson }}}}}'
            for i in range(5)
        ),
        "nftables[5]: add set: 327675 elements written by the template: expected at most 262144",
    ),
    "anonymous sets in rules past what the template's own elements may pin": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        + ", ".join(
            f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"match": {{"op": "==", '
            '"left": {"meta": {"key": "mark"}}, "right": {"set": '
            "{{ range(1, 100000) | list | tojson }}}}}]}}}"
            for _ in range(3)
        ),
        "nftables[4]: add rule: 299997 elements written by the template: expected at most 262144",
    ),
    "a verdict map's anonymous data past the bound": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        + ", ".join(
            f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"vmap": {{"key": {{"meta": '
            '{"key": "mark"}}, "data": {"set": [{% for i in range(1, 100000) %}'
            '[{{ i }}, {"drop": null}],{% endfor %}[0, {"drop": null}]]}}}]}}}'
            for _ in range(3)
        ),
        "nftables[4]: add rule: 300000 elements written by the template: expected at most 262144",
    ),
    "a verdict map's data as a bare list (libnftables aborts on an assertion)": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"vmap": {{"key": {{"payload": '
        '{"protocol": "tcp", "field": "dport"}}, "data": [[1, {"accept": null}]]}}]}}}',
        'nftables[2]: add rule: vmap data [[1, {"accept": null}]]: expected a map\'s name '
        '("@NAME") or an anonymous set ({"set": [...]})',
    ),
    "a map lookup's data as a bare list": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"redirect": {{"port": {{"map": '
        '{"key": {"payload": {"protocol": "tcp", "field": "dport"}}, "data": [[1, 2]]}}}}]}}}',
        "nftables[2]: add rule: map data [[1, 2]]: expected a map's name",
    ),
    # Shapes that crashed libnftables (an assertion, a segfault, a corrupted heap): mtd's
    # own process must never hand them over.
    "an element outside a set": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"match": {{"op": "==", "left": '
        '{"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"elem": {"val": 1, '
        '"timeout": 5}}}}]}}}',
        'nftables[2]: add rule: elem {"val": 1, "timeout": 5}: expected only as an element of',
    ),
    "a verdict as a set's element (loaded in mtd's own process: it aborted)": (
        f'{{"add": {{"set": {{{T}, "name": "s", "type": "inet_service", "elem": '
        '[{"accept": null}]}}}',
        'nftables[1]: add set: verdict {"accept": null}: expected only as the data of a verdict',
    ),
    "a verdict as a map's key": (
        f'{{"add": {{"map": {{{T}, "name": "m", "type": "inet_service", "map": "inet_service", '
        '"elem": [[{"jump": {"target": "c"}}, 1]]}}}',
        'nftables[1]: add map: verdict {"jump": {"target": "c"}}: expected only as the data of',
    ),
    "a jump statement to something other than a chain's name": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"jump": {{"target": '
        '{"payload": {"protocol": "tcp", "field": "dport"}}}}]}}}',
        'nftables[2]: add rule: statement jump {"target": {"payload": {"protocol": "tcp", '
        '"field": "dport"}}}: expected {"target": CHAIN}',
    ),
    "a jump statement with more than a target": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"jump": {{"target": "c", '
        '"chain": "x"}}]}}}',
        "nftables[2]: add rule: statement jump",
    ),
    "a verdict map's element that is not a pair": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"vmap": {{"key": {{"payload": '
        '{"protocol": "tcp", "field": "dport"}}, "data": {"set": [[1, 2]]}}}]}}}',
        "nftables[2]: add rule: vmap element [1, 2]: expected [KEY, VERDICT]",
    ),
    "a map element whose data reads the packet (libnftables segfaulted)": (
        f'{{"add": {{"map": {{{T}, "name": "m", "type": "inet_service", "map": "inet_service", '
        '"elem": [[1, {"payload": {"protocol": "udp", "field": "dport"}}]]}}}',
        "nftables[1]: add map: expression 'payload' in an element: expected a constant",
    ),
    "a raw payload wider than a register": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"match": {{"op": "==", "left": '
        '{"payload": {"base": "th", "offset": 0, "len": 1024}}, "right": 1}}]}}}',
        'nftables[2]: add rule: payload {"base": "th", "offset": 0, "len": 1024}: expected len '
        "from 1 to 64 bits, offset from 0 to 4096",
    ),
    "a map with anonymous data on a match's left": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"match": {{"op": "==", "left": '
        '{"map": {"key": {"payload": {"protocol": "tcp", "field": "dport"}}, "data": {"set": '
        '[[1, 2]]}}}, "right": 1}}]}}}',
        'nftables[2]: add rule: map data {"set": [[1, 2]]}: expected a map\'s name ("@NAME")',
    ),
    "a rule comment (where a secret could go)": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [], "comment": "x"}}}}}}',
        "nftables[2]: add rule: key 'comment': expected only chain, expr, family, table",
    ),
    "an element added apart": (
        f'{{"add": {{"element": {{{T}, "name": "s", "elem": ["192.0.2.1"]}}}}}}',
        "nftables[1]: add element: expected one of",
    ),
    "a set filled from the packet path without a size": (
        f'{{"add": {{"set": {{{T}, "name": "s", "type": "ipv4_addr", "flags": ["timeout"]}}}}}}, '
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"set": {{"op": "add", "elem": '
        '{"payload": {"protocol": "ip", "field": "saddr"}}, "set": "@s"}}]}}}',
        'nftables[3]: add rule: statement set "add" "@s": expected add to a set added before',
    ),
    "a socket owner's id": (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, '
        f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": [{{"match": {{"op": "==", "left": '
        '{"meta": {"key": "skuid"}}, "right": 0}}, {"accept": null}]}}}',
        'nftables[2]: add rule: meta key "skuid": expected iif, l4proto, mark, nfproto, oif',
    ),
}


@pytest.mark.parametrize("case", sorted(OUTSIDE))
def test_a_repository_template_is_refused_what_the_allow_list_lacks(tmp_path: Path, case: str):
    commands, expected = OUTSIDE[case]
    line = _refusal(tmp_path, f"{HEAD}, {commands}]}}")
    assert line.startswith(f"{tmp_path}/repo-templates/t") and expected in line, line
    assert line.endswith(": not allowed in a repository template")


def test_the_host_s_own_templates_are_not_limited(tmp_path: Path):
    """Root's --templates directories are trusted: the same document renders from one."""
    commands, _ = OUTSIDE["a conntrack helper object"]
    (tmp_path / "own.json.j2").write_text(f"{HEAD}, {commands}]}}")
    state = _state(template="own")
    doc = render.render(state, shuffle.compute(state, SECRET, 0), [tmp_path])
    assert "ct helper" in doc[1]["add"]


def test_without_the_host_s_consent_no_repository_template_is_read(tmp_path: Path):
    line = _refusal(tmp_path, (render.template_dirs()[0] / "maps.json.j2").read_text(), allow=False)
    assert line.startswith(f"{tmp_path}/repo-templates/t") and line.endswith(
        ": a template from the state repository: expected templates only from this host (its "
        "local configuration may allow them: repository_templates: true)"
    )


# --- findings 1 and 2: the context is read-only data of the fleet's state ----------------------

READS = {
    "the Redis URL": "{{ state.redis.url }}",
    "the Redis URL by key": "{{ state['redis'] }}",
    "a host path": "{{ state.secret_file }}",
    "the ownership": "{{ state.ownership }}",
    "the mark bits": "{{ mark + 1 }}",
    "a placeholder's value": "{{ seed.value }}",
    "a placeholder's token": "{{ table.token }}",
    "a mutator": "{{ elements.tcp4.add(1, {}) }}",
    "the rows": "{{ elements.tcp4.rows() }}",
    "the JSON writer": "{{ elements.tcp4.json_text() }}",
    "a lazy list's builder": "{{ pairs._build }}",
}


@pytest.mark.parametrize("case", sorted(READS))
def test_a_repository_template_reads_no_host_setting_and_changes_nothing(tmp_path: Path, case: str):
    line = _refusal(tmp_path, READS[case] + HEAD + "]}")
    assert line.startswith(f"{tmp_path}/repo-templates/t"), line
    assert PASSWORD not in line and "/var/lib" not in line and "ruleset" not in line
    assert any(w in line for w in ("undefined", "sandbox", "TypeError")), line


def test_the_table_s_name_cannot_be_told_apart(tmp_path: Path):
    """`table` and `mark` write the host's values; compared or printed, they are a token."""
    probe = '{% if table == "mtd" or table | string == "mtd" or mark == 16777216 %}{{ 1/0 }}'
    doc = _render_repo(tmp_path, probe + "{% endif %}" + HEAD + "]}")
    assert doc == [{"add": {"table": {"family": "inet", "name": "mtd"}}}]


def test_an_element_list_is_written_at_most_once(tmp_path: Path):
    """A thousand references to one list were 10^8 elements for libnftables: the elements
    written are now bounded by the validated state."""
    many = ",".join(
        f'{{"add": {{"map": {{{T}, "name": "m{i}", "type": ["ipv4_addr", "inet_service"], '
        f'"map": "inet_service", "elem": {{{{ elements.tcp4 | tojson }}}}}}}}}}'
        for i in range(1000)
    )
    line = _refusal(tmp_path, f"{HEAD}, {many}]}}")
    assert line.endswith(
        "elements.tcp4 written 1000 times: expected each element list at most once"
    )


def test_mtd_render_prints_what_libnftables_receives(tmp_path: Path):
    """Byte for byte: the compact text `bulk.dumps` gives the bindings, element lists too."""
    state_file = write_state(tmp_path / "state.yaml")
    files.load_secret(tmp_path / "secret", create=True)
    out = mtd("-s", str(state_file), "render", "--epoch", "2")
    assert out.returncode == 0, out.stderr
    state = files.load_state(state_file)
    sent = dumps({"nftables": render.render(state, shuffle.compute(state, files.load_secret(
        state.secret_file), 2))})  # fmt: skip
    assert out.stdout == sent + "\n"
    row = render.Elements("x")
    row.add("192.0.2.1", {1: 2})
    assert json.loads(row.json_text()) == json.loads(json.dumps(list(row)))
    row.add('"]},{"x', {"1": "2"})  # not the shuffle's: refused, never written unescaped
    with pytest.raises(ValueError):
        row.json_text()


# --- commits: templates only with the host's consent, and only what the round validated --------


def _puller(tmp_path: Path, remote: Remote, config: str | None = CONFIG) -> gitops.Puller:
    docs = (("/etc/mtd/mtd.yaml", config),) if config is not None else ()
    return gitops.Puller(
        gitops.PullConfig(
            url=str(remote.bare), state_dir=tmp_path / "sd", host="h1", timeout=30, config=docs
        )
    )


GOOD = STATE.lstrip()


@pytest.mark.parametrize(
    "where", ["templates/mine.json.j2", "templates/sub/hidden.json.j2", "templates/.hidden"]
)
def test_a_commit_carrying_templates_is_rejected_unless_the_host_allows_them(
    tmp_path: Path, where: str
):
    remote, kernel = Remote(tmp_path), FakeKernel()
    puller = _puller(tmp_path, remote, config=None)
    sha = remote.commit({"state.yaml": GOOD, where: HEAD + "]}"})
    out = puller.round(kernel)
    assert (out.status, out.problems) == (
        "rejected",
        [
            f"commit {sha[:12]}: {where}: a template in the state repository: expected none "
            "(this host takes templates from its own directories; its local configuration "
            "may allow the repository's: repository_templates: true)"
        ],
    )
    assert kernel.transactions == []
    good = remote.commit({where: None, "state.yaml": GOOD + "# without\n"})
    assert (puller.round(kernel).status, puller.repo.head()) == ("applied", good)


def test_no_host_setting_reaches_a_record_of_a_rejected_template(tmp_path: Path):
    """A template that would put the Redis URL into a chain name the kernel refuses: it
    cannot read it, and nothing of the host's configuration is in pull.json or the log."""
    remote, kernel = Remote(tmp_path), FakeKernel()
    puller = _puller(tmp_path, remote)
    first = remote.commit({"state.yaml": GOOD})
    assert puller.round(kernel).status == "applied"
    for text in READS.values():
        sha = remote.commit({"state.yaml": GOOD + "template: leak\n", "templates/leak.json.j2":
                             text + HEAD + "]}"})  # fmt: skip
        out = puller.round(kernel)
        assert out.status == "rejected" and len(out.problems) == 1 and sha[:12] in out.message
    kept = [tmp_path / "sd" / "pull.json", tmp_path / "sd" / "audit.jsonl"]
    for path in kept:
        assert PASSWORD not in path.read_text()
    assert PASSWORD not in json.dumps(kernel.list_table("mtd"))
    assert puller.repo.head() == first


HIDDEN = (
    f'{HEAD}, {{"add": {{"chain": {{{T}, "name": "input", "type": "filter", "hook": "input", '
    '"prio": 0, "policy": "drop"}}}]}'
)


@pytest.mark.parametrize("hidden", ["sub/hidden.json.j2", ".hidden.json.j2"])
def test_later_renders_use_what_the_round_validated(tmp_path: Path, hidden: str):
    """Finding 5: a template that includes a file the round never exported (a sub-folder, a
    dotfile) validated as `maps`; the daemon, a reload and `mtd -s <clone>` then rendered
    the hidden one from the clone (an input chain dropping everything, SSH too). Now every
    later render reads the templates the round kept, and renders what it validated."""
    remote, kernel = Remote(tmp_path), FakeKernel()
    puller = _puller(tmp_path, remote)
    sha = remote.commit(
        {
            "state.yaml": GOOD + "template: mine\n",
            "templates/mine.json.j2": f'{{% include ["{hidden}", "maps.json.j2"] %}}',
            f"templates/{hidden}": HIDDEN,
        }
    )
    out = puller.round(kernel)
    assert (out.status, puller.repo.head()) == ("applied", sha), out.message
    assert (puller.config.state_path / "templates" / hidden).exists()  # in the clone, unread
    applied = kernel.list_table("mtd")
    assert "input" not in json.dumps(applied)
    state = files.load_state(puller.config.state_path, "h1", puller.config.local())
    secret = files.load_secret(tmp_path / "sd" / "secret")
    mapping = shuffle.compute(state, secret, 0)
    later = render.render(state, mapping, puller.config.template_dirs())  # daemon, reload
    maps = dataclasses.replace(state, template="maps")
    sent = dumps({"nftables": later})
    assert sent == dumps({"nftables": render.render(maps, mapping, render.template_dirs())})
    config = tmp_path / "mtd.yaml"
    config.write_text(CONFIG)
    out = mtd("--state-dir", str(tmp_path / "sd"), "--config", str(config), "-s",
              str(puller.config.state_path), "render", "--epoch", "0")  # fmt: skip
    assert out.returncode == 0 and '"hook":"input"' not in out.stdout, out.stderr
    assert out.stdout == sent + "\n"


def test_the_kept_templates_follow_the_applied_commit(tmp_path: Path):
    remote, kernel = Remote(tmp_path), FakeKernel()
    puller = _puller(tmp_path, remote)
    kept = files.kept_templates(tmp_path / "sd")
    remote.commit({"state.yaml": GOOD, "templates/a.json.j2": "x"})
    assert puller.round(kernel).status == "applied"
    assert kept.is_symlink() and sorted(p.name for p in kept.iterdir()) == ["a.json.j2"]
    assert kept.resolve().stat().st_mode & 0o777 == 0o700
    remote.commit({"templates/b.json.j2": "y"})
    assert puller.round(kernel).status == "applied"
    assert sorted(p.name for p in kept.iterdir()) == ["a.json.j2", "b.json.j2"]
    remote.commit({"templates/a.json.j2": None, "templates/b.json.j2": None})
    assert puller.round(kernel).status == "applied"
    assert not kept.exists() and not kept.is_symlink()
    assert [p.name for p in (tmp_path / "sd").iterdir() if "templates" in p.name] == []


def test_validate_repository_checks_templates_as_hosts_will(tmp_path: Path):
    (tmp_path / "state.yaml").write_text(GOOD)
    (tmp_path / "templates").mkdir()
    commands, expected = OUTSIDE["a conntrack helper object"]
    (tmp_path / "templates" / "maps.json.j2").write_text(f"{HEAD}, {commands}]}}")
    out = mtd("-s", str(tmp_path), "validate", "--repository")
    assert out.returncode == 1 and out.stderr == (
        f"mtd: error: {tmp_path}/templates/maps.json.j2: a template from the state repository: "
        "expected templates only from this host (its local configuration may allow them: "
        "repository_templates: true)\n"
    )
    config = tmp_path.parent / "host.yaml"
    config.write_text("repository_templates: true\n")
    out = mtd("-s", str(tmp_path), "--config", str(config), "validate", "--repository")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and expected in out.stderr
    assert mtd("-s", str(tmp_path), "validate").returncode == 0  # a local directory is root's


def test_memory_hungry_templates_fail_in_one_line_within_bounds(tmp_path: Path):
    """The cases that took gigabytes, in `mtd validate --repository` under 1 GiB of address
    space and a time limit: one line each, quickly."""
    config = tmp_path / "host.yaml"
    config.write_text("repository_templates: true\n")
    big = {"ports": {"range": [1, 65535], "services": {"tcp": list(range(1, 5001))}},
           "watched": [{"source": "192.0.2.3"}]}  # fmt: skip
    many = ",".join(
        f'{{"add": {{"map": {{{T}, "name": "m{i}", "type": ["ipv4_addr", "inet_service"], '
        f'"map": "inet_service", "elem": {{{{ elements.tcp4 | tojson }}}}}}}}}}'
        for i in range(1000)
    )
    cases = {
        "a mutator": (
            "{% for i in range(1000) %}{{ elements.tcp4.add(i, {}) }}{% endfor %}" + HEAD + "]}",
            "refused by the template sandbox",
        ),
        "one list a thousand times": (f"{HEAD}, {many}]}}", "written 1000 times"),
        "a hundred megabytes of statements": (
            HEAD
            + f', {{"add": {{"chain": {{{T}, "name": "c"}}}}}}'
            + "{%- for r in range(50000) %}, "
            + f'{{"add": {{"rule": {{{T}, "chain": "c", "expr": ['
            + "{{ '{\"accept\":null},' * 120 }}"
            + '{"accept": null}]}}}{% endfor %}]}',
            "JSON values: expected at most 3000000 (element lists belong in `| tojson`)",
        ),
        "a huge set": (
            f'{HEAD}, {{"add": {{"set": {{{T}, "name": "s", "type": "ipv4_addr", '
            '"size": 16777216}}}]}',
            "size 16777216: expected at most 65536",
        ),
    }
    for case, (text, expected) in cases.items():
        d = tmp_path / case.replace(" ", "-")
        (d / "templates").mkdir(parents=True)
        (d / "state.yaml").write_text(json.dumps({**big, "template": "t"}))
        (d / "templates" / "t.json.j2").write_text(text)
        argv = ["-s", str(d), "--config", str(config), "validate", "--repository"]
        out = subprocess.run(
            ["prlimit", f"--as={1 << 30}", "timeout", "60", *MTD, *argv],
            capture_output=True, text=True, check=False, cwd=ROOT,
        )  # fmt: skip
        assert out.returncode == 1 and out.stderr.count("\n") == 1, (case, out.stderr[-500:])
        assert expected in out.stderr and "Traceback" not in out.stderr, (case, out.stderr)


# --- the property: the check accepts exactly what the allow-list builds ------------------------

A = templates.REPOSITORY
MARK = 0x01000000
_payload = st.builds(
    lambda p, f: {"payload": {"protocol": p, "field": f}},
    st.sampled_from(["ip", "ip6", "tcp", "udp"]),
    st.sampled_from(["saddr", "daddr", "sport", "dport"]),
)
_read = st.one_of(
    _payload,
    st.builds(lambda k: {"meta": {"key": k}}, st.sampled_from(sorted(A.meta_keys))),
    st.builds(lambda k: {"ct": {"key": k}}, st.sampled_from(sorted(A.ct_keys))),
    st.just({"fib": {"result": "type", "flags": ["daddr"]}}),
    st.just({"socket": {"key": "wildcard"}}),
    st.just({"exthdr": {"name": "rt"}}),
)
_value = st.one_of(
    st.integers(0, 65535),
    st.sampled_from(["local", "@s", "fin", "invalid"]),
    st.builds(
        lambda a, n: {"prefix": {"addr": a, "len": n}}, st.just("192.0.2.0"), st.integers(8, 32)
    ),
    st.lists(st.integers(1, 65535), min_size=1, max_size=3).map(lambda v: {"set": v}),
)
_expr = st.one_of(
    _read,
    st.tuples(_read, _read).map(lambda t: {"concat": list(t)}),
    st.tuples(_read, st.integers(0, 255)).map(lambda t: {"&": list(t)}),
)
_good_statement = st.one_of(
    st.builds(
        lambda op, left, right: {"match": {"op": op, "left": left, "right": right}},
        st.sampled_from(sorted(A.match_ops)),
        _expr,
        _value,
    ),
    st.sampled_from(
        [
            {"accept": None},
            {"drop": None},
            {"return": None},
            {"notrack": None},
            {"counter": None},
            {"counter": "c"},
        ]
    ),
    st.builds(
        lambda pf, v: {
            "mangle": {"key": {"payload": {"protocol": pf[0], "field": pf[1]}}, "value": v}
        },
        st.sampled_from(sorted(A.mangle_payload)),
        st.integers(1, 65535),
    ),
    st.just(
        {
            "mangle": {
                "key": {"meta": {"key": "mark"}},
                "value": {"|": [{"meta": {"key": "mark"}}, MARK]},
            }
        }
    ),
    st.builds(
        lambda fam, port: {
            "dnat": {
                "family": fam,
                "addr": {"payload": {"protocol": fam, "field": "daddr"}},
                "port": port,
            }
        },
        st.sampled_from(["ip", "ip6"]),
        st.integers(1, 65535),
    ),
    st.just(
        {
            "set": {
                "op": "add",
                "set": "@s",
                "elem": {
                    "elem": {
                        "val": {"payload": {"protocol": "ip", "field": "saddr"}},
                        "timeout": 60,
                    }
                },
            }
        }
    ),
)
_OTHER_STATEMENTS = [
    *("queue", "log", "reject", "limit", "snat", "masquerade", "tproxy", "synproxy", "fwd"),
    *("dup", "goto", "quota", "xt", "ct helper", "ct timeout"),
]
_OTHER_EXPRESSIONS = ["osf", "rt", "numgen", "ipsec", "symhash", "tunnel", "ct expectation"]
_bad_statement = st.one_of(
    st.sampled_from([s for s in _OTHER_STATEMENTS if s not in A.statements]).map(
        lambda k: {k: {"num": 1}}
    ),
    st.builds(
        lambda k, left: {"match": {"op": "==", "left": {k: {"key": "x"}}, "right": left}},
        st.sampled_from([e for e in _OTHER_EXPRESSIONS if e not in A.expressions]),
        st.integers(0, 9),
    ),
    st.sampled_from(["skuid", "cgroup", "priority", "nftrace", "secmark"]).map(
        lambda k: {"match": {"op": "==", "left": {"meta": {"key": k}}, "right": 0}}
    ),
    st.integers(0, MARK - 1).map(
        lambda m: {
            "mangle": {
                "key": {"meta": {"key": "mark"}},
                "value": {"|": [{"meta": {"key": "mark"}}, m]},
            }
        }
    ),
    st.just({"mangle": {"key": {"ct": {"key": "mark"}}, "value": 1}}),
    st.just({"dnat": {"family": "ip", "addr": "198.51.100.1", "port": 1}}),
    st.just(
        {
            "set": {
                "op": "add",
                "set": "@unsized",
                "elem": {"payload": {"protocol": "ip", "field": "saddr"}},
            }
        }
    ),
    st.just({"match": {"op": "<", "left": {"meta": {"key": "mark"}}, "right": 1}}),
)
_good_chain = st.builds(
    lambda t, h, p: {"type": t, "hook": h, "prio": p, "policy": "accept"},
    st.sampled_from(sorted(A.chain_types)),
    st.sampled_from(sorted(A.hooks)),
    st.sampled_from(sorted(A.priorities)),
)
_bad_chain = st.one_of(
    _good_chain.map(lambda c: {**c, "policy": "drop"}),
    _good_chain.map(lambda c: {**c, "hook": "input"}),
    _good_chain.map(lambda c: {**c, "prio": 0}),
    _good_chain.map(lambda c: {**c, "type": "route"}),
    _good_chain.map(lambda c: {**c, "dev": "lo"}),
)


def _document(chain: dict, statements: list[dict], size: int, extra: list[dict]) -> str:
    """The template's text; the host's mark bits written as a template must, `{{ mark }}`."""
    t = {"family": "inet", "table": "mtd"}
    return json.dumps({"nftables": [
        {"add": {"table": {"family": "inet", "name": "mtd"}}},
        {"add": {"set": {**t, "name": "s", "type": "ipv4_addr", "flags": ["timeout"],
                         "size": size}}},
        {"add": {"set": {**t, "name": "unsized", "type": "ipv4_addr"}}},
        {"add": {"counter": {**t, "name": "c"}}},
        {"add": {"chain": {**t, "name": "base", **chain}}},
        {"add": {"rule": {**t, "chain": "base", "expr": statements}}},
        *extra,
    ]}).replace(f'{{"key": "mark"}}}}, {MARK}]', '{"key": "mark"}}, {{ mark }}]')  # fmt: skip


@settings(max_examples=60)
@given(data=st.data())
def test_the_check_accepts_exactly_what_the_allow_list_builds(tmp_path_factory, data):
    """Random templates built from the allow-list render; one thing from outside it (a
    statement, an expression, a key, a hook, a priority, a policy, a size, an object) in
    an otherwise good template is refused, in one line naming its command."""
    statements = data.draw(st.lists(_good_statement, max_size=6))
    chain, size, extra = data.draw(_good_chain), data.draw(st.integers(1, A.max_set_size)), []
    bad = data.draw(st.sampled_from(["none", "statement", "chain", "size", "object"]))
    if bad == "statement":
        at = data.draw(st.integers(0, len(statements)))
        statements.insert(at, data.draw(_bad_statement))
    elif bad == "chain":
        chain = data.draw(_bad_chain)
    elif bad == "size":
        size = data.draw(st.integers(A.max_set_size + 1, 1 << 32))
    elif bad == "object":
        kind = data.draw(st.sampled_from([o for o in render.OBJECTS if o not in A.objects]))
        extra = [{"add": {kind: {"family": "inet", "table": "mtd", "name": "x"}}}]
    tmp = tmp_path_factory.getbasetemp() / "property"
    try:
        _render_repo(tmp, _document(chain, statements, size, extra))
    except MtdError as exc:
        assert bad != "none", exc.problems
        assert len(exc.problems) == 1 and "not allowed in a repository template" in exc.problems[0]
        where = {"statement": 5, "chain": 4, "size": 1, "object": 6}[bad]
        assert f": nftables[{where}]: add " in exc.problems[0], (bad, exc.problems)
    else:
        assert bad == "none"


# --- the daemon: alive, its table as before, the next good commit applied ---------------------


@pytest.mark.netns
def test_the_daemon_outlives_hostile_repository_templates(tmp_path: Path):
    """`mtd run --pull` on a host that allows repository templates: a conntrack helper, a
    pinned gigabyte, a hidden include of a chain that drops everything. The first two are
    rejected in one line; the third renders as validated (`maps`), and so does the reload
    after it; `inet filter` stays as it was, no host setting is logged, and the next good
    commit is applied."""
    from reconciler.adapters.git import Repo
    from reconciler.lab.netns import Lab
    from tests.test_gitops import wait_for

    remote, sd = Remote(tmp_path), tmp_path / "sd"
    config = tmp_path / "mtd.yaml"
    config.write_text(CONFIG.replace("192.0.2.1", "127.0.0.1"))
    good = "ports: {range: [1, 40], services: {tcp: [22, 3]}}\nwatched: [{source: 192.0.2.3}]\n"
    first = remote.commit({"state.yaml": good})
    with Lab() as lab:
        lab.add_server()
        lab.sh("srv", "nft add table inet filter && nft add chain inet filter input "
                      "'{ type filter hook input priority 0; policy accept; }'")  # fmt: skip
        argv = [*MTD, "--state-dir", str(sd), "--config", str(config), "run", "--pull",
                str(remote.bare), "--pull-interval", "0.2", "--reconnect-max", "0.5",
                "--log-json"]  # fmt: skip
        with (tmp_path / "err").open("w") as err:
            proc = lab.spawn("srv", argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: Repo(sd / "repo").head() == first)
            wait_for(
                lambda: lab.run("srv", ["nft", "list", "table", "inet", "mtd"]).returncode == 0
            )
            filter_before = lab.sh("srv", "nft list table inet filter")
            mtd_before = lab.sh("srv", "nft list table inet mtd")
            for case in (
                "a conntrack helper object",
                "a set that pins a gigabyte of kernel memory",
            ):
                commands, expected = OUTSIDE[case]
                evil = {"templates/evil.json.j2": f"{HEAD}, {commands}]}}"}
                sha = remote.commit({"state.yaml": good + "template: evil\n", **evil})
                wait_for(lambda sha=sha: _rejected(sd) == sha)
                assert expected in gitops.read_record(sd / "pull.json")["rejected"]["error"]
                assert proc.poll() is None
                assert lab.sh("srv", "nft list table inet mtd") == mtd_before
            hidden = remote.commit({
                "state.yaml": good + "# hidden\ntemplate: mine\n",
                "templates/evil.json.j2": None,
                "templates/mine.json.j2": '{% include ["sub/x.json.j2", "maps.json.j2"] %}',
                "templates/sub/x.json.j2": HIDDEN,
            })  # fmt: skip
            wait_for(lambda: Repo(sd / "repo").head() == hidden)
            reloads = (tmp_path / "err").read_text().count('"reloaded"')
            proc.send_signal(signal.SIGHUP)  # `systemctl reload`: the state again, from the clone
            wait_for(lambda: (tmp_path / "err").read_text().count('"reloaded"') > reloads)
            assert lab.sh("srv", "nft list table inet mtd") == mtd_before  # `maps`, as before
            assert "hook input" not in lab.sh("srv", "nft list table inet mtd")
            last = remote.commit({"state.yaml": good.replace("192.0.2.3", "192.0.2.4")})
            wait_for(lambda: Repo(sd / "repo").head() == last)
            wait_for(lambda: "192.0.2.4" in lab.sh("srv", "nft list table inet mtd"))
            assert proc.poll() is None
            assert lab.sh("srv", "nft list table inet filter") == filter_before
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
    log = (tmp_path / "err").read_text()
    assert "Traceback" not in log and PASSWORD not in log
    for path in (sd / "pull.json", sd / "audit.jsonl"):
        assert PASSWORD not in path.read_text()


def _rejected(sd: Path) -> str | None:
    return (gitops.read_record(sd / "pull.json").get("rejected") or {}).get("commit")


def test_a_commit_applied_before_templates_were_kept_is_applied_again_once(tmp_path: Path):
    """Upgrading: the clone's commit was applied by a version that rendered from the clone.
    The first round validates it again and keeps its templates; the next finds it applied."""
    remote, kernel = Remote(tmp_path), FakeKernel()
    puller = _puller(tmp_path, remote)
    sha = remote.commit({"state.yaml": GOOD + "template: mine\n",
                         "templates/mine.json.j2": '{% include "maps.json.j2" %}'})  # fmt: skip
    assert puller.round(kernel).status == "applied"
    record = gitops.read_record(puller.config.record_path)
    del record["applied"]["kept_templates"]
    puller.config.record_path.write_text(json.dumps(record))
    files.keep_templates(tmp_path / "sd", None, sha)  # as an earlier version left it
    out = puller.round(kernel)
    assert (out.status, out.commit) == ("applied", sha)
    assert (files.kept_templates(tmp_path / "sd") / "mine.json.j2").is_file()
    assert puller.round(kernel).status == "unchanged"


def test_the_number_of_objects_is_bounded_and_the_largest_shipped_table_is_within(
    tmp_path: Path,
):
    """Rules and chains are kernel memory too: `maps` at its largest (1024 buckets, both
    families, the whole internet per source) is within the bound, one command more is not."""
    largest = parse([("s.yaml", STATE.replace("2001:db8::/48", "::/0") + "buckets: 1024\n")])
    commands = render.render(largest, shuffle.compute(largest, SECRET, 0))
    mtds = lambda value: isinstance(value, render.Elements)  # noqa: E731
    assert len(commands) * 2 < templates.MAX_COMMANDS
    assert templates.check_repository(commands, largest.mark, mtds) is None
    counters = (
        "{%- for i in range("
        + str(templates.MAX_COMMANDS)
        + ') %}, {"add": {"counter": {'
        + T
        + ', "name": "c{{ i }}"}}}{% endfor %}'
    )
    line = _refusal(tmp_path, HEAD + counters + "]}")
    assert line.endswith(
        f"{templates.MAX_COMMANDS + 1} commands: expected at most {templates.MAX_COMMANDS}: not "
        "allowed in a repository template"
    )


@pytest.mark.parametrize(
    ("number", "words"),
    [
        ("1" * 5000, "Exceeds the limit (4300 digits)"),  # Python's own refusal, once a crash
        ("NaN", "NaN is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
    ],
)
def test_a_number_no_rule_holds_is_refused_in_one_line(tmp_path: Path, number: str, words: str):
    """What `json.loads` refuses past its decoder (an integer of 4300 digits) or reads though
    JSON has no such number (NaN): one line, never an internal error."""
    rule = (
        f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, {{"add": {{"rule": {{{T}, "chain": "c", '
        f'"expr": [{{"match": {{"op": "==", "left": {{"meta": {{"key": "mark"}}}}, '
        f'"right": {number}}}}}]}}}}}}'
    )
    line = _refusal(tmp_path, f"{HEAD}, {rule}]}}")
    assert line.startswith(f"{tmp_path}/repo-templates/t") and words in line, line
    assert "rendered output is not JSON libnftables reads" in line, line


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (f'{{"add": {{"set": {{{T}, "name": "s", "type": "ipv4_addr", "size": {{{{ mark }}}}}}}}}}',
         "nftables[1]: add set: size {{ mark }}: expected at most 65536"),
        (f'{{"add": {{"chain": {{{T}, "name": "c", "type": "filter", "hook": "output", '
         '"prio": -300, "policy": {{ table | tojson }}}}}',
         "nftables[1]: add chain: policy {{ table }}: expected one of accept"),
        (f'{{"add": {{"chain": {{{T}, "name": "c"}}}}}}, {{"add": {{"rule": {{{T}, "chain": "c", '
         '"expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": '
         '{"key": "mark"}}, 16777216]}}}]}}}',
         "nftables[2]: add rule: mangle"),
    ],
)  # fmt: skip
def test_a_refusal_never_prints_a_host_value(tmp_path: Path, command: str, words: str):
    """The check reads the host's values as their tokens: a template that put the mark where
    a number is checked read it back in the error line (`size 16777216`), and one that wrote
    the mark bits as a number it guessed set them; only `{{ mark }}` does."""
    line = _refusal(tmp_path, f"{HEAD}, {command}]}}")
    assert words in line and "16777216" not in line.replace("16777216]", ""), line
    assert '"mtd"' not in line and "\\u0000" not in line, line


@pytest.mark.parametrize(
    "probe",
    [
        '{% if epoch % 2 %}, {"add": {"chain": {' + T + ', "name": "c"}}}{% endif %}',
        "{% set e = epoch %}",
    ],
)
def test_a_repository_template_may_not_change_its_rules_with_the_epoch(tmp_path: Path, probe):
    """The pull round checks a commit's rules (kernel, SSH session) once: a template that
    branched on the epoch could apply, at a later rotation, a rule that round never saw."""
    line = _refusal(tmp_path, f"{HEAD}{probe}]}}")
    assert line.endswith(
        ": reads epoch: expected a repository template whose rules are the same at every "
        "epoch (the pull round checks them once; the mapping moves through map elements and "
        "seed)"
    ), line


@pytest.mark.parametrize("chance", ["{{ [1, 2] | random }}", "{{ lipsum(1) | length }}"])
def test_no_template_renders_by_chance(tmp_path: Path, chance: str):
    """Root's own templates too: the same state must render the same rules every time."""
    (tmp_path / "own.json.j2").write_text(f"{HEAD}]}}{{# {chance} #}}{chance}")
    state = _state(template="own")
    with pytest.raises(MtdError) as exc:
        render.render(state, shuffle.compute(state, SECRET, 0), [tmp_path])
    assert len(exc.value.problems) == 1 and "own.json.j2" in exc.value.problems[0]
    assert "random" in exc.value.problems[0] or "lipsum" in exc.value.problems[0]
