"""A pull round's logic against the in-memory kernel: a real git repository in a temp dir,
no root, no namespace."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from reconciler.adapters import files
from reconciler.adapters.fake import FakeKernel
from reconciler.core import render, shuffle
from reconciler.services import gitops
from tests.test_gitops import Remote, git, state_doc


def puller(tmp_path: Path, remote: Remote) -> gitops.Puller:
    return gitops.Puller(
        gitops.PullConfig(url=str(remote.bare), state_dir=tmp_path / "sd", host="h1", timeout=30)
    )


def test_a_round_applies_good_commits_rejects_bad_ones_and_never_retries_them(tmp_path: Path):
    remote, kernel = Remote(tmp_path), FakeKernel()
    p = puller(tmp_path, remote)
    first = remote.commit({"state.yaml": state_doc(tmp_path)})
    out = p.round(kernel)
    assert (out.status, out.commit, out.result.status) == ("applied", first, "changed")
    assert len(kernel.applied) == 1 and kernel.list_table("mtd") is not None
    assert p.round(kernel).status == "unchanged" and len(kernel.applied) == 1

    # The kernel refuses the next commit's table: rejected once, named, never retried.
    kernel.refuse(when=lambda c: "map" in c["add"], reason="Could not process rule: Nope")
    second = remote.commit({"state.yaml": state_doc(tmp_path, watched=[{"source": "192.0.2.4"}])})
    out = p.round(kernel)
    # Numbered as in the rendered document: the template's own place of `add map tcp4`.
    state = files.load_state(p.config.clone_dir / "state.yaml")
    doc = render.render(state, shuffle.compute(state, b"k" * 32, 0))
    index = next(i for i, c in enumerate(doc) if c["add"].get("map", {}).get("name") == "tcp4")
    assert out.status == "rejected" and out.message.startswith(
        f"commit {second[:12]}: nftables refused rendered command {index} (add map tcp4): "
    )
    listed = len(kernel.transactions)
    again = p.round(kernel)
    assert (again.status, again.new) == ("rejected", False)
    assert len(kernel.transactions) == listed  # not tried again
    assert p.repo.head() == first  # the clone stays at the last applied commit

    # A bad state is rejected before the kernel sees anything.
    kernel.accept_all()
    third = remote.commit({"state.yaml": "ports: [\n"})
    out = p.round(kernel)
    assert out.status == "rejected" and "state.yaml" in out.message and third[:12] in out.message
    assert len(kernel.transactions) == listed

    # The next good commit is applied; the record says so.
    fourth = remote.commit({"state.yaml": state_doc(tmp_path, watched=[{"source": "192.0.2.5"}])})
    out = p.round(kernel)
    assert (out.status, out.commit) == ("applied", fourth)
    record = json.loads((tmp_path / "sd" / "pull.json").read_text())
    assert record["applied"]["commit"] == fourth and record["rejected"]["commit"] == third
    audit = [json.loads(ln) for ln in Path(out.state.audit_log).read_text().splitlines()]
    assert [(a["origin"], a["result"]) for a in audit] == [
        ("pull", "changed"),
        ("pull", "rejected"),
        ("pull", "rejected"),
        ("pull", "changed"),  # another watched source: its elements are added
    ]


def test_check_applies_and_records_nothing(tmp_path: Path):
    remote, kernel = Remote(tmp_path), FakeKernel()
    remote.commit({"state.yaml": state_doc(tmp_path)})
    files.load_secret(tmp_path / "sd" / "secret", create=True)  # --check only reads it
    out = puller(tmp_path, remote).round(kernel, check=True)
    assert (out.status, out.result.status) == ("applied", "would change")
    assert kernel.applied == [] and kernel.tables == {}
    assert "applied" not in gitops.read_record(tmp_path / "sd" / "pull.json")


def test_a_commits_attributes_cannot_make_the_checkout_differ_from_what_was_validated(
    tmp_path: Path,
):
    """`.gitattributes` may ask git to re-encode, convert or expand what it checks out; the
    clone's own attributes outrank it, so the applied state is the validated blob, byte for
    byte, and the daemon can load it."""
    remote, kernel = Remote(tmp_path), FakeKernel()
    text = state_doc(tmp_path) + "# $Id$\r\n"
    remote.commit({"state.yaml": text})
    attributes = "*.yaml working-tree-encoding=UTF-16 ident eol=crlf text\n"
    (remote.work / ".gitattributes").write_text(attributes)
    git(remote.work, "add", ".gitattributes")  # alone: the author's state.yaml stays as it is
    git(remote.work, "commit", "-q", "-m", "attributes")
    git(remote.work, "push", "-q", str(remote.bare), "HEAD:main")
    head = git(remote.work, "rev-parse", "HEAD").strip()
    p = puller(tmp_path, remote)
    out = p.round(kernel)
    assert (out.status, out.commit) == ("applied", head)
    assert (p.config.state_path / "state.yaml").read_bytes() == text.encode()
    assert files.load_state(p.config.state_path, "h1", p.config.local()).watched


def with_name(remote: Remote, name: str) -> str:
    """Commit a file under a name the author's own file system could not hold."""
    oid = subprocess.run(
        ["git", "hash-object", "-w", "--stdin"],
        input="hello\n",
        cwd=remote.work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    git(remote.work, "update-index", "--add", "--cacheinfo", f"100644,{oid},{name}")
    git(remote.work, "commit", "-q", "-m", "a long name")
    git(remote.work, "push", "-q", str(remote.bare), "HEAD:main")
    return git(remote.work, "rev-parse", "HEAD").strip()


def test_what_the_checkout_could_not_write_is_rejected_before_anything_is_applied(
    tmp_path: Path, monkeypatch
):
    """A name too long for the file system made the checkout fail after the apply: live,
    never recorded, applied again every round. Now refused first, and named; only the
    state directory is checked out, so what lies outside it (`path`) does not count."""
    remote, kernel = Remote(tmp_path), FakeKernel()
    long = "docs/" + "x" * 300
    remote.commit({"state.yaml": state_doc(tmp_path)})
    bad = with_name(remote, long)
    p = puller(tmp_path, remote)
    out = p.round(kernel)
    assert out.status == "rejected" and kernel.transactions == []
    assert out.message.startswith(f"commit {bad[:12]}: 'docs/xxx") and "300 bytes" in out.message
    good = remote.commit({})  # `add -A`: the name, in no working tree, is deleted
    assert (p.round(kernel).status, p.repo.head()) == ("applied", good)

    # The state in mtd/, a long name beside it: applied, and never written.
    (tmp_path / "sub").mkdir()
    sub = Remote(tmp_path / "sub")
    sub.commit({"mtd/state.yaml": state_doc(tmp_path)})
    commit = with_name(sub, long)
    q = gitops.Puller(
        gitops.PullConfig(
            url=str(sub.bare), state_dir=tmp_path / "sd2", host="h1", timeout=30, path="mtd"
        )
    )
    assert (q.round(FakeKernel()).status, q.repo.head()) == ("applied", commit)
    assert (q.config.clone_dir / "mtd" / "state.yaml").is_file()
    assert not (q.config.clone_dir / "docs").exists()

    # Bounds on what a round reads and the checkout writes (small here, to test them).
    monkeypatch.setattr(gitops, "MAX_EXPORT_BYTES", 4 * len(state_doc(tmp_path)))
    copies = {f"groups-{i}.yaml": "# " + "x" * len(state_doc(tmp_path)) for i in range(4)}
    many = remote.commit(copies)
    out = p.round(kernel)
    assert out.status == "rejected" and "bytes in all: expected at most" in out.message
    assert many[:12] in out.message and p.repo.head() == good
    monkeypatch.setattr(gitops, "MAX_TREE_FILES", 3)
    remote.commit({name: None for name in copies} | {f"notes-{i}.txt": "x" for i in range(3)})
    out = p.round(kernel)
    assert out.status == "rejected" and out.message.endswith(
        "4 files: expected at most 3 in the state directory"
    )


def test_a_malformed_commit_is_rejected_and_never_holds_back_the_next(tmp_path: Path):
    """git's fsck refuses a tree with a `.git` entry, and went on refusing every fetch of
    a history that held it: the fleet stayed at its commit, backing off as if the remote
    were down. Now that commit is rejected by name, and the next one is applied."""
    remote, kernel = Remote(tmp_path), FakeKernel()
    p = puller(tmp_path, remote)
    first = remote.commit({"state.yaml": state_doc(tmp_path)})
    assert p.round(kernel).status == "applied"

    def commit_tree(entries: dict[str, str], parent: str) -> str:
        lines = []
        for name, text in entries.items():
            oid = subprocess.run(
                ["git", "hash-object", "-w", "--stdin"],
                input=text, cwd=remote.work, capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            lines.append(f"100644 blob {oid}\t{name}\n")
        tree = subprocess.run(
            ["git", "mktree"], input="".join(lines), cwd=remote.work,
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        commit = git(remote.work, "commit-tree", tree, "-p", parent, "-m", "plumbing").strip()
        git(remote.work, "push", "-q", "--force", str(remote.bare), f"{commit}:refs/heads/main")
        return commit

    bad = commit_tree({".git": "x\n", "state.yaml": state_doc(tmp_path)}, first)
    out = p.round(kernel)
    assert out.status == "rejected" and out.message.startswith(f"commit {bad[:12]}: git fetch")
    assert "fsck" in out.message and p.next_delay() == p.config.interval
    again = p.round(kernel)
    assert (again.status, again.new) == ("rejected", False)
    fixed = state_doc(tmp_path, watched=[{"source": "192.0.2.9"}])
    good = commit_tree({"state.yaml": fixed}, bad)  # its history still holds the bad tree
    out = p.round(kernel)
    assert (out.status, out.commit, p.repo.head()) == ("applied", good, good)
    audit = [json.loads(ln) for ln in Path(out.state.audit_log).read_text().splitlines()]
    assert [a["result"] for a in audit] == ["changed", "rejected", "changed"]
