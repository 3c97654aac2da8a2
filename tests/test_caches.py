"""The on-disk caches that let a new `mtd apply` process start fast: the kernel's canonical
form and the compiled templates. Root-free where the kernel is not needed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from reconciler.adapters import files, kernel
from reconciler.core import render
from tests.conftest import MTD, ROOT, mtd, write_state

SKELETON = [{"add": {"table": {"family": "inet", "name": "t"}}}]
LISTING = [{"table": {"family": "inet", "name": "t"}}]


def nft_or_skip(cache: Path | None, **kw) -> kernel.Nft:
    try:
        return kernel.Nft(cache_dir=cache, **kw)
    except kernel.KernelError as exc:  # no bindings here: nothing to test
        pytest.skip(str(exc))


def test_a_new_process_reads_the_canonical_form_from_disk(tmp_path: Path, monkeypatch):
    learned: list[int] = []
    monkeypatch.setattr(kernel, "_learn", lambda *a: learned.append(1) or LISTING)
    first = nft_or_skip(tmp_path / "cache")
    assert first.canonical(SKELETON, "t") == LISTING and learned == [1]
    (entry,) = (tmp_path / "cache").iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    # Another process (a new Nft): no scratch namespace, same listing.
    assert nft_or_skip(tmp_path / "cache").canonical(SKELETON, "t") == LISTING
    assert learned == [1]
    # Another skeleton is learned, not mistaken for the first.
    other = [*SKELETON, {"add": {"set": {"family": "inet", "table": "t", "name": "s"}}}]
    nft_or_skip(tmp_path / "cache").canonical(other, "t")
    assert learned == [1, 1]


def test_a_torn_or_foreign_cache_entry_is_learned_again(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(kernel, "_learn", lambda *a: LISTING)
    nft_or_skip(tmp_path).canonical(SKELETON, "t")
    (entry,) = tmp_path.glob("canonical-*.json")
    for bad in ("{not json", '{"a": 1}', "[1, 2]"):
        entry.write_text(bad)
        assert nft_or_skip(tmp_path).canonical(SKELETON, "t") == LISTING


def test_read_only_commands_read_the_cache_but_never_write_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(kernel, "_learn", lambda *a: LISTING)
    nft_or_skip(tmp_path / "cache", write_cache=False).canonical(SKELETON, "t")
    assert not (tmp_path / "cache").exists()


def test_compiled_templates_are_reused_and_only_from_a_private_directory(tmp_path: Path):
    cache = tmp_path / "templates"
    files.use_template_cache(cache, write=False)
    assert not cache.exists()  # read-only: nothing created
    files.use_template_cache(cache, write=True)
    try:
        render._cached_environment(tuple(render.template_dirs())).get_template("maps.json.j2")
        assert len(list(cache.iterdir())) == 1
        cache.chmod(0o777)  # anyone could plant bytecode here: not used
        files.use_template_cache(cache, write=True)
        assert render._BYTECODE is None
    finally:
        render.use_bytecode_cache(None)


@pytest.mark.netns
def test_a_second_apply_runs_no_scratch_namespace(lab, tmp_path: Path):
    state = write_state(tmp_path / "s.yaml")
    assert mtd("-s", str(state), "apply", ns=lab).returncode == 0
    cache = tmp_path / "cache"
    assert any(cache.glob("canonical-*.json")) and any((cache / "templates").iterdir())
    # An `unshare` that fails and leaves a mark: the cached form must make it unneeded.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "unshare"
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/scratch-used\nexit 1\n")
    fake.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    out = lab.run("srv", ["env", f"PATH={path}", *MTD, "-s", str(state), "apply"], cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("ok:"), out.stderr
    assert not (tmp_path / "scratch-used").exists()


def test_every_level_of_mtds_own_directories_is_private(tmp_path: Path):
    """`cache/templates` made at once: `cache/` too is 0700 (mkdir(parents=True) would have
    given it the umask's 0755), and an existing level is left as it is."""
    files.use_template_cache(tmp_path / "var" / "cache" / "templates", write=True)
    for level in ("var", "var/cache", "var/cache/templates"):
        assert stat.S_IMODE((tmp_path / level).stat().st_mode) == 0o700, level
    files.write_private(tmp_path / "var" / "a" / "b" / "f", b"x")
    assert stat.S_IMODE((tmp_path / "var" / "a").stat().st_mode) == 0o700
