"""The shipped fail2ban action (contrib/fail2ban/action.d/mtd.conf): parsed as fail2ban
reads it, its ban and unban commands run with fail2ban's tags substituted, inside a
namespace, and the kernel's dynamic set checked."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters import bus, files
from reconciler.lab.netns import Lab, free_port
from tests.conftest import MTD, ROOT, mtd, write_state
from tests.redis_fixtures import needs_redis, redis_server
from tests.test_watch import DYN_TEMPLATE

ACTION = ROOT / "contrib" / "fail2ban" / "action.d" / "mtd.conf"


def action() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    assert parser.read(ACTION) == [str(ACTION)]
    return parser


def substitute(command: str, tags: dict[str, str]) -> str:
    """fail2ban's tag replacement: `<name>` by its value, again until none is left."""
    for _ in range(5):
        command = re.sub(r"<(\w+)>", lambda m: tags.get(m[1], m[0]), command)
    assert not re.search(r"<\w+>", command), command
    return command


def test_the_action_defines_ban_and_unban_with_fail2ban_tags():
    parser = action()
    d, init = parser["Definition"], parser["Init"]
    assert {"actionstart", "actionstop", "actioncheck", "actionban", "actionunban"} <= set(d)
    ban = shlex.split(d["actionban"])
    assert ban[:4] == ["<mtd>", "watch", "add", "<ip>"]
    assert ban[ban.index("--for") + 1] == "<bantime>"
    assert ban[ban.index("--reason") + 1] == "fail2ban <name>"
    assert shlex.split(d["actionunban"])[:4] == ["<mtd>", "watch", "del", "<ip>"]
    assert init["mtd"] == "mtd" and init["mtd_opts"] == ""  # found on PATH


def dyn_set(lab: Lab, name: str) -> dict[str, dict]:
    listing = json.loads(lab.sh("srv", f"nft -j list set inet mtd {name}"))["nftables"]
    (found,) = [o["set"] for o in listing if "set" in o]
    return {e["elem"]["val"]: e["elem"] for e in found.get("elem", [])}


@pytest.mark.netns
def test_a_ban_watches_the_source_in_the_kernel_and_the_unban_ends_it(tmp_path: Path):
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "dyn.json.j2").write_text(DYN_TEMPLATE)
    state = write_state(tmp_path / "state.yaml", template="dyn")
    opts = f"-s {state} --templates {tmp_path / 'tpl'}"
    d, init = action()["Definition"], action()["Init"]
    tags = dict(init) | {"mtd": f"{sys.executable} -m reconciler", "mtd_opts": opts}
    with Lab(prefix="mtdf") as lab:
        lab.add_server()
        out = mtd("apply", *shlex.split(opts), ns=lab)
        assert out.returncode == 0, out.stderr
        for ip, name, key in [
            ("192.0.2.7", "dyn4", "192.0.2.7"),
            ("2001:db8:1:2::99", "dyn6", "2001:db8:1:2::"),
        ]:
            ban = substitute(d["actionban"], tags | {"ip": ip, "bantime": "600", "name": "sshd"})
            out = lab.run("srv", ["sh", "-c", ban], cwd=ROOT)
            assert out.returncode == 0, out.stderr
            elem = dyn_set(lab, name)[key]
            assert 590 <= elem["expires"] <= elem["timeout"] <= 600
            listed = lab.run(
                "srv", ["sh", "-c", f"{tags['mtd']} watch list --json {opts}"], cwd=ROOT
            )
            (row,) = [r for r in json.loads(listed.stdout) if r["source"].startswith(key)]
            assert (row["origin"], row["reason"], row["in_kernel"]) == (
                "cli",
                "fail2ban sshd",
                True,
            )
            unban = substitute(d["actionunban"], tags | {"ip": ip})
            out = lab.run("srv", ["sh", "-c", unban], cwd=ROOT)
            assert out.returncode == 0, out.stderr
            assert key not in dyn_set(lab, name)
        # a permanent ban watches for the maximum, with a note
        ban = substitute(d["actionban"], tags | {"ip": "192.0.2.8", "bantime": "-1", "name": "x"})
        out = lab.run("srv", ["sh", "-c", ban], cwd=ROOT)
        assert out.returncode == 0 and out.stderr.count("\n") == 1, out.stderr
        assert "a permanent ban" in out.stderr
        # an address a watched entry already holds: a no-op in one line, exit 0
        ban = substitute(d["actionban"], tags | {"ip": "192.0.2.3", "bantime": "60", "name": "x"})
        out = lab.run("srv", ["sh", "-c", ban], cwd=ROOT)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert out.stdout == (
            "no effect: 192.0.2.3 is watched already by watched[0] (192.0.2.3), which wins: "
            "nothing to do\n"
        )
        assert "192.0.2.3" not in dyn_set(lab, "dyn4")
        assert 30 * 86400 - 10 <= dyn_set(lab, "dyn4")["192.0.2.8"]["timeout"] <= 30 * 86400


FAIL2BAN = shutil.which("fail2ban-server")
JAIL = """[mtdtest]
enabled = true
filter = mtdtest
logpath = {log}
backend = polling
maxretry = 1
bantime = {bantime}
action = mtd[mtd_opts="{opts}"]
"""


