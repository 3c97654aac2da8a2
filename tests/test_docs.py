"""The documentation holds together: README.md is a front page, every topic lives in docs/,
every relative link and anchor between them resolves (as GitHub renders them), so a page
moved or a heading renamed cannot leave a reader at a dead link, and the quick start prints
what it says it prints."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks/README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The page without its fenced code blocks and code spans, where `[x](y)` is not a link."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces as
    hyphens, `-1`, `-2` for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for title in re.findall(r"^#{1,6} (.+)$", prose_keep_spans(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def prose_keep_spans(path: Path) -> str:
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:, file: are not ours to check
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_is_a_front_page_that_links_every_page():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines: move a topic into docs/"
    assert [line.split("#")[0].strip() for line in lines[3:5]] == ["make demo", "make test"]
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


def test_every_page_has_one_title():
    for page in PAGES:
        titles = re.findall(r"^# ", prose_keep_spans(page), re.M)
        assert len(titles) == 1, f"{page.relative_to(ROOT)}: {len(titles)} top-level titles"


def quick_start() -> tuple[str, list[list[tuple[str, list[str]]]], str]:
    """README's quick start: its state, its sessions (each `$ mtd ...` with the lines it
    prints), and the prefix the text adds to `trusted` between the second and third."""
    text = (ROOT / "README.md").read_text().split("## Quick start\n", 1)[1].split("\n## ")[0]
    (state,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    sessions = []
    for block in re.findall(r"```\n(\$ .*?)```", text, re.S):
        session: list[tuple[str, list[str]]] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                session.append((line[2:], []))
            else:
                session[-1][1].append(line)
        sessions.append(session)
    (added,) = re.findall(r"add `([^`]+)` to `trusted`", text)
    return state, sessions, added


def normal(line: str, state: Path) -> str:
    """What may differ from run to run: timings, the secret's bucket and ports, the path."""
    line = re.sub(r"\(\d+\.\d+ s\)", "(T s)", line.replace(str(state), "/etc/mtd"))
    return re.sub(r"-> \d+$", "-> P", re.sub(r"bucket \d+", "bucket B", line))


@pytest.mark.netns
def test_the_quick_start_prints_what_the_readme_says(tmp_path: Path):
    from reconciler.lab.netns import Lab
    from tests.conftest import MTD

    state, sessions, added = quick_start()
    assert [cmd for s in sessions for cmd, _ in s][:4] == [
        "mtd validate",
        "mtd diff --stat",
        "mtd apply",
        "mtd apply",
    ]
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "state.yaml").write_text(state.split("\n", 1)[1])  # the first line names the file
    env = {**os.environ, "MTD_STATE": str(etc), "MTD_STATE_DIR": str(tmp_path / "var")}
    with Lab(prefix="mtdqs") as lab:
        lab.add_server()
        for i, session in enumerate(sessions):
            if i == 2:  # "Change the state (say, add ... to `trusted`)"
                doc = yaml.safe_load((etc / "state.yaml").read_text())
                doc["trusted"].append(added)
                (etc / "state.yaml").write_text(yaml.safe_dump(doc))
            for command, expected in session:
                out = lab.run("srv", [*MTD, *command.split()[1:]], cwd=tmp_path, env=env)
                printed = (out.stdout + out.stderr).splitlines()
                assert [normal(x, etc) for x in printed] == [normal(x, etc) for x in expected], (
                    f"README's quick start: `{command}` now prints:\n" + "\n".join(printed)
                )
            if i == 2:  # the change shown, applied before `status`
                lab.run("srv", [*MTD, "apply"], cwd=tmp_path, env=env)
