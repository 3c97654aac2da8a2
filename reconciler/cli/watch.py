"""`mtd watch add/del/list`: dynamic watching (an IDS such as fail2ban, or an operator).

With Redis in the state (or the host's configuration) and no `--local`, a change is
published on the rotation channel and kept in Redis, so every `mtd run` of the fleet applies
it within a second (and one that was away applies it when it reconnects); otherwise, or with
`--local`, it is stored on this host and applied to the kernel in one small transaction.
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any

import click

from reconciler.adapters import files, watchstore
from reconciler.cli.common import Ctx, cli, examples, friendly, host_option, pass_ctx, state_options
from reconciler.core import watch
from reconciler.core.watch import Entry
from reconciler.errors import BusError, KernelError, MtdError

LOCAL_HELP = "Act on this host alone (the store and the kernel), not through Redis."


@cli.group(
    "watch",
    epilog=examples(
        "mtd watch add 192.0.2.7 --for 1h --reason 'fail2ban sshd'",
        "mtd watch del 192.0.2.7",
        "mtd watch list --json",
    ),
)
def watch_group() -> None:
    """Watch sources for a while (IDS, fail2ban): they see shuffled ports until expiry."""


@watch_group.command(
    "add",
    epilog=examples(
        "mtd watch add 192.0.2.7 --for 10m",
        "mtd watch add 2001:db8:1:2::5 --for 2d --local   # watches 2001:db8:1:2::/64",
    ),
)
@click.argument("source")
@click.option(
    "--for",
    "duration",
    default=str(watch.DEFAULT_SECONDS),
    show_default=True,
    metavar="DURATION",
    help=f"How long: {watch.DURATION_FORM}; longer (or -1, a permanent ban) is "
    f"{watch.MAX_SECONDS // 86400} days, the maximum.",
)
@click.option("--reason", default="", help="Why (shown by mtd watch list).")
@click.option("--local", is_flag=True, help=LOCAL_HELP)
@state_options
@host_option
@pass_ctx
@friendly
def add(ctx: Ctx, source: str, duration: str, reason: str, local: bool) -> None:
    """Watch SOURCE (an IPv4 address, or an IPv6 address: its /64) for DURATION.

    An IDS's ban is never lost: a trusted or already watched source is a no-op (exit 0, one
    line), a duration over the maximum is capped, and with Redis down the ban is applied
    on this host alone and published by `mtd run` once Redis is back."""
    state = ctx.state()
    canonical = watch.canonical(source)
    seconds, note = watch.capped(duration)
    why = watch.reason(reason)
    if note:
        click.echo(f"mtd: note: {note}", err=True)
    trusted = watch.trusted_over(canonical, state.trusted)
    if trusted is not None:
        click.echo(f"no effect: {canonical} is inside trusted {trusted}: nothing to do")
        return
    covered = _covered(state, canonical)
    if _fleet(state) and not local:
        try:
            _publish(state, "add", canonical, seconds, why, covered)
            return
        except BusError as exc:
            fallback = str(exc)
    else:
        fallback = ""
    if covered:
        click.echo(f"no effect: {canonical} {covered}: nothing to do")
        return
    expires = time.time() + seconds
    _local(ctx, state, add=[Entry(canonical, "cli", why, expires)])
    if fallback:
        change = {"op": "add", "source": canonical, "reason": why, "expires_at": expires}
        _kept(state, change, fallback)


@watch_group.command("del", epilog=examples("mtd watch del 192.0.2.7"))
@click.argument("source")
@click.option("--local", is_flag=True, help=LOCAL_HELP)
@state_options
@host_option
@pass_ctx
@friendly
def delete(ctx: Ctx, source: str, local: bool) -> None:
    """Stop watching SOURCE (a dynamic entry; `watched:` in the state is not changed)."""
    state = ctx.state()
    canonical = watch.canonical(source)
    fallback = ""
    if _fleet(state) and not local:
        try:
            _publish(state, "del", canonical, 0, "")
            return
        except BusError as exc:
            fallback = str(exc)
    _local(ctx, state, remove=[canonical])
    if fallback:
        change = {"op": "del", "source": canonical, "reason": "", "expires_at": 0}
        _kept(state, change, fallback)


def _covered(state: Any, source: str) -> str:
    """Why a dynamic entry for `source` would change nothing ("" when it would): a watched
    entry holds its whole unit, and the most specific watched entry beats dynamic ones."""
    unit = ipaddress.ip_network(f"{source}/{32 if ':' not in source else watch.V6_UNIT}")
    w = state.covering(unit)
    if w is None:
        return ""
    kind = ", per_source" if w.per_source else ""
    return f"is watched already by watched[{w.index}] ({w.label}{kind}), which wins"


def _kept(state: Any, change: dict[str, Any], problem: str) -> None:
    """Redis was down: the change is made on this host, and kept for `mtd run` to publish."""
    watchstore.keep_unpublished(state.epoch_file, [change])
    click.echo(
        f"on this host alone: {problem}; mtd run publishes it to the fleet once Redis is back"
    )


@watch_group.command("list", epilog=examples("mtd watch list", "mtd watch list --json"))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_options
@host_option
@pass_ctx
@friendly
def list_cmd(ctx: Ctx, as_json: bool) -> None:
    """The dynamic sources watched on this host: source, origin, reason, time left."""
    from reconciler.services import watching

    state = ctx.state()
    now = time.time()
    entries = watch.live(watchstore.load(watchstore.path_for(state.epoch_file)), now)
    try:
        kernel = watching.kernel_entries(state, ctx.nft(state, write=False))
    except KernelError:  # not root, say: the store is still worth showing
        kernel = None
    merged = watch.harvest(entries, kernel or {}, now)  # tripwire entries live in the kernel
    rows: list[dict[str, Any]] = [
        {
            "source": e.source if e.family == "4" else f"{e.source}/{watch.V6_UNIT}",
            "origin": e.origin,
            "reason": e.reason,
            "seconds_left": e.left(now),
            "in_kernel": kernel is not None and s in kernel,
        }
        for s, e in sorted(merged.items())
    ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no dynamic source watched")
        return
    width = max(len(r["source"]) for r in rows)
    click.echo(f"{'SOURCE':<{width}}  {'ORIGIN':<8}  {'LEFT':>9}  REASON")
    for r in rows:
        left = _left(r["seconds_left"])
        note = "" if r["in_kernel"] or kernel is None else " (not in the kernel)"
        click.echo(f"{r['source']:<{width}}  {r['origin']:<8}  {left:>9}  {r['reason']}{note}")


def _fleet(state: Any) -> bool:
    from reconciler.adapters import bus

    return bus.configured(state)


def _left(seconds: int) -> str:
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _local(
    ctx: Ctx, state: Any, add: list[Entry] | None = None, remove: list[str] | None = None
) -> None:
    from reconciler.services import watching

    nft = ctx.nft(state, write=False)
    with files.reconcile_lock(state.epoch_file):
        out = watching.change(state, nft, add or [], remove or [])
    if out.problems:
        raise MtdError(*out.problems)
    click.echo(out.line(state.table))


def _publish(state: Any, op: str, source: str, seconds: int, why: str, covered: str = "") -> None:
    from reconciler.adapters import bus

    config = bus.BusConfig.from_state(state)
    order = bus.WatchOrder(op, source, seconds, why, round(time.time(), 6))
    receivers = bus.publish_watch(config, order)
    what = f"watch {op} {source}" + (f" for {seconds} s" if op == "add" else "")
    click.echo(
        f"published: {what} on {config.channel} at {config.where} "
        f"({receivers} subscriber{'' if receivers == 1 else 's'}; kept in {config.watch_key})"
        + (f"; no effect on this host: {source} {covered}" if covered else "")
    )
