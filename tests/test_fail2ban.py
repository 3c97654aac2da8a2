"""The shipped fail2ban action (contrib/fail2ban/action.d/mtd.conf): parsed as fail2ban
reads it, its ban and unban commands run with fail2ban's tags substituted, inside a
namespace, and the kernel's dynamic set checked."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from reconciler.lab.netns import Lab
from tests.conftest import ROOT, mtd, write_state
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
    assert init["mtd"] == "/usr/local/bin/mtd" and init["mtd_opts"] == ""


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
        # a permanent ban is refused in one line, and nothing is added
        ban = substitute(d["actionban"], tags | {"ip": "192.0.2.8", "bantime": "-1", "name": "x"})
        out = lab.run("srv", ["sh", "-c", ban], cwd=ROOT)
        assert out.returncode != 0 and out.stderr.count("\n") == 1, out.stderr
        assert dyn_set(lab, "dyn4") == {}
