"""One bad dynamic entry costs that entry, never the table: a zone (`2001:db8::%x`), which
libnftables refuses in a set element, is refused at every entrance (the CLI, a watch
message, the store on disk), and an entry that still reaches a full replacement is left
out by itself while the table is applied (the real kernel, in a lab namespace)."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.adapters import bus, files, watchstore
from reconciler.core import watch
from reconciler.core.watch import Entry, WatchError
from reconciler.lab.netns import Lab
from tests.conftest import MTD, ROOT, mtd, write_state
from tests.test_bus import config
from tests.test_watch import DYN_TEMPLATE

ZONES = ["2001:db8::%x", "2001:db8::1%eth0", "::ffff:192.0.2.7%lo", "fe80::1%1", "2001:db8::/64%x"]


@pytest.mark.parametrize("text", ZONES)
def test_a_zone_is_refused_in_one_line(text: str):
    with pytest.raises(WatchError) as exc:
        watch.canonical(text)
    assert "\n" not in str(exc.value) and "expected" in str(exc.value)


@pytest.mark.parametrize("signed", [False, True])
def test_a_watch_message_with_a_zone_is_rejected(signed: bool):
    cfg = config(signed=signed)
    msg = {"watch": "add", "source": "2001:db8::%x", "for": 60, "reason": "", "time": time.time()}
    if signed:
        assert cfg.signing_key is not None
        msg["sig"] = bus.watch_signature(
            cfg.signing_key, cfg.channel, "add", "2001:db8::%x", 60, "", msg["time"]
        )
    for decode in (lambda d: bus.decode_message(d, cfg), lambda d: bus.decode_watch(d, cfg)):
        with pytest.raises(bus.BadMessage, match="zone"):
            decode(json.dumps(msg).encode())


def _store(path: Path, *sources: str, expires: float | None = None) -> None:
    at = time.time() + 600 if expires is None else expires
    rows = [{"source": s, "origin": "cli", "reason": "", "expires_at": at} for s in sources]
    path.write_text(json.dumps({"entries": rows}))


@pytest.mark.parametrize(
    "bad",
    [
        {"source": "2001:db8::%x"},
        {"source": "192.0.2.0/24"},
        {"source": "2001:DB8::"},  # not the form mtd writes
        {"source": 7},
        {"origin": "root"},
        {"expires_at": "1"},
        {"expires_at": 10**400},
        {"reason": "a\nb"},
        "not an object",
    ],
)
def test_a_bad_entry_in_the_store_costs_that_entry_alone(tmp_path: Path, bad: object):
    path = tmp_path / "watch.json"
    good = {"source": "192.0.2.7", "origin": "cli", "reason": "", "expires_at": time.time() + 60}
    row = good | {"source": "192.0.2.8"} | bad if isinstance(bad, dict) else bad
    path.write_text(json.dumps({"entries": [row, good]}).replace("1" + "0" * 400, "1e400"))
    dropped: list[str] = []
    assert list(watchstore.load(path, dropped)) == ["192.0.2.7"]
    assert len(dropped) == 1 and dropped[0].startswith(f"{path}: entry 0: ")
    assert dropped[0].endswith(": dropped") and "\n" not in dropped[0]


def test_the_cli_refuses_a_zone_before_anything_changes(tmp_path: Path):
    state = write_state(tmp_path / "state.yaml")
    out = mtd("-s", str(state), "watch", "add", "2001:db8::%x", "--local")
    assert out.returncode != 0 and "zone" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not watchstore.path_for(tmp_path / "epoch").exists()


# -- the real kernel ------------------------------------------------------------------------


def _dyn(lab: Lab, name: str) -> set[str]:
    out = lab.run("srv", ["nft", "-j", "list", "set", "inet", "mtd", name])
    if out.returncode != 0:
        return set()
    (found,) = [o["set"] for o in json.loads(out.stdout)["nftables"] if "set" in o]
    return {e["elem"]["val"] for e in found.get("elem", [])}


_INJECT = r"""
import json, sys, time
from pathlib import Path
from reconciler.adapters import files
from reconciler.adapters.kernel import Nft
from reconciler.services.reconcile import reconcile
state = files.load_state(sys.argv[1])
secret = files.load_secret(state.secret_file, create=True)
dynamic = {"4": [("192.0.2.7", 600), ("192.0.2.9", 600)],
           "6": [("2001:db8:1::", 600), ("2001:db8::%x", 600), ("2001:db8:2::", 600)]}
