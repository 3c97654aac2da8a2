"""`mtd fleet status` (where each host stands, from the heartbeats in Redis) and `mtd fleet
pull` (tell every `mtd run --pull` to fetch now). Neither needs root, nft or the secret."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from reconciler.cli.common import (
    EXIT_PENDING,
    cli,
    examples,
    friendly,
    host_option,
    pass_ctx,
    state_options,
)
from reconciler.errors import MtdError


@cli.group(
    "fleet",
    epilog=examples(
        "mtd fleet status -s ci-state.yaml        # exit 2 unless every host is converged",
        "mtd fleet pull -s ci-state.yaml          # after a merge: every mtd run --pull fetches",
    ),
)
def fleet() -> None:
    """The fleet as a whole, through Redis: status of every host, pull now."""


def notify_pull(ctx: Any) -> None:
    """Publish a "fetch now" notice on redis.pull_channel (signed with the trigger key)."""
    from reconciler.adapters import bus

    config = bus.BusConfig.from_state(ctx.state())
    receivers = bus.publish_pull(config)
    click.echo(
        f"pull notice published on {config.pull_channel} at {config.where} "
        f"({receivers} subscriber{'' if receivers == 1 else 's'})"
    )


@fleet.command(
    "pull",
    epilog=examples("mtd fleet pull -s ci-state.yaml   # the same as: mtd pull --notify"),
)
@state_options
@host_option
@pass_ctx
@friendly
def pull_now(ctx: Any) -> None:
    """Make every `mtd run --pull` fetch its repository now (after a merge, from CI).

    The notice carries no repository, branch or commit: each host fetches what it follows.
    """
    notify_pull(ctx)


@fleet.command(
    "status",
    epilog=examples(
        "mtd fleet status -s /etc/mtd",
        "mtd fleet status --json | jq '.hosts[] | select(.status != \"ok\")'",
        "mtd fleet status --forget web9          # web9 was decommissioned",
    ),
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@click.option(
    "--forget",
    metavar="HOST",
    multiple=True,
    help="Drop a decommissioned host's records first (repeatable).",
)
@state_options
@host_option
@pass_ctx
@friendly
def status(ctx: Any, as_json: bool, forget: tuple[str, ...]) -> None:
    """One row per host that ever reported, then a recap; exit 2 unless all are converged.

    ok/changed: at the fleet's epoch and in sync (changed: its last pass changed the
    table); behind: an older epoch or not in sync; rejected: its last pass failed or its
    pull head was refused; silent: no heartbeat within redis.heartbeat_ttl.
    """
    import redis

    from reconciler.adapters import bus
    from reconciler.core import fleet as core

    config = bus.BusConfig.from_state(ctx.state())
    client = bus.connect(config)
    try:
        for host in forget:
            if not bus.forget_host(client, config, host):
                raise MtdError(f"--forget {host!r}: no such host in {config.heartbeat_key}")
        epoch = bus.read_fleet_epoch(config, client)
        last, live = bus.read_heartbeats(client, config)
    except redis.RedisError as exc:
        problem = bus.describe(exc)
        raise MtdError(f"{config.where}: cannot read the fleet status: {problem}") from None
    finally:
        client.close()
    rows = core.classify(last, live, epoch)
    if as_json:
        click.echo(json.dumps(core.as_json(rows, epoch), indent=1, sort_keys=True))
    else:
        if not rows:
            click.echo(f"no host has reported in {config.heartbeat_key}")
        for line in core.table(rows, epoch, time.time()):
            click.echo(line)
    if not core.converged(rows):
        sys.exit(EXIT_PENDING)
