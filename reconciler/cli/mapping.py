"""`mtd mapping --source ADDR`: one source's view of the services, computed with the secret.

Sensitive: it prints what mtd hides from that source. It exists to check the deception (the
differential oracle in tests/test_oracle.py builds a twin host from it) and to answer "where
does this client find port 22 right now". It reads the secret file and never creates one.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Collection, Mapping
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
from reconciler.errors import KernelError, MtdError


def view(
    state: State,
    secret: bytes,
    epoch: int,
    source: str,
    dynamic: Collection[str] | Mapping[str, str] = (),
) -> dict[str, Any]:
    """{"source", "watched", "bucket", "trusted", "dynamic", "epoch", "fixed", "tcp": {real:
    seen}, "udp": {...}} for one source, with the ruleset's precedence (`audit.mapping_of`):
    trusted, the most specific watched entry (a per_source one's bucket), a dynamic source's
    bucket; every service listed, those that stay in place as themselves. `dynamic` may map
    each dynamic source to its origin (cli, redis, tripwire): then `dynamic` says which."""
    return _view(state, secret, epoch, source, dynamic)[0]


def _view(
    state: State,
    secret: bytes,
    epoch: int,
    source: str,
    dynamic: Collection[str] | Mapping[str, str],
) -> tuple[dict[str, Any], dict[str, set[int]]]:
    """`view`, and the services moved for the source by protocol: one drawn to its own port
    is in place this epoch only, which the text tells from a port the state keeps in place."""
    addr = source.split("%", 1)[0]  # fe80::1%eth0
    seen = audit.mapping_of(state, secret, epoch, addr, dynamic)
    label = seen.watched.label if seen.watched is not None else None
    origin = None
    if label is None and seen.bucket is not None:
        label = "dynamic"
        if isinstance(dynamic, Mapping):
            with contextlib.suppress(ValueError):
                origin = dynamic.get(watch.unit_of(addr))
    out: dict[str, Any] = {
        "source": addr,
        "watched": label,
        "bucket": seen.bucket,
        "trusted": seen.trusted,
        "dynamic": origin,
        "epoch": epoch,
        "fixed": {p: sorted(state.fixed[p]) for p in PROTOCOLS},
    }
    for proto in PROTOCOLS:
        moved = seen.moves.get(proto, {})
        out[proto] = {port: moved.get(port, port) for port in state.services[proto]}
    return out, {proto: set(seen.moves.get(proto, {})) for proto in PROTOCOLS}


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
    now = time.time()
    entries = watch.live(watchstore.load(watchstore.path_for(state.epoch_file)), now)
    kernel, note = _kernel(ctx, state)
    merged = watch.harvest(entries, kernel, now)  # the tripwire's live only in the kernel
    result, moved = _view(state, secret, epoch, source, {s: e.origin for s, e in merged.items()})
    if as_json:
        click.echo(json.dumps(result))
        return
    label = result["watched"]
    if result["trusted"]:
        how = "trusted: services in place"
    elif label is None:
        how = "not watched: services in place"
    elif result["dynamic"]:
        how = f"watched dynamically ({result['dynamic']}), bucket {result['bucket']}"
    elif result["bucket"] is not None:
        how = f"watched as {label}, bucket {result['bucket']}"
    else:
        how = f"watched as {label}"
    click.echo(f"source {result['source']}: {how}, epoch {epoch}{note}")
    for proto in PROTOCOLS:
        for real, seen in result[proto].items():
            why = ""
            if seen == real and label:
                why = "  (fixed)" if real in result["fixed"][proto] else "  (in place)"
                if real in moved[proto]:
                    why = "  (drawn to its own port this epoch)"
            click.echo(f"{proto} {real} -> {seen}{why}")


def _kernel(ctx: Ctx, state: State) -> tuple[dict[str, int], str]:
    """The dynamic sources the live table holds (the tripwire's are only there until the
    next replacement), and a note when it cannot be read (not root, no table)."""
    from reconciler.services import watching

    try:
        found = watching.kernel_entries(state, ctx.nft(state, write=False))
    except (KernelError, MtdError) as exc:
        return {}, f" (tripped sources unknown: {str(exc).splitlines()[0]})"
    return found or {}, ""
