"""A fleet inventory in one state directory: shared files, groups/, hosts/ (pure, no root)."""

import json
from pathlib import Path

import pytest
import yaml

from reconciler.adapters import files
from reconciler.core import inventory
from reconciler.errors import MtdError
from tests.conftest import mtd

BASE = """\
secret_file: /tmp/mtd-inventory-test/secret
ports: {range: [1, 20], services: {tcp: [1, 2, 3, 4, 5], udp: [53]}}
watched: [{source: 192.0.2.3}]
redis: {channel: fleet}
"""
FLEET = [
    ("base.yaml", BASE),
    ("z-late.yaml", "drift_interval: 10\n"),
    ("groups/web.yaml", "hosts: [h1, h2]\nwatched: [{source: 198.51.100.0/24}]\n"),
    ("groups/zz-edge.yaml", "hosts: [h2]\nredis: {min_interval: 5}\ndrift_interval: 20\n"),
    ("hosts/h1.yaml", "ports: {range: [1, 30]}\nredis: {url: 'redis://192.0.2.9:6379/0'}\n"),
    ("hosts/h3.yaml", "table: other\n"),
    ("README.md", "not a state file"),
    ("groups/old/x.yaml", "ignored: true\n"),
]


def test_a_plain_directory_is_not_an_inventory():
    assert not inventory.is_inventory([("a.yaml", BASE), ("b.yml", "")])
    assert inventory.is_inventory(FLEET)


def test_files_are_classified_by_place():
    kinds = {rel: inventory.kind(rel) for rel, _ in FLEET}
    assert kinds == {
        "base.yaml": "shared",
        "z-late.yaml": "shared",
        "groups/web.yaml": "groups",
        "groups/zz-edge.yaml": "groups",
        "hosts/h1.yaml": "hosts",
        "hosts/h3.yaml": "hosts",
        "README.md": None,
        "groups/old/x.yaml": None,
    }


def test_hosts_are_those_named_by_files_and_groups():
    assert inventory.hosts(FLEET) == ["h1", "h2", "h3"]


def test_merge_order_is_all_then_groups_by_name_then_host():
    names = [name for name, _ in inventory.select(FLEET, "h2")]
    assert names == ["base.yaml", "z-late.yaml", "groups/web.yaml", "groups/zz-edge.yaml"]
    names = [name for name, _ in inventory.select(FLEET, "h1", root="/srv/state")]
    assert names[-1] == "/srv/state/hosts/h1.yaml"
    assert all("hosts" not in doc for _, doc in inventory.select(FLEET, "h1"))


def test_host_beats_group_beats_all_lists_replaced_maps_merged():
    h1, h2, h3 = (inventory.state_for(FLEET, h) for h in ("h1", "h2", "h3"))
    # Lists are replaced: the group's watched list replaces the shared one.
    assert [w.label for w in h1.watched] == ["198.51.100.0/24"]
    assert [w.label for w in h3.watched] == ["192.0.2.3"]
    # Maps merge key by key: the host's range, the shared services.
    assert h1.port_range == (1, 30) and h1.services["tcp"] == (1, 2, 3, 4, 5)
    assert h1.redis["url"] == "redis://192.0.2.9:6379/0" and h1.redis["channel"] == "fleet"
    assert h2.redis["min_interval"] == 5 and h2.redis["channel"] == "fleet"
    # A later group beats an earlier one and the shared files.
    assert (h1.drift_interval, h2.drift_interval) == (10, 20)
    assert (h1.table, h3.table) == ("mtd", "other")


def test_unknown_host_is_an_error_naming_the_known_ones():
    with pytest.raises(MtdError) as exc:
        inventory.select(FLEET, "h9", root="fleet")
    assert str(exc.value) == (
        "fleet: host 'h9' is not in the inventory: expected hosts/h9.yaml or h9 in a "
        "groups/*.yaml hosts list (hosts: h1, h2, h3)"
    )