def wait_for(pred: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what()
        time.sleep(0.05)


@pytest.mark.netns
@needs_redis
@pytest.mark.skipif(FAIL2BAN is None, reason="needs fail2ban (make deb)")
def test_fail2ban_bans_through_a_stopped_redis_reach_the_table_then_redis(tmp_path: Path):
    """Debian's fail2ban-server with the shipped action, `mtd` found on its PATH, and the
    fleet's Redis stopped: the ban is applied on this host, and `mtd run` publishes it once
    Redis is back. A trusted address and a bantime over 30 days cost no error."""
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "dyn.json.j2").write_text(DYN_TEMPLATE)
    port = free_port()  # nothing listens there yet: a stopped Redis
    state = write_state(
        tmp_path / "state.yaml",
        template="dyn",
        trusted=["192.0.2.2"],
        redis={"url": f"redis://127.0.0.1:{port}/0"},
    )
    opts = f"-s {state} --templates {tmp_path / 'tpl'}"
    bindir = tmp_path / "bin"  # `mtd` on fail2ban's PATH, as the package installs it
    bindir.mkdir()
    (bindir / "mtd").write_text(
        f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m reconciler "$@"\n'
    )
    (bindir / "mtd").chmod(0o755)
    conf = tmp_path / "f2b"
    (conf / "action.d").mkdir(parents=True)
    (conf / "filter.d").mkdir()
    (conf / "action.d" / "mtd.conf").write_text(ACTION.read_text())
    (conf / "filter.d" / "mtdtest.conf").write_text("[Definition]\nfailregex = ^fail <HOST>$\n")
    (tmp_path / "auth.log").write_text("")
    (conf / "jail.conf").write_text(
        JAIL.format(log=tmp_path / "auth.log", bantime=90 * 86400, opts=opts)
    )
    (conf / "fail2ban.conf").write_text("[Definition]\nloglevel = INFO\ndbfile = :memory:\n")
    sock, f2blog = tmp_path / "f2b.sock", tmp_path / "f2b.log"
    client = ["fail2ban-client", "-c", str(conf), "-s", str(sock)]
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        assert mtd("apply", *shlex.split(opts), ns=lab).returncode == 0
        path = f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        lab.spawn(
            "srv",
            ["env", f"PATH={path}", "fail2ban-server", "-f", "-x", "-c", str(conf),
             "-s", str(sock), "-p", str(tmp_path / "f2b.pid"), "--logtarget", str(f2blog)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        log = lambda: f2blog.read_text() if f2blog.exists() else ""  # noqa: E731
        wait_for(lambda: "Jail 'mtdtest' started" in log(), log)
        for ip in ("192.0.2.2", "192.0.2.7"):  # one after the other, in fail2ban's order
            out = lab.run("srv", [*client, "set", "mtdtest", "banip", ip])
            assert out.returncode == 0, out.stdout + out.stderr
        wait_for(lambda: "192.0.2.7" in dyn_set(lab, "dyn4"), log)
        wait_for(lambda: log().count("Ban 192.0.2.") == 2, log)
        elem = dyn_set(lab, "dyn4")["192.0.2.7"]
        assert 30 * 86400 - 30 <= elem["timeout"] <= 30 * 86400  # 90 days capped to 30
        assert "192.0.2.2" not in dyn_set(lab, "dyn4")  # trusted: a no-op, and no error
        wait_for(lambda: "192.0.2.2" in log(), log)
        assert "ERROR" not in log() and "returned" not in log(), log()
        # By hand too: one line says where it went, exit 0; a del likewise.
        for op in ("add", "del"):
            out = mtd("watch", op, "192.0.2.9", *shlex.split(opts), ns=lab)
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines()[-1].startswith("on this host alone: "), out.stdout
            assert "mtd run publishes it to the fleet once Redis is back" in out.stdout
        kept = json.loads((tmp_path / "watch-unpublished.json").read_text())["changes"]
        assert [(c["op"], c["source"]) for c in kept] == [
            ("add", "192.0.2.7"),
            ("del", "192.0.2.9"),
        ]
        # Redis is back, with `mtd run`: the ban kept on this host reaches the fleet.
        with redis_server(tmp_path / "redis", lab=lab, role="srv", port=port) as r:
            daemon_log = tmp_path / "run.log"
            with daemon_log.open("ab") as out:
                lab.spawn(
                    "srv", [*MTD, *shlex.split(opts), "run", "--log-json", "--redis-check", "0.3"],
                    stdout=out, stderr=out, cwd=ROOT,
                )  # fmt: skip
            key = bus.BusConfig.from_state(files.load_state(state)).watch_key
            wait_for(lambda: "192.0.2.7" in r.cli("HKEYS", key), daemon_log.read_text)
            assert "published watch add 192.0.2.7" in daemon_log.read_text()
            assert not (tmp_path / "watch-unpublished.json").exists()


def test_kept_changes_are_bounded_and_read_as_data(tmp_path: Path):
    """The record of changes kept while Redis was down: a later change for a source
    replaces an earlier one, and a damaged or hostile record costs its entries only."""
    from reconciler.adapters import watchstore

    epoch = tmp_path / "epoch"
    add = {"op": "add", "source": "192.0.2.7", "reason": "r", "expires_at": 4e9}
    watchstore.keep_unpublished(epoch, [add])
    watchstore.keep_unpublished(epoch, [{**add, "op": "del", "expires_at": 0}])
    assert [c["op"] for c in watchstore.take_unpublished(epoch)] == ["del"]
    assert watchstore.take_unpublished(epoch) == []  # taken: gone
    path = watchstore.unpublished_path(epoch)
    path.write_text(
        '{"changes": [{"op": "add", "source": "192.0.2.9", "reason": "", "expires_at": '
        'Infinity}, {"op": "add", "source": "not an address", "expires_at": 1}, {"op": "x"}, '
        '{"op": "add", "source": "2001:db8:1:2::5", "reason": "ok", "expires_at": 5e9}]}'
    )
    assert watchstore.take_unpublished(epoch) == [
        {"op": "add", "source": "2001:db8:1:2::", "reason": "ok", "expires_at": 5e9}
    ]
    path.write_text("[" * 100_000)
    assert watchstore.take_unpublished(epoch) == [] and not path.exists()
