"""Commands that need no host: `mtd schema` and `mtd import-seed`."""

from __future__ import annotations

import json
import os
from typing import Any

import click
import yaml

from reconciler.cli.common import (
    cli,
    examples,
    friendly,
)
from reconciler.core.state import schema
from reconciler.errors import MtdError


@cli.command("schema", epilog=examples("mtd schema > mtd.schema.json"))
def schema_cmd() -> None:
    """Print the JSON Schema of the desired state."""
    click.echo(json.dumps(schema(), indent=2))


@cli.command(
    "import-seed", epilog=examples("mtd import-seed configuration.json > desired_state/mtd.yaml")
)
@click.argument("config", type=click.Path(dir_okay=False))
@friendly
def import_seed(config: str) -> None:
    """Print the YAML desired state equivalent to a proof-of-concept configuration.json."""
    click.echo(seed_to_yaml(config), nl=False)


def seed_to_yaml(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            seed = json.load(f)
    except OSError as exc:
        raise MtdError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise MtdError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None

    def get(obj: Any, *keys: str) -> Any:
        for i, key in enumerate(keys):
            if not isinstance(obj, dict) or key not in obj:
                raise MtdError(
                    f"{path}: {'.'.join(keys[: i + 1])}: missing: expected the "
                    "proof of concept's configuration.json format"
                )
            obj = obj[key]
        return obj

    svc = "nftables_service_configuration"
    conn = "redis_connection_configuration"
    channels = get(seed, "redis_subscriber_configuration", "subscriber_channel_names")
    doc: dict[str, Any] = {
        "table": "mtd",
        "template": "maps",
        "ports": {
            "range": [1, int(get(seed, svc, "max_port_number"))],
            "services": {"tcp": sorted(get(seed, svc, "tcp_ports"))},
        },
        "watched": [
            {
                "source": w.get("ip"),
                **({"ignore": {"tcp": sorted(w["tcp_ignore"])}} if w.get("tcp_ignore") else {}),
            }
            for w in get(seed, svc, "watched_addresses")
        ],
        "redis": {
            "url": f"redis://{get(seed, conn, 'host')}:{get(seed, conn, 'port')}/"
            f"{get(seed, conn, 'db')}",
            "channel": channels[0] if channels else "mtd:rotate",
        },
    }
    header = (
        f"# Converted from {os.path.basename(path)} by `mtd import-seed`.\n"
        "# template: classic reproduces the proof of concept's per-pair rules exactly;\n"
        "# maps (the default) also moves UDP and IPv6 and fools every stateless scan.\n"
    )
    if len(channels) > 1:
        header += f"# The proof of concept listened on {channels}; mtd uses one channel.\n"
    return header + yaml.safe_dump(doc, sort_keys=False)