@pytest.mark.parametrize(
    ("text", "shown"),
    [("watched: []\n", "missing"), ("hosts: h1\n", "'h1'"), ("hosts: [1]\n", "[1]")],
)
def test_a_group_needs_a_list_of_host_names(text: str, shown: str):
    with pytest.raises(MtdError) as exc:
        inventory.hosts([("groups/g.yaml", text)])
    assert str(exc.value) == (
        f"groups/g.yaml: hosts: {shown}: expected the list of host names this group applies to"
    )


def test_hosts_key_is_refused_outside_groups():
    with pytest.raises(MtdError) as exc:
        inventory.state_for([("base.yaml", BASE + "hosts: [h1]\n"), ("hosts/h1.yaml", "")], "h1")
    assert str(exc.value) == (
        "base.yaml: hosts: only groups/*.yaml files list hosts: expected it in a group file"
    )


def test_one_file_per_host():
    docs = [("base.yaml", BASE), ("hosts/h1.yaml", ""), ("hosts/h1.yml", "")]
    with pytest.raises(MtdError, match="also describes host 'h1': expected one file per host"):
        inventory.select(docs, "h1")


def test_errors_name_the_file_of_the_host_that_broke_it():
    docs = [("base.yaml", BASE), ("hosts/h1.yaml", "ports: {range: [1, 99999]}\n")]
    with pytest.raises(MtdError) as exc:
        inventory.state_for(docs, "h1", root="st")
    assert str(exc.value) == "st/hosts/h1.yaml:1: ports.range[1]: 99999: expected at most 65535"


def write_fleet(root: Path) -> Path:
    for rel, text in FLEET:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_localfiles_reads_an_inventory_for_a_host(tmp_path: Path):
    root = write_fleet(tmp_path / "fleet")
    assert files.inventory_hosts(root) == ["h1", "h2", "h3"]
    assert files.load_state(root, "h1").port_range == (1, 30)
    names = [n for n, _ in files.state_documents(root, "h1")]
    rels = ["base.yaml", "z-late.yaml", "groups/web.yaml", "hosts/h1.yaml"]
    assert names == [f"{root}/{rel}" for rel in rels]


def test_a_plain_directory_keeps_working_and_ignores_host(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(BASE)
    (tmp_path / "b.yaml").write_text("table: b\n")
    assert files.inventory_documents(tmp_path) is None
    assert files.load_state(tmp_path, "any").table == "b"
    assert files.load_state(tmp_path / "a.yaml", "any").table == "mtd"


def test_validate_checks_every_host_and_prefixes_errors(tmp_path: Path):
    root = write_fleet(tmp_path / "fleet")
    (root / "hosts/h3.yaml").write_text("ports: {range: [1, 3]}\n")
    out = mtd("-s", str(root), "validate")
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        "ok: h1: 1 watched sources, template maps",
        "ok: h2: 1 watched sources, template maps",
    ]
    assert out.stderr.startswith(f"mtd: error: h3: {root}/base.yaml:3: watched[0].source:")
    assert "ports.range [1, 3] has only 3 tcp ports to show them at" in out.stderr
    assert out.stderr.count("\n") == 1
    assert mtd("-s", str(root), "validate", "--host", "h1").returncode == 0
    only = mtd("-s", str(root), "validate", "--host", "nope")
    assert only.returncode == 1 and "host 'nope' is not in the inventory" in only.stderr


def test_render_shows_what_a_given_host_would_get(tmp_path: Path):
    root = write_fleet(tmp_path / "fleet")
    for rel in ("base.yaml", "hosts/h1.yaml", "hosts/h3.yaml"):
        doc = yaml.safe_load((root / rel).read_text())
        doc["secret_file"] = str(tmp_path / "secret")
        (root / rel).write_text(yaml.safe_dump(doc))
    files.load_secret(tmp_path / "secret", create=True)  # render only reads it
    h1 = mtd("-s", str(root), "render", "--host", "h1")
    h3 = mtd("-s", str(root), "render", "--host", "h3")
    assert h1.returncode == 0 and h3.returncode == 0, h1.stderr + h3.stderr
    tables = [json.loads(out.stdout)["nftables"][0]["add"]["table"]["name"] for out in (h1, h3)]
    assert tables == ["mtd", "other"]
    assert "198.51.100.0" in h1.stdout and "198.51.100.0" not in h3.stdout
