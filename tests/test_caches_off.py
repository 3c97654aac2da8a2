"""`MTD_CACHE`: each cache turns off alone, and with every cache off every command prints
what it prints with every cache on (the caches only save time)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from reconciler.adapters import cachedir, files
from reconciler.cli.common import Ctx
from reconciler.core import caches, render, shuffle
from reconciler.errors import MtdError
from reconciler.lab.netns import Lab
from tests.conftest import MTD, ROOT, write_state

# What each cache leaves in the directory, by name.
KEPT = {
    "parsed": "parsed-*.json",
    "verdicts": cachedir.SCHEMA_VERDICTS,
    "bytecode": "templates/*",
    "rendered": "rendered-*.json",
    "canonical": "canonical-*.json",
    "committed": cachedir.KernelCache.COMMITTED,
}


def test_every_cache_has_a_name_and_a_trace():
    assert set(KEPT) == set(caches.NAMES)


@pytest.mark.parametrize(
    ("value", "used"),
    [
        (None, set(caches.NAMES)),
        ("on", set(caches.NAMES)),
        ("OFF", set()),
        ("parsed, canonical", {"parsed", "canonical"}),
        ("-rendered,-committed", set(caches.NAMES) - {"rendered", "committed"}),
    ],
)
def test_mtd_cache_says_which_caches_are_used(value: str | None, used: set[str]):
    assert caches.chosen(value) == used


@pytest.mark.parametrize("value", ["nope", "parsed,-rendered", "-", "parsed,,nope"])
def test_an_unknown_choice_is_one_line(value: str):
    with pytest.raises(MtdError) as caught:
        caches.chosen(value)
    assert len(caught.value.problems) == 1 and "MTD_CACHE=" in caught.value.problems[0]


def _fill(tmp_path: Path) -> Path:
    """Do, in this process, what a command that writes does with its caches (`apply`):
    keep the state as parsed and accepted, render through the caches, learn the canonical
    form, record a commit. The CLI's own choice (`Ctx`) under the current `MTD_CACHE`."""
    ctx = Ctx(str(write_state(tmp_path / "state.yaml")))
    ctx.state_dir = str(tmp_path)
    state = ctx.state()
    kept = ctx.caches(write=True, rendered=True)
    kept.verdicts.add(state.schema_key)
    kept.parsed.put(state.parsed_key, state.parsed_json)
    render.render(state, shuffle.compute(state, b"\1" * 32, 3), caches=kept)
    kernel = ctx.kernel_cache(write=True)
    kernel.keep_canonical("k" * 64, [{"table": {"family": "inet", "name": "mtd"}}])
    kernel.keep_committed({"mark": "b:1:2", "table": "mtd", "digest": "d"})
    return ctx.cache_dir


@pytest.mark.parametrize("name", sorted(caches.NAMES))
def test_each_cache_turns_off_alone(tmp_path: Path, monkeypatch, name: str):
    monkeypatch.setenv(caches.ENV, f"-{name}")
    where = _fill(tmp_path)
    left = {other for other, pattern in KEPT.items() if any(where.glob(pattern))}
    assert left == set(caches.NAMES) - {name}
    # And what the others left is not read through it either.
    monkeypatch.setenv(caches.ENV, "on")
    _fill(tmp_path)
    monkeypatch.setenv(caches.ENV, f"-{name}")
    ctx = Ctx()
    ctx.state_dir = str(tmp_path)
    kept, kernel = ctx.caches(rendered=True), ctx.kernel_cache(write=False)
    found = {
        "parsed": kept.parsed is not caches.OFF,
        "verdicts": kept.verdicts is not caches.OFF,
        "bytecode": kept.bytecode is not None,
        "rendered": kept.rendered is not caches.OFF,
        "canonical": kernel.canonical("k" * 64) is not None,
        "committed": kernel.committed() is not None,
    }
    assert {n for n, used in found.items() if used} == set(caches.NAMES) - {name}


def _run(argv: list[str], cache: str, run=subprocess.run) -> tuple[int, str, str]:
    env = {**os.environ, caches.ENV: cache}
    out = run([*MTD, *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    # Only the time a command took may differ.
    times = re.compile(r"\(\d+\.\d+ s\)|\d{4}-\d\d-\d\dT[0-9:.]+(Z|[+-]\d\d:\d\d)?")
    return out.returncode, times.sub("T", out.stdout), times.sub("T", out.stderr)


ROOT_FREE = [
    ["validate"],
    ["render"],
    ["render", "--epoch", "2"],
    ["mapping", "--source", "192.0.2.3"],
    ["mapping", "--source", "198.51.100.9", "--json", "--epoch", "5"],
    ["history"],
    ["schema"],
]


def test_root_free_commands_print_the_same_with_every_cache_off(tmp_path: Path, monkeypatch):
    """The caches filled as `apply` leaves them, then each command twice: caches on (read)
    and off. One process each (a few seconds in all)."""
    where = _fill(tmp_path)
    files.load_secret(tmp_path / "secret", create=True)
    assert all(any(where.glob(p)) for p in KEPT.values())
    state = ["-s", str(tmp_path / "state.yaml"), "--state-dir", str(tmp_path)]
    for argv in ROOT_FREE:
        on = _run([*state, *argv], "on")
        assert on[0] == 0, (argv, on)
        assert _run([*state, *argv], "off") == on, argv


# apply twice (the second finds its caches), then every command a host runs by hand, and
# another state (one more watched source: nothing kept for the first may serve it).
KERNEL = [
    ["apply"],
    ["apply"],
    ["diff"],
    ["status"],
    ["status", "--exit-code"],
    ["apply", "--check", "--exit-code"],
    ["rotate", "--check"],
    ["rotate"],
    ["render"],
    ["mapping", "--source", "192.0.2.3"],
    ["watch", "list"],
    ["-s", "other.yaml", "diff", "--stat"],
    ["-s", "other.yaml", "apply"],
    ["-s", "other.yaml", "apply"],
    ["down"],
    ["status"],
    ["history"],
]


@pytest.mark.netns
def test_kernel_commands_print_the_same_with_every_cache_off(lab: Lab, tmp_path: Path):
    """The same day twice in one namespace, caches on then off, from the same secret and
    epoch 0 (the audit log and epoch file of the first day removed)."""
    state = write_state(tmp_path / "state.yaml")
    watched = [{"source": "192.0.2.3"}, {"source": "203.0.113.0/24"}]
    write_state(tmp_path / "other.yaml", watched=watched)
    files.load_secret(tmp_path / "secret", create=True)
    argvs = [
        ["-s", str(state), "--state-dir", str(tmp_path), *argv]
        for argv in (
            [a.replace("other.yaml", str(tmp_path / "other.yaml")) for a in argv] for argv in KERNEL
        )
    ]
    days = {}
    for cache in ("on", "off"):
        for name in ("epoch", "audit.jsonl"):
            (tmp_path / name).unlink(missing_ok=True)
        days[cache] = [
            _run(argv, cache, run=lambda a, **kw: lab.run("srv", a, **kw)) for argv in argvs
        ]
    assert any((tmp_path / "cache").glob("canonical-*.json"))
    for argv, on, off in zip(KERNEL, days["on"], days["off"], strict=True):
        assert off == on, argv
    assert days["on"][1][1].startswith("ok:") and days["on"][7][1].startswith("changed:")
    assert days["on"][12][1].startswith("changed:") and days["on"][13][1].startswith("ok:")