result = reconcile(state, int(sys.argv[2]), Nft(), secret=secret, templates=[Path(sys.argv[3])],
                   dynamic=dynamic, read_live=False)
print(json.dumps({"status": result.status, "dropped": result.dropped}))
if len(sys.argv) > 4:  # and one small element transaction (a watch message, --local)
    from reconciler.core.watch import Entry
    from reconciler.services import watching
    at = time.time() + 600
    add = [Entry(s, "redis", "", at) for s in ("2001:db8::%z", "2001:db8:3::", "192.0.2.10")]
    out = watching.change(state, Nft(), add)
    print(json.dumps({"added": [e.source for e in out.added], "problems": out.problems}))
"""


@pytest.mark.netns
def test_a_zone_in_the_store_or_the_render_input_never_stops_the_table(tmp_path: Path):
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "dyn.json.j2").write_text(DYN_TEMPLATE)
    state = write_state(tmp_path / "state.yaml", template="dyn")
    store = watchstore.path_for(files.load_state(state).epoch_file)
    _store(store, "2001:db8::%x", "192.0.2.7", "2001:db8:1::")
    with Lab(prefix="mtdz") as lab:
        lab.add_server("srv")
        tpl = ["--templates", str(tmp_path / "tpl")]
        out = mtd("-s", str(state), *tpl, "apply", ns=lab)
        assert out.returncode == 0, out.stderr
        assert _dyn(lab, "dyn4") == {"192.0.2.7"} and _dyn(lab, "dyn6") == {"2001:db8:1::"}
        lines = [x for x in (out.stdout + out.stderr).splitlines() if "%x" in x]
        assert len(lines) == 1 and "entry 0" in lines[0] and "zone" in lines[0], lines
        assert "%x" not in store.read_text()  # written once without it: said once
        # an entry that reaches the kernel anyway (bypassing every entrance) is left out
        # alone, the table and every other entry applied
        run = lab.run(
            "srv", [MTD[0], "-c", _INJECT, str(state), "1", str(tmp_path / "tpl")], cwd=ROOT
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.splitlines()[-1])
        assert result["status"] == "changed"
        assert len(result["dropped"]) == 1 and "'2001:db8::%x'" in result["dropped"][0]
        assert _dyn(lab, "dyn4") == {"192.0.2.7", "192.0.2.9"}
        assert _dyn(lab, "dyn6") == {"2001:db8:1::", "2001:db8:2::"}
        run = lab.run(
            "srv",
            [MTD[0], "-c", _INJECT, str(state), "2", str(tmp_path / "tpl"), "change"],
            cwd=ROOT,
        )
        assert run.returncode == 0, run.stderr
        change = json.loads(run.stdout.splitlines()[-1])
        assert change["added"] == ["2001:db8:3::", "192.0.2.10"]
        assert len(change["problems"]) == 1 and "'2001:db8::%z'" in change["problems"][0]
        assert "2001:db8:3::" in _dyn(lab, "dyn6") and "192.0.2.10" in _dyn(lab, "dyn4")


def test_entries_are_canonical_both_ways():
    """What `canonical` returns is what the store keeps and the kernel lists back."""
    for text in ["192.0.2.7", "2001:db8:1:2::5", "::ffff:192.0.2.7", "2001:db8::/64"]:
        source = watch.canonical(text)
        assert watch.canonical(source) == source
        e = Entry(source, "cli", "", 1.0)
        assert watchstore._entry(e.as_dict()) == e


_TEXT = st.one_of(
    st.ip_addresses().map(str),
    st.tuples(st.ip_addresses(v=6).map(str), st.text(min_size=0, max_size=8)).map("%".join),
    st.tuples(st.ip_addresses().map(str), st.integers(-1, 200).map(str)).map("/".join),
    st.text(alphabet="0123456789abcdefABCDEF:.%/ x", max_size=45),
)


@settings(max_examples=400, deadline=None)
@given(_TEXT)
def test_what_canonical_returns_is_an_address_no_kernel_refuses(text: str):
    """Whatever a writer sends, `canonical` refuses it in one line or returns the plain
    text form of an IPv4 address or an IPv6 /64's network address: no zone, no prefix,
    and canonical again."""
    try:
        source = watch.canonical(text)
    except WatchError as exc:
        assert "\n" not in str(exc)
        return
    ip = ipaddress.ip_address(source)
    assert str(ip) == source and "%" not in source and "/" not in source
    assert ip.version == 4 or int(ip) & ((1 << 64) - 1) == 0
    assert watch.canonical(source) == source
