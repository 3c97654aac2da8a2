"""The on-disk caches that let a new `mtd apply` process start fast: the kernel's canonical
form, the compiled templates, the states the schema accepted and rendered texts. Root-free
where the kernel is not needed."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import stat
from pathlib import Path

import pytest

from reconciler.adapters import cachedir, files, kernel
from reconciler.adapters.caching import CachingBackend
from reconciler.core import caches, render, shuffle
from reconciler.core import state as state_mod
from reconciler.core.state import Local
from reconciler.errors import MtdError
from tests.conftest import MTD, ROOT, mtd, write_state

ALL = frozenset(caches.NAMES)
SKELETON = [{"add": {"table": {"family": "inet", "name": "t"}}}]
LISTING = [{"table": {"family": "inet", "name": "t"}}]


def nft_or_skip(cache: Path | None, write_cache: bool = True) -> CachingBackend:
    try:
        return CachingBackend(kernel.Nft(), cachedir.KernelCache(cache, write=write_cache))
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
    # Another process (a new backend): no scratch namespace, same listing.
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
    cachedir.bytecode(cache, write=False)
    assert not cache.exists()  # read-only: nothing created
    bytecode = cachedir.bytecode(cache, write=True)
    dirs = tuple(render.template_dirs())
    render.environment(dirs, bytecode).get_template("maps.json.j2")
    assert len(list(cache.iterdir())) == 1
    cache.chmod(0o777)  # anyone could plant bytecode here: not used
    assert cachedir.bytecode(cache, write=True) is None


@pytest.mark.netns
def test_a_second_apply_runs_no_scratch_namespace(lab, tmp_path: Path):
    state = write_state(tmp_path / "s.yaml")
    assert mtd("-s", str(state), "--state-dir", str(tmp_path), "apply", ns=lab).returncode == 0
    cache = tmp_path / "cache"
    assert any(cache.glob("canonical-*.json")) and any((cache / "templates").iterdir())
    # An `unshare` that fails and leaves a mark: the cached form must make it unneeded.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "unshare"
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/scratch-used\nexit 1\n")
    fake.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    argv = [*MTD, "-s", str(state), "--state-dir", str(tmp_path), "apply"]
    out = lab.run("srv", ["env", f"PATH={path}", *argv], cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("ok:"), out.stderr
    assert not (tmp_path / "scratch-used").exists()


def test_every_level_of_mtds_own_directories_is_private(tmp_path: Path):
    """`cache/templates` made at once: `cache/` too is 0700 (mkdir(parents=True) would have
    given it the umask's 0755), and an existing level is left as it is."""
    cachedir.bytecode(tmp_path / "var" / "cache" / "templates", write=True)
    for level in ("var", "var/cache", "var/cache/templates"):
        assert stat.S_IMODE((tmp_path / level).stat().st_mode) == 0o700, level
    files.write_private(tmp_path / "var" / "a" / "b" / "f", b"x")
    assert stat.S_IMODE((tmp_path / "var" / "a").stat().st_mode) == 0o700


def _kept(state_file: Path) -> caches.Caches:
    """The caches a command run with `--state-dir` the state file's directory reads."""
    return cachedir.open_caches(state_file.parent / "cache", write=False, use=ALL)


def _load(state_file: Path, **kw) -> state_mod.State:
    return files.load_state(state_file, kept=_kept(state_file), **kw)


def _accept(state_file: Path) -> None:
    """What `apply` does after loading: record that the schema accepted this state."""
    accepted = _load(state_file)
    cachedir.SchemaVerdicts(state_file.parent / "cache", write=True).add(accepted.schema_key)


def test_an_accepted_state_is_not_validated_again(state_file: Path, monkeypatch):
    _accept(state_file)
    assert stat.S_IMODE((state_file.parent / "cache").stat().st_mode) == 0o700
    verdicts = state_file.parent / "cache" / cachedir.SCHEMA_VERDICTS
    assert stat.S_IMODE(verdicts.stat().st_mode) == 0o600

    def no_schema(*_: object) -> list:
        raise AssertionError("validated again")

    monkeypatch.setattr(state_mod, "_schema_errors", no_schema)
    again = _load(state_file)
    assert again.watched and again.schema_key == _load(state_file).schema_key


def test_a_changed_state_is_validated_whatever_the_cache_says(state_file: Path):
    _accept(state_file)
    text = state_file.read_text()
    state_file.write_text(text.replace("table: mtd", "table: 7"))  # one value, now invalid
    with pytest.raises(MtdError, match=r"table: .*7"):
        _load(state_file)
    # The checks in Python always run: the same accepted state, loaded where its secret
    # file may not be (inside a repository clone), is refused.
    state_file.write_text(text)
    _accept(state_file)
    local = Local(forbidden=(str(state_file.parent / "secret"),))  # not the cache
    with pytest.raises(MtdError, match=r"inside .*the repository clone"):
        _load(state_file, local=local)


def test_the_verdict_key_covers_the_schema_and_the_version(state_file: Path, monkeypatch):
    doc = {"table": "mtd"}
    key = state_mod.schema_key(doc)
    assert state_mod.schema_key({"table": "mtd2"}) != key
    assert state_mod.schema_key({"table": True}) != state_mod.schema_key({"table": 1})
    monkeypatch.setattr(state_mod, "__version__", "0.0.0-other")
    assert state_mod.schema_key(doc) != key
    monkeypatch.undo()
    monkeypatch.setattr(state_mod, "schema_text", lambda: '{"type": "object"}')
    assert state_mod.schema_key(doc) != key


def test_verdicts_are_trusted_only_in_a_private_directory(state_file: Path, monkeypatch):
    _accept(state_file)
    (state_file.parent / "cache").chmod(0o777)  # anyone could have written it
    called: list[int] = []
    real = state_mod._schema_errors
    monkeypatch.setattr(state_mod, "_schema_errors", lambda *a: called.append(1) or real(*a))
    _load(state_file)
    assert called == [1]


def test_loading_a_state_records_no_verdict(state_file: Path):
    _load(state_file)  # what read-only commands do
    assert not (state_file.parent / "cache").exists()


def _doc(commands: list) -> str:
    return json.dumps(commands, default=list)  # element lists as lists


class _Using:
    """The rendering caches the tests below hand to `render`: rendered texts in
    `tmp_path/cache` (the `render_cache` fixture), or none."""

    kept = caches.NONE


def _render(*args, **kw) -> list:
    return render.render(*args, **kw, caches=_Using.kept)


def _rendered(
    tmp_path: Path,
    secret: bytes = b"\1" * 32,
    search: list[Path] | None = None,
    epoch: int = 3,
    **extra: object,
):
    """Render the test state at `epoch` with the render cache in `tmp_path/cache`."""
    state = files.load_state(write_state(tmp_path / "state.yaml", **extra))
    return _render(state, shuffle.compute(state, secret, epoch), search)


def _use(cache: cachedir.RenderedTexts | None) -> None:
    _Using.kept = caches.Caches(rendered=cache) if cache is not None else caches.NONE


@pytest.fixture
def render_cache(tmp_path: Path):
    cache = cachedir.RenderedTexts(tmp_path / "cache", write=True)
    _use(cache)
    yield cache
    _use(None)


def test_a_rendered_text_is_reused_without_jinja(tmp_path: Path, render_cache, monkeypatch):
    first = _rendered(tmp_path)
    (entry,) = (tmp_path / "cache").glob("rendered-*.json")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600

    def no_jinja(*_: object) -> None:
        raise AssertionError("rendered again")

    monkeypatch.setattr(render, "_render_text", no_jinja)
    assert _doc(_rendered(tmp_path)) == _doc(first)
    # Another secret: the same text, the elements of the new mapping spliced in.
    other = _rendered(tmp_path, secret=b"\2" * 32)
    assert _doc(other) != _doc(first)
    monkeypatch.undo()
    _use(None)
    assert _doc(_rendered(tmp_path, secret=b"\2" * 32)) == _doc(other)


def test_a_kept_text_says_where_its_placeholders_are(tmp_path: Path, render_cache, monkeypatch):
    """A reused text is spliced at the places kept with it, without walking the document
    (or checking its depth again); places that do not account for every placeholder (an
    entry of before, a damaged one) mean a walk, with the same document as the result."""
    first = _doc(_rendered(tmp_path))
    (path,) = (tmp_path / "cache").glob("rendered-*.json")
    entry = json.loads(path.read_text())
    host_values = sum(entry["text"].count(json.dumps(f"\0mtd:{k}")) for k in ("table", "mark"))
    assert len(entry["paths"]) == entry["text"].count(render._TOKEN_JSON) - host_values > 0

    def walked(*_: object) -> None:
        raise AssertionError("walked the whole document")

    with monkeypatch.context() as m:
        m.setattr(render, "_splice", walked)
        m.setattr(render, "_too_deep", walked)
        assert _doc(_rendered(tmp_path)) == first
    damaged = [
        entry["paths"][:-1],  # one missing
        [*entry["paths"][:-1], entry["paths"][0]],  # one named twice
        [[*p[:-1], "nope"] for p in entry["paths"]],  # leading nowhere
        [["nftables", 0]] * len(entry["paths"]),  # to no placeholder
        "nonsense",
    ]
    for paths in [None, *damaged]:
        path.write_text(json.dumps({**entry, "paths": paths}))
        path.chmod(0o600)
        assert _doc(_rendered(tmp_path)) == first, paths
        # The walk found the places again and kept them for the next process.
        assert json.loads(path.read_text())["paths"] == entry["paths"], paths


def test_a_new_epoch_reuses_the_text_unless_a_template_reads_the_epoch(
    tmp_path: Path, render_cache, monkeypatch
):
    """The shipped templates never read `epoch` (a comment naming it does not count): the
    next epoch splices its own mapping into the same text. A template that writes the epoch
    is rendered again at each new one, and its text says the right epoch."""
    first = _doc(_rendered(tmp_path, epoch=3))
    with monkeypatch.context() as m:
        m.setattr(render, "_render_text", lambda *_: pytest.fail("rendered again"))
        fourth = _doc(_rendered(tmp_path, epoch=4))
    _use(None)
    assert fourth == _doc(_rendered(tmp_path, epoch=4)) != first
    _use(render_cache)
    (tmp_path / "t").mkdir()
    shipped = (render.template_dirs()[0] / "maps.json.j2").read_text()
    marked = shipped.replace(
        '"name": {{ T }}', '"name": {{ T }}, "comment": "epoch {{ epoch }}"', 1
    )
    assert marked != shipped
    (tmp_path / "t" / "maps.json.j2").write_text(marked)
    for epoch in (3, 4, 3):
        commands = _rendered(tmp_path, search=[tmp_path / "t"], epoch=epoch)
        assert f'"comment": "epoch {epoch}"' in _doc(commands)


def test_a_kept_text_holds_no_mapping(tmp_path: Path, render_cache):
    commands = _rendered(tmp_path, buckets=4)  # one bucket has no hash, so no seed
    text = next((tmp_path / "cache").glob("rendered-*.json")).read_text()
    maps = [c["add"]["map"] for c in commands if "map" in c["add"]]
    assert any(m.get("elem") for m in maps)
    buckets = [m for m in maps if m["name"].startswith("b")]
    assert buckets and all(m.get("elem") for m in buckets)  # port : port, per bucket
    for m in maps:
        for key, _ in m.get("elem") or []:
            if isinstance(key, dict):
                assert json.dumps(key["concat"], separators=(",", ":")) not in text
                assert f'"concat": {json.dumps(key["concat"])}' not in text
    for m in buckets:
        assert f'"elem": {json.dumps(m["elem"])}' not in text
        assert json.dumps(m["elem"], separators=(",", ":")) not in text
    # The jhash seed (secret- and epoch-derived) is a placeholder too.
    seeds = {
        e["vmap"]["key"]["jhash"]["seed"]
        for c in commands
        if "rule" in c["add"]
        for e in c["add"]["rule"]["expr"]
        if "vmap" in e and "jhash" in e["vmap"]["key"]
    }
    assert seeds and all(f'"seed": {seed}' not in text for seed in seeds)


def test_a_template_that_reads_the_mapping_is_always_rendered(tmp_path: Path, render_cache):
    (tmp_path / "t").mkdir()
    shipped = (render.template_dirs()[0] / "maps.json.j2").read_text()
    # The same document, after a loop over the elements themselves.
    loop = "{%- for e in elements['tcp4'] %}{% endfor -%}\n"
    (tmp_path / "t" / "maps.json.j2").write_text(loop + shipped)
    _rendered(tmp_path, search=[tmp_path / "t"])
    assert not list((tmp_path / "cache").glob("rendered-*.json"))
    (tmp_path / "t" / "maps.json.j2").write_text(shipped)  # without the loop: kept
    _rendered(tmp_path, search=[tmp_path / "t"])
    assert len(list((tmp_path / "cache").glob("rendered-*.json"))) == 1


def test_a_text_that_read_the_pairs_is_never_kept(tmp_path: Path, render_cache):
    """`pairs` is the mapping in clear (the classic template writes it out): such a text
    would put the mapping in `cache/rendered-*.json`, so it is never kept."""
    classic = {
        "template": "classic",
        "ports": {"range": [1, 20], "services": {"tcp": [1, 2, 3]}},
        "watched": [{"source": "192.0.2.3"}, {"source": "198.51.100.0/24"}],
    }
    state = files.load_state(write_state(tmp_path / "state.yaml", **classic))
    mapping = shuffle.compute(state, b"\1" * 32, 3)
    _render(state, mapping)
    assert not list((tmp_path / "cache").glob("rendered-*.json"))
    _render(state, mapping)  # and the next render does not find one either
    assert not list((tmp_path / "cache").glob("rendered-*.json"))


def test_an_edited_or_shadowed_template_is_rendered_again(
    tmp_path: Path, render_cache, monkeypatch
):
    user, shipped = tmp_path / "user", render.template_dirs()[0]
    user.mkdir()
    search = [user, shipped]
    first = _rendered(tmp_path, search=search)
    calls: list[int] = []
    real = render._render_text

    def counted(*args: object) -> object:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(render, "_render_text", counted)
    _rendered(tmp_path, search=search)
    assert calls == []
    # A template of the same name now found first: rendered from it.
    (user / "maps.json.j2").write_text((shipped / "maps.json.j2").read_text() + "\n")
    assert _doc(_rendered(tmp_path, search=search)) == _doc(first) and calls == [1]
    _rendered(tmp_path, search=search)
    assert calls == [1]  # kept again, for this file
    # The same file, edited: rendered again.
    (user / "maps.json.j2").write_text((shipped / "maps.json.j2").read_text() + "\n\n")
    _rendered(tmp_path, search=search)
    assert calls == [1, 1]


def test_read_only_commands_reuse_rendered_texts_but_never_write_them(tmp_path: Path):
    _use(cachedir.RenderedTexts(tmp_path / "cache", write=False))
    try:
        _rendered(tmp_path)
    finally:
        _use(None)
    assert not (tmp_path / "cache").exists()


def _remember_parsed(state_file: Path) -> None:
    """What `apply` does after loading: keep the documents as parsed."""
    state = _load(state_file)
    cachedir.ParsedStates(state_file.parent / "cache", write=True).put(
        state.parsed_key, state.parsed_json
    )


def test_a_parsed_state_is_not_parsed_again(state_file: Path, monkeypatch):
    first = _load(state_file)
    _remember_parsed(state_file)
    (entry,) = (state_file.parent / "cache").glob("parsed-*.json")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600

    def no_yaml(*_: object) -> dict:
        raise AssertionError("parsed again")

    monkeypatch.setattr(state_mod, "load_yaml", no_yaml)
    again = _load(state_file)
    assert again == first and again.doc == first.doc
    # A meaning error still points at its line (the text is composed only then).
    local = Local(forbidden=(str(state_file.parent / "secret"),))  # not the cache
    with pytest.raises(MtdError, match=r"state.yaml:2: secret_file"):
        _load(state_file, local=local)
    # Another text is parsed: one value changed.
    state_file.write_text(state_file.read_text().replace("table: mtd", "table: mtd2"))
    with pytest.raises(AssertionError, match="parsed again"):
        _load(state_file)


def test_only_documents_json_keeps_as_they_are_are_kept():
    assert state_mod._as_json({"s": {"d": datetime.date(2024, 1, 1)}}) == ""  # a YAML date
    assert state_mod._as_json({"s": {1: "a"}}) == ""  # a number as a key
    assert state_mod._as_json({"s": {"a": [1, 1.0, True, None]}}) != ""


def test_parsed_states_are_trusted_only_in_a_private_directory(state_file: Path, monkeypatch):
    _remember_parsed(state_file)
    (state_file.parent / "cache").chmod(0o777)
    calls: list[int] = []
    real = state_mod.load_yaml
    monkeypatch.setattr(state_mod, "load_yaml", lambda *a: calls.append(1) or real(*a))
    _load(state_file)
    assert calls == [1]


def _commit_naming(
    tmp_path: Path, clone: Path, where: Path
) -> tuple[Path, Local, list[tuple[str, str]]]:
    """A commit in `clone` whose text names `where` in an `epoch_file:` line inside a
    multi-line comment (no key: it passes every check), the host's configuration read as a
    pull round reads it, and the commit's documents."""
    (clone / "state" / "mtd.yaml").write_text(
        "ports: {range: [1, 20], services: {tcp: [1]}}\n"
        "watched:\n"
        "- source: 192.0.2.3\n"
        '  comment: "x\n'
        f"epoch_file: {where}/epoch\n"
        '    y"\n'
    )
    config = tmp_path / "mtd.conf.yaml"
    config.write_text(f"secret_file: {tmp_path}/own/secret\n")
    local = Local(
        documents=[(str(config), config.read_text())],
        state_dir=str(tmp_path / "own"),
        untrusted=True,
        forbidden=(str(clone),),
    )
    return config, local, files.state_documents(clone / "state")


def test_a_repository_commit_cannot_choose_where_parsed_states_are_read(tmp_path: Path):
    """The parsed-state cache is where the host chose (`--state-dir`), never read from the
    texts. A commit whose text has an `epoch_file:` line (inside a multi-line comment, so
    it is no key and passes every check) must not send a reader into the clone, where the
    commit itself can plant a `parsed-*.json`: its documents would stand for the host's own
    configuration too, and set the table, `ownership: ruleset`, the audit log..."""
    clone = tmp_path / "repo"
    (clone / "state").mkdir(parents=True)
    evil = clone / "evil" / "cache"
    evil.mkdir(parents=True)
    for d in (clone, clone / "state", clone / "evil", evil):
        d.chmod(0o755)  # as git checks out, as root
    config, local, docs = _commit_naming(tmp_path, clone, clone / "evil")
    key = files.parsed_key(docs, local)
    planted = {
        str(config): {
            "secret_file": f"{tmp_path}/own/secret",
            "table": "filter",
            "ownership": "ruleset",
        },
        docs[0][0]: {
            "ports": {"range": [1, 20], "services": {"tcp": [1]}},
            "watched": [{"source": "192.0.2.3"}],
        },
    }
    (evil / f"parsed-{key[:40]}.json").write_text(json.dumps({"key": key, "documents": planted}))
    kept = cachedir.open_caches(tmp_path / "own" / "cache", write=False, use=ALL)
    state = files.load_state(clone / "state", local=local, kept=kept)
    assert state.table == "mtd" and state.ownership == "table"
    # Root reading the clone as a local state (`-s`): its texts still choose nothing.
    trusting = dataclasses.replace(local, untrusted=False)
    key = files.parsed_key(docs, trusting)
    (evil / f"parsed-{key[:40]}.json").write_text(json.dumps({"key": key, "documents": planted}))
    assert files.load_state(clone / "state", local=trusting, kept=kept).table == "mtd"


def test_no_text_chooses_where_parsed_states_are_read_outside_the_clone_either(tmp_path: Path):
    """The guard above without the clone's: a commit's text naming a private directory
    elsewhere (one an earlier run left, say) must not choose where parsed states are read
    either: only the host does, whatever directory the repository's texts name."""
    clone, elsewhere = tmp_path / "repo", tmp_path / "elsewhere" / "cache"
    (clone / "state").mkdir(parents=True)
    elsewhere.mkdir(parents=True, mode=0o700)
    config, local, docs = _commit_naming(tmp_path, clone, elsewhere.parent)
    key = files.parsed_key(docs, local)
    planted = {
        str(config): {"secret_file": f"{tmp_path}/own/secret", "table": "filter"},
        docs[0][0]: {"ports": {"range": [1, 20], "services": {"tcp": [1]}}},
    }
    entry = {"key": key, "documents": planted}
    (elsewhere / f"parsed-{key[:40]}.json").write_text(json.dumps(entry))
    kept = cachedir.open_caches(tmp_path / "own" / "cache", write=False, use=ALL)
    assert files.load_state(clone / "state", local=local, kept=kept).table == "mtd"


def test_a_text_that_depends_on_a_missing_template_is_never_kept(tmp_path: Path, render_cache):
    """`{% include [a, b] %}` or `ignore missing`: the text depends on a file being absent,
    which a kept entry could not check, so it is rendered each time (and sees the file once
    it is there)."""
    (tmp_path / "t").mkdir()
    shipped = (render.template_dirs()[0] / "maps.json.j2").read_text()
    head = '{%- include ["local.j2", "empty.j2"] -%}\n'
    (tmp_path / "t" / "empty.j2").write_text("")
    (tmp_path / "t" / "maps.json.j2").write_text(head + shipped)
    _rendered(tmp_path, search=[tmp_path / "t"])
    assert not list((tmp_path / "cache").glob("rendered-*.json"))


def test_dynamic_entries_change_every_second_and_the_kept_text_still_serves(
    tmp_path: Path, render_cache, monkeypatch
):
    """The seconds left of the dynamic entries are placeholders (`dynamic_elements`), out
    of the key: a command with live entries reuses the text as long as their number holds,
    and the document says each entry's own time. A template that iterates over `dynamic`
    reads the values: it is rendered again every time, never served a stale time."""
    state = files.load_state(write_state(tmp_path / "state.yaml"))
    mapping = shuffle.compute(state, b"\1" * 32, 3)

    def rendered(left: int, search: list[Path] | None = None) -> list:
        dynamic = {"4": [("198.51.100.7", left)], "6": [("2001:db8:7::", left + 1)]}
        return _render(state, mapping, search, dynamic)

    def dyn(commands: list, v: str) -> list:
        return next(
            c["add"]["set"]["elem"] for c in commands if c["add"].get("set", {}).get("name") == v
        )

    rendered(100)
    with monkeypatch.context() as m:
        m.setattr(render, "_render_text", lambda *_: pytest.fail("rendered again"))
        commands = rendered(99)
    assert dyn(commands, "dyn4") == [{"elem": {"val": "198.51.100.7", "timeout": 99}}]
    assert dyn(commands, "dyn6") == [{"elem": {"val": "2001:db8:7::", "timeout": 100}}]
    _use(None)
    assert _doc(rendered(99)) == _doc(commands)
    _use(render_cache)
    (tmp_path / "t").mkdir()
    shipped = (render.template_dirs()[0] / "maps.json.j2").read_text()
    looped = shipped.replace(
        "{{ dynamic_elements[v] | tojson }}",
        '[{%- for src, left in dynamic[v] %}{"elem": {"val": {{ src | tojson }}, '
        '"timeout": {{ left }}}}{{ "," if not loop.last }}{% endfor %}]',
    )
    assert looped != shipped
    (tmp_path / "t" / "maps.json.j2").write_text(looped)
    for left in (50, 49, 50):
        got = dyn(rendered(left, [tmp_path / "t"]), "dyn4")
        assert got == [{"elem": {"val": "198.51.100.7", "timeout": left}}]


def test_a_kept_environment_compiles_once_per_process_unless_bytecode_is_off(
    tmp_path: Path, monkeypatch
):
    """The environments a long-lived process keeps (`cachedir.environments`) belong to the
    `bytecode` cache: with it, a second rendering makes no new one; without, each does."""
    from reconciler.core import sandbox

    made: list[int] = []
    real = sandbox.environment

    def counted(*args: object, **kw: object) -> object:
        made.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(sandbox, "environment", counted)
    state = files.load_state(write_state(tmp_path / "state.yaml"))
    mapping = shuffle.compute(state, b"\1" * 32, 0)
    for use, expected in ((caches.NAMES.keys() - {"rendered"}, 1), (set(), 2)):
        cachedir.environments.cache_clear()
        made.clear()
        kept = cachedir.open_caches(tmp_path / "cache", write=True, use=frozenset(use))
        first = _doc(render.render(state, mapping, caches=kept))
        assert _doc(render.render(state, mapping, caches=kept)) == first
        assert len(made) == expected, use
    cachedir.environments.cache_clear()
