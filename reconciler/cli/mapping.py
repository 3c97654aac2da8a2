"""`mtd mapping --source ADDR`: one source's view of the services, computed with the secret.

Sensitive: it prints what mtd hides from that source. It exists to check the deception (the
differential oracle in tests/test_oracle.py builds a twin host from it) and to answer "where
does this client find port 22 right now". It reads the secret file and never creates one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from typing import Any

import click

from reconciler.adapters import files, watchstore
from reconciler.cli.common import (
    Ctx,
    cli,
    examples,
    friendly,
    host_option,
    pass_ctx,
    state_options,
)
from reconciler.core import audit, watch
from reconciler.core.state import PROTOCOLS, State


def view(
    state: State, secret: bytes, epoch: int, source: str, dynamic: Collection[str] = ()
) -> dict[str, Any]:
    """{"source", "watched", "bucket", "trusted", "epoch", "tcp": {real: seen}, "udp": {...}}
    for one source, with the ruleset's precedence (`audit.mapping_of`): trusted, the most
    specific watched entry (a per_source one's bucket), a dynamic source's bucket; every
    service listed, those that stay in place as themselves."""
    seen = audit.mapping_of(state, secret, epoch, source.split("%", 1)[0], dynamic)
    label = seen.watched.label if seen.watched is not None else None
    if label is None and seen.bucket is not None:
        label = "dynamic"
    out: dict[str, Any] = {
        "source": source.split("%", 1)[0],  # fe80::1%eth0
        "watched": label,
        "bucket": seen.bucket,
        "trusted": seen.trusted,
        "epoch": epoch,
    }
    for proto in PROTOCOLS:
        moved = seen.moves.get(proto, {})
        out[proto] = {port: moved.get(port, port) for port in state.services[proto]}
    return out


@cli.command(
    "mapping",
    epilog=examples(
        "mtd mapping -s /etc/mtd --source 192.0.2.3",
        "mtd mapping -s /etc/mtd --source fe80::3%eth0 --json",
    ),
)
@click.option("--source", required=True, metavar="ADDR", help="The client address to look at.")
@click.option("--epoch", type=int, help="This epoch instead of the current one.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_options
@host_option
@pass_ctx
@friendly
def mapping_cmd(ctx: Ctx, source: str, epoch: int | None, as_json: bool) -> None:
    """Print where SOURCE finds each service (reveals the mapping: treat as secret)."""
    state = ctx.state()
    secret = files.read_private_key(state.secret_file, "secret file")
    epoch = files.read_epoch(state.epoch_file) if epoch is None else epoch
    entries = watch.live(watchstore.load(watchstore.path_for(state.epoch_file)), time.time())
    result = view(state, secret, epoch, source, set(entries))
    if as_json:
        click.echo(json.dumps(result))
        return
    label = result["watched"]
    if result["trusted"]:
        how = "trusted: services in place"
    elif label is None:
        how = "not watched: services in place"
    elif result["bucket"] is not None:
        how = f"watched as {label}, bucket {result['bucket']}"
    else:
        how = f"watched as {label}"
    click.echo(f"source {result['source']}: {how}, epoch {epoch}")
    for proto in PROTOCOLS:
        for real, seen in result[proto].items():
            note = "" if seen != real else ("  (in place)" if label else "")
            click.echo(f"{proto} {real} -> {seen}{note}")
