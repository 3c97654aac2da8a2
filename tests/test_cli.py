"""The CLI without root: validate, render, import-seed, schema, error lines and exit codes."""

import json
import os
from pathlib import Path

import yaml

from reconciler.core.state import parse
from tests.conftest import ROOT, mtd, write_state

# The proof of concept's published configuration, shipped with the tests (CI clones anywhere).
SEED = Path(__file__).parent / "fixtures" / "seed_configuration.json"


def seed_config(tmp_path: Path) -> Path:
    """The proof of concept's example configuration (same content as shared/seed)."""
    path = tmp_path / "configuration.json"
    path.write_text(
        json.dumps(
            {
                "redis_connection_configuration": {
                    "host": "10.0.0.5",
                    "port": 6379,
                    "db": 0,
                    "charset": "utf-8",
                    "decode_responses": True,
                },
                "redis_subscriber_configuration": {"subscriber_channel_names": ["test_channel_1"]},
                "nftables_service_configuration": {
                    "nft_startup_commands_path": "x",
                    "nft_address_rules_path": "y",
                    "max_port_number": 20,
                    "tcp_ports": [1, 2, 3, 4, 5],
                    "watched_addresses": [{"ip": "10.0.0.3", "tcp_ignore": [1, 2]}],
                },
            }
        )
    )
    return path


def test_validate_ok(state_file: Path):
    out = mtd("-s", str(state_file), "validate")
    assert out.returncode == 0 and out.stdout.startswith("ok: ")


def test_validate_example_state_in_repository():
    out = mtd("-s", str(ROOT / "desired_state"), "validate")
    assert out.returncode == 0, out.stderr


def test_validate_error_is_one_line_exit_1(tmp_path: Path):
    bad = write_state(tmp_path / "s.yaml", watched=[{"source": "nope"}])
    out = mtd("-s", str(bad), "validate")
    assert out.returncode == 1
    assert (
        out.stderr.count("\n") == 1 and "watched[0].source: 'nope' is not an address" in out.stderr
    )


def test_read_only_commands_never_create_a_secret(state_file: Path):
    """`render` previews with the mapping drawn at apply (as `diff` and `apply --check` do,
    tests/test_preview.py, in a namespace); `status` has nothing to report yet."""
    secret = state_file.parent / "secret"
    out = mtd("-s", str(state_file), "render")
    assert out.returncode == 2 and "elements drawn at apply>" in out.stdout, out.stderr
    assert out.stderr.startswith("mtd: note: no secret file yet: the mapping is shown as")
    out = mtd("-s", str(state_file), "status")
    assert out.returncode == 1, out.stderr
    assert out.stderr == (
        f"mtd: error: {secret}: no secret file yet: `mtd apply` creates it "
        "(this command only reads)\n"
    )
    assert not secret.exists()


def test_render_reads_the_secret_and_never_prints_it(state_file: Path):
    secret = state_file.parent / "secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    out = mtd("-s", str(state_file), "render")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["nftables"][0] == {"add": {"table": {"family": "inet", "name": "mtd"}}}
    assert secret.read_bytes().hex() not in out.stdout


def test_a_world_readable_secret_is_refused(state_file: Path):
    secret = state_file.parent / "secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o644)
    out = mtd("-s", str(state_file), "render")
    assert out.returncode == 1 and "mode 0644: expected 0600" in out.stderr


def test_render_is_deterministic_per_epoch(state_file: Path):
    secret = state_file.parent / "secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    a = mtd("-s", str(state_file), "render", "--epoch", "3").stdout
    assert a == mtd("-s", str(state_file), "render", "--epoch", "3").stdout
    assert a != mtd("-s", str(state_file), "render", "--epoch", "4").stdout


def test_import_seed_gives_an_equivalent_valid_state(tmp_path: Path):
    out = mtd("import-seed", str(seed_config(tmp_path)))
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    assert doc["ports"] == {"range": [1, 20], "services": {"tcp": [1, 2, 3, 4, 5]}}
    assert doc["watched"] == [{"source": "10.0.0.3", "ignore": {"tcp": [1, 2]}}]
    assert doc["redis"] == {"url": "redis://10.0.0.5:6379/0", "channel": "test_channel_1"}
    parse([("imported.yaml", out.stdout)])  # valid as it is


def test_import_seed_of_the_published_reference():
    out = mtd("import-seed", str(SEED))
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    assert doc["watched"] == [{"source": "10.0.0.3", "ignore": {"tcp": [1, 2]}}]


def test_import_seed_bad_input_is_one_line(tmp_path: Path):
    bad = tmp_path / "c.json"
    bad.write_text('{"redis_connection_configuration": {}}')
    out = mtd("import-seed", str(bad))
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "missing" in out.stderr
    bad.write_text("{nope")
    assert "invalid JSON" in mtd("import-seed", str(bad)).stderr


def test_schema_is_printed():
    assert json.loads(mtd("schema").stdout)["title"] == "mtd desired state"


def test_python_dash_m_works():
    assert "Usage:" in mtd("--help").stdout
