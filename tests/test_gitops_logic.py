"""A pull round's logic against the in-memory kernel: a real git repository in a temp dir,
no root, no namespace."""

from __future__ import annotations

import json
from pathlib import Path

from reconciler.adapters import files
from reconciler.adapters.fake import FakeKernel
from reconciler.core import render, shuffle
from reconciler.services import gitops
from tests.test_gitops import Remote, state_doc


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
