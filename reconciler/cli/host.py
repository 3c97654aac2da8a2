"""The commands that act on this host's table: validate, render, diff, apply, rotate,
status, down. `mtd diff` exits 2 when changes are pending."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from reconciler import defaults
from reconciler.adapters import auditlog, files, fresh
from reconciler.cli.common import (
    EXIT_AUDIT_FAILED,
    EXIT_PENDING,
    Ctx,
    cli,
    examples,
    friendly,
    host_option,
    pass_ctx,
    state_options,
)
from reconciler.core import audit, diff, render, shuffle
from reconciler.errors import MtdError

SHOW_MAPPING_OPTION = click.option(
    "--show-mapping",
    is_flag=True,
    help="Print the mapped ports of map element changes (secret) instead of counts per map.",
)


@cli.command(
    epilog=examples(
        "mtd validate -s desired_state/",
        "mtd validate -s fleet/ --host web1",
        "mtd validate -s checkout/fleet --repository   # in the state repository's CI",
    )
)
@click.option(
    "--repository",
    is_flag=True,
    help="Check it as a pulled commit: a host-local key, or a template the host's "
    "configuration does not allow (docs/security.md), is an error.",
)
@state_options
@host_option
@pass_ctx
@friendly
def validate(ctx: Ctx, repository: bool) -> None:
    """Check the desired state (schema and meaning) and that it renders.

    An inventory is checked for every host it names (or only --host), each error line
    prefixed with the host.
    """
    ctx.untrusted = ctx.untrusted or repository
    hosts = files.inventory_hosts(ctx.state_path)
    if hosts is not None:
        _validate_inventory(ctx, [ctx.host] if ctx.host else hosts)
        return
    state = ctx.state()
    render.check(state, ctx.templates)
    click.echo(
        f"ok: {ctx.state_path}: {len(state.watched)} watched sources, template {state.template}"
    )


def _validate_inventory(ctx: Ctx, hosts: list[str]) -> None:
    if not hosts:
        raise MtdError(f"{ctx.state_path}: the inventory names no host: expected hosts/NAME.yaml")
    problems = []
    for host in hosts:
        try:
            state = files.load_state(ctx.state_path, host, ctx.local())
            ctx.warn(state, prefix=f"{host}: ")
            render.check(state, ctx.templates)
        except MtdError as exc:
            problems += [f"{host}: {line}" for line in exc.problems]
            continue
        click.echo(f"ok: {host}: {len(state.watched)} watched sources, template {state.template}")
    if problems:
        raise MtdError(*problems)


@cli.command("render", epilog=examples("mtd render -s desired_state/ --epoch 3 > ruleset.json"))
@click.option("--epoch", type=int, help="Render this epoch instead of the current one.")
@state_options
@host_option
@pass_ctx
@friendly
def render_cmd(ctx: Ctx, epoch: int | None) -> None:
    """Print the nftables JSON document (contains the mapping: treat as secret), byte for
    byte as libnftables receives it (one line; `| jq .` indents it)."""
    from reconciler.core.bulk import dumps

    _check_epoch(epoch)
    state = ctx.state()
    drawn = _no_secret_yet(state)
    secret = PLACEHOLDER_SECRET if drawn else files.load_secret(state.secret_file)
    epoch = files.read_epoch(state.epoch_file) if epoch is None else epoch
    commands = render.render(state, shuffle.compute(state, secret, epoch), ctx.templates)
    if drawn:
        commands = render.placeholders(commands, diff.DRAWN)
    click.echo(dumps({"nftables": commands}))
    if drawn:
        _drawn_note()
        sys.exit(EXIT_PENDING)


# The stand-in secret of a preview on a host that has none yet (`diff`, `apply --check`,
# `render`): never written anywhere, and whatever it draws is printed as a placeholder.
PLACEHOLDER_SECRET = defaults.PLACEHOLDER_SECRET


def _no_secret_yet(state: Any) -> bool:
    return not Path(state.secret_file).exists()


def _drawn_note() -> None:
    click.echo(
        "mtd: note: no secret file yet: the mapping is shown as placeholders (drawn at "
        "apply), the rest is what the first apply creates; nothing was written",
        err=True,
    )


def _check_epoch(epoch: int | None) -> None:
    """Epochs count rotations from 0; checked here rather than by click, whose usage errors
    exit 2, which `diff` uses for "changes pending"."""
    if epoch is not None and epoch < 0:
        raise MtdError(f"--epoch {epoch}: expected an epoch of 0 or more")


def _pass(
    ctx: Ctx,
    *,
    check: bool,
    epoch: int | None = None,
    advance: bool = False,
    read_live: bool = True,
    creates: bool = False,
    force: bool = False,
    confirm_seconds: int | None = None,
    preview: bool = False,
) -> Any:
    state = ctx.state()
    ctx.need_nftables()  # before the audit log, the lock or the cache is made
    own = _own_files(state, ctx.cache_dir)
    undo = contextlib.nullcontext() if check else fresh.undo_on_failure(own)
    with undo as guard:
        return _pass_locked(
            ctx, state, guard, check=check, epoch=epoch, advance=advance, read_live=read_live,
            creates=creates, force=force, confirm_seconds=confirm_seconds, preview=preview,
        )  # fmt: skip


def _own_files(state: Any, cache_dir: Path) -> list[Path]:
    """What a pass may create: removed again when it fails before the kernel took it."""
    from reconciler.adapters import watchstore

    epoch = Path(state.epoch_file)
    store = watchstore.path_for(epoch)
    return [
        Path(state.audit_log),
        Path(state.secret_file),
        epoch,
        epoch.with_name("lock"),
        cache_dir,
        store,
        store.with_name(f"{store.name}.lock"),
    ]


def _pass_locked(
    ctx: Ctx,
    state: Any,
    guard: Any,
    *,
    check: bool,
    epoch: int | None,
    advance: bool,
    read_live: bool,
    creates: bool,
    force: bool,
    confirm_seconds: int | None,
    preview: bool,
) -> Any:
    from reconciler.services import confirm
    from reconciler.services.reconcile import Audit, PassRequest, Session, run_pass

    if not check:  # a change that could not be recorded is not made
        auditlog.check_writable(state.audit_log)
    nft = ctx.nft(state, write=creates and not check)
    changes = creates and not check
    result = run_pass(
        PassRequest(
            state,
            nft,
            secret_from="provision" if changes else "preview" if preview else "read",
            epoch=epoch,
            advance=advance,
            check=check,
            write_epoch=advance,
            # apply, rotate: never lock out the session run from
            session=Session(ctx.hostname, force) if changes else None,
            confirm_seconds=confirm_seconds if not check else None,
            guard=guard,
            templates=ctx.templates,
            caches=ctx.caches(write=changes, rendered=True),
            read_live=read_live,
            audit=Audit(origin="manual", host=ctx.hostname),
        )
    ).result
    if changes and confirm_seconds is None and confirm.read(confirm.record_path(state.epoch_file)):
        click.echo(
            "mtd: note: an apply --confirm is pending: its revert will put back the "
            "table of before it, this change included, unless mtd confirm runs",
            err=True,
        )
    return result


@cli.command(
    "diff",
    epilog=examples("mtd diff -s desired_state/", "mtd diff --state fleet/ --host web1 --stat"),
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--stat", is_flag=True, help="Counts only.")
@click.option("--epoch", type=int, help="Compare against this epoch instead of the current one.")
@click.option(
    "--against",
    metavar="PATH",
    help="Compare with this desired state (a previous commit's) instead of the live table: "
    "no kernel, no root, no secret; the mapping is drawn at apply.",
)
@SHOW_MAPPING_OPTION
@state_options
@host_option
@pass_ctx
@friendly
def diff_cmd(
    ctx: Ctx,
    as_json: bool,
    stat: bool,
    epoch: int | None,
    against: str | None,
    show_mapping: bool,
) -> None:
    """Preview: what `mtd apply` would change. Exit 0 in sync, 2 pending, 1 error."""
    _check_epoch(epoch)
    if against is not None:
        _diff_states(ctx, against, as_json, stat)
    result = _pass(ctx, check=True, epoch=epoch, preview=True)
    if as_json:
        click.echo(json.dumps(_json(result, show_mapping), indent=1))
    else:
        click.echo(f"--- live    table inet {result.table}")
        click.echo(f"+++ desired table inet {result.table} (epoch {result.epoch})")
        if stat or not result.changes:
            click.echo(result.line())
        else:
            for line in diff.brief(result.changes, show_mapping=show_mapping, drawn=result.drawn):
                click.echo(line)
    if result.drawn:
        _drawn_note()
    sys.exit(EXIT_PENDING if result.changes else 0)


def _diff_states(ctx: Ctx, against: str, as_json: bool, stat: bool) -> None:
    """`diff --against OLD`: what the state changes against an earlier one, both rendered
    with the stand-in secret (the same sources get the same placeholders): a state
    repository's CI, with no host's kernel or secret, sees structure, sources and counts."""
    new = ctx.state()
    old = files.load_state(against, ctx.hostname, ctx.local(), ctx.config)

    def table(state: Any) -> diff.Table:
        portmap = shuffle.compute(state, PLACEHOLDER_SECRET, 0)
        return diff.from_commands(render.render(state, portmap, ctx.templates))

    changes = diff.diff(table(new), table(old))
    counts = ", ".join(f"{k} {n}" for k, n in sorted(diff.summary(changes).items()))
    if as_json:
        out = {
            "against": against,
            "in_sync": not changes,
            "summary": diff.summary(changes),
            "changes": [
                c.as_dict() | {"text": diff.masked(c.text, diff.DRAWN)}
                for c in changes
                if not diff.is_mapping(c)
            ],
            "maps": diff.map_counts(changes),
            "drawn_at_apply": True,
        }
        click.echo(json.dumps(out, indent=1))
    else:
        click.echo(f"--- {against}: table inet {old.table}")
        click.echo(f"+++ {ctx.state_path}: table inet {new.table}")
        if not stat:
            for line in diff.brief(changes, drawn=True):
                click.echo(line)
        click.echo(f"{'would change' if changes else 'ok'}: {counts or 'no change'}")
    sys.exit(EXIT_PENDING if changes else 0)


def _json(result: Any, show_mapping: bool) -> dict[str, Any]:
    """`diff --json`: every change but the mapping's, which are counted per map (`maps`)."""
    shown = show_mapping and not result.drawn
    changes = [c for c in result.changes if shown or not diff.is_mapping(c)]
    hidden = diff.DRAWN if result.drawn else diff.SECRET
    out = result.as_dict() | {
        "changes": [
            c.as_dict() | ({} if shown else {"text": diff.masked(c.text, hidden)}) for c in changes
        ]
    }
    if not shown:
        out["maps"] = diff.map_counts(result.changes)
    if result.drawn:
        out["drawn_at_apply"] = True
    return out


def _applied(run: Callable[[], Any], show_diff: bool, show_mapping: bool = False) -> Any:
    """Report a pass; a change made but not recorded exits 3 ("applied, audit failed"): the
    table did change, so neither the usual result nor the usual error would be true."""
    try:
        result = run()
    except auditlog.AuditFailed as exc:
        _report(exc.result, show_diff, show_mapping)
        for line in exc.problems:
            click.echo(f"mtd: error: {line}", err=True)
        sys.exit(EXIT_AUDIT_FAILED)
    _report(result, show_diff, show_mapping)
    return result


def _report(result: Any, show_diff: bool, show_mapping: bool = False) -> None:
    drawn = getattr(result, "drawn", False)
    if show_diff:
        for line in diff.brief(result.changes, show_mapping=show_mapping, drawn=drawn):
            click.echo(line)
    click.echo(result.line())
    if drawn:
        _drawn_note()
    pending = getattr(result, "pending", None)
    if pending is not None:
        due = audit.timestamp(datetime.fromtimestamp(pending["deadline"], UTC))
        kept = (
            ""
            if pending["armed"] == pending["first_armed"]
            else " (extended: still to the table of before the first)"
        )
        click.echo(
            f"pending: the table of before comes back at {due}{kept} unless `mtd confirm` "
            f"runs within {pending['seconds']} s"
        )


FORCE_OPTION = click.option(
    "--force",
    is_flag=True,
    help="Change even what moves the port of the SSH session this runs in (docs/operations.md: "
    "No lockouts); the audit line says so.",
)

EXIT_CODE_OPTION = click.option(
    "--exit-code",
    is_flag=True,
    help="Exit 2 when the live table differs (changes pending or made, table missing), "
    "as `mtd diff` does.",
)


@cli.command(
    epilog=examples(
        "mtd apply -s desired_state/ --diff",
        "mtd apply -s /etc/mtd --check",
        "mtd apply -s /etc/mtd --check --exit-code   # 2 when changes are pending",
        "mtd apply -s /etc/mtd --confirm 120   # then mtd confirm, or it is undone",
    )
)
@click.option("--check", is_flag=True, help="Report what would change; change nothing.")
@click.option("--diff", "show_diff", is_flag=True, help="Also print the changes.")
@SHOW_MAPPING_OPTION
@EXIT_CODE_OPTION
@FORCE_OPTION
@click.option(
    "--confirm",
    "confirm_seconds",
    type=click.IntRange(min=1),
    metavar="SECONDS",
    help="Put the table of before back after SECONDS unless `mtd confirm` runs first.",
)
@state_options
@host_option
@pass_ctx
@friendly
def apply(
    ctx: Ctx,
    check: bool,
    show_diff: bool,
    show_mapping: bool,
    exit_code: bool,
    force: bool,
    confirm_seconds: int | None,
) -> None:
    """Make the live table match the desired state at the current epoch."""
    if check and confirm_seconds is not None:
        raise MtdError("--confirm: expected no --check (nothing is changed to revert)")
    result = _applied(
        lambda: _pass(
            ctx,
            check=check,
            creates=True,
            force=force,
            confirm_seconds=confirm_seconds,
            preview=check,
        ),
        show_diff,
        show_mapping,
    )
    if exit_code and result.changes:
        sys.exit(EXIT_PENDING)


@cli.command(epilog=examples("mtd rotate -s /etc/mtd --diff", "mtd rotate -s /etc/mtd --publish"))
@click.option("--check", is_flag=True, help="Report what would change; change nothing.")
@click.option("--diff", "show_diff", is_flag=True, help="Also print the changes.")
@click.option(
    "--publish",
    is_flag=True,
    help="Rotate the fleet instead: increment the epoch in Redis and publish it "
    "(every `mtd run` applies it; needs no root).",
)
@SHOW_MAPPING_OPTION
@FORCE_OPTION
@state_options
@host_option
@pass_ctx
@friendly
def rotate(
    ctx: Ctx, check: bool, show_diff: bool, publish: bool, show_mapping: bool, force: bool
) -> None:
    """Start a new epoch on this host (a reshuffle) and reconcile."""
    if publish:
        if check or show_diff:
            raise MtdError("--publish: expected no --check or --diff (the daemons apply it)")

        from reconciler.cli import fleet

        fleet.publish(ctx)
        return
    # A new epoch moves every port: the table is replaced without reading it back first
    # (a minute at a million mappings) unless the changes are to be shown.
    _applied(
        lambda: _pass(
            ctx,
            check=check,
            advance=True,
            read_live=check or show_diff,
            creates=True,
            force=force,
        ),
        show_diff,
        show_mapping,
    )


@cli.command(epilog=examples("mtd status -s /etc/mtd --json"))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_options
@EXIT_CODE_OPTION
@host_option
@pass_ctx
@friendly
def status(ctx: Ctx, as_json: bool, exit_code: bool) -> None:
    """Epoch, table, whether the live table matches the desired state, and the last pull."""
    pulled = files.read_json(Path(ctx.state_dir) / "pull.json")  # as gitops.read_record
    pulled = pulled if isinstance(pulled, dict) else {}
    if pulled:  # only a host that pulls imports the pull's code (git) to show it
        from reconciler.services import gitops
    daemon = files.read_daemon_status(ctx.state().epoch_file)
    problem = daemon.get("secret_problem")
    lines = (
        [
            f"mtd run (pid {daemon.get('pid')}): {problem}: still using the secret loaded at "
            "start; restore the file, or reload it to take a new one"
        ]
        if problem
        else []
    )
    try:
        result = _pass(ctx, check=True)
    except MtdError:
        for line in lines:  # what the daemon knows helps most when the check cannot run
            click.echo(line)
        raise
    out = {
        "epoch": result.epoch,
        "table": result.table,
        "in_sync": result.in_sync,
        "summary": diff.summary(result.changes),
        "fingerprint": result.fingerprint,
    }
    counters = ctx.nft().counters(result.table) or {}
    if counters:  # since the table was last replaced; `mtd run --metrics` keeps the totals
        out["packets"] = counters
    dynamic = _dynamic(ctx)
    out["dynamic"] = dynamic
    if pulled:
        out["pull"] = gitops.summary(pulled)
    from reconciler.cli import daemon_status
    from reconciler.services import confirm

    running = daemon_status.alive(daemon.get("pid"))
    if daemon:
        out["daemon"] = daemon | {"running": running}
    pending = confirm.read(confirm.record_path(ctx.state().epoch_file))
    if pending:  # never its `previous` listing: that is the mapping of before
        out["pending_revert"] = {k: pending.get(k) for k in ("table", "deadline", "armed")}
    if as_json:
        click.echo(json.dumps(out))
    else:
        state = "in sync" if result.in_sync else "out of sync"
        click.echo(f"table inet {result.table}: epoch {result.epoch}, {state}")
        if counters:
            counts = ", ".join(f"{name} {n}" for name, n in counters.items())
            click.echo(f"packets since the table was last replaced: {counts}")
        by = ", ".join(f"{origin} {n}" for origin, n in dynamic["origins"].items() if n)
        click.echo(f"dynamic sources watched: {dynamic['watched']}" + (f" ({by})" if by else ""))
        now = time.time()
        for line in [
            *daemon_status.daemon_lines(daemon, running, now),
            *lines,
            *daemon_status.pending_line(pending, now),
            *(gitops.summary_lines(pulled) if pulled else []),
        ]:
            click.echo(line)
    if exit_code and not result.in_sync:
        sys.exit(EXIT_PENDING)


def _dynamic(ctx: Ctx) -> dict[str, Any]:
    """Dynamic sources watched now: the store's and the kernel's (tripwire entries live
    there until a pass harvests them)."""
    import time

    from reconciler.adapters import watchstore
    from reconciler.core import watch
    from reconciler.services import watching

    state = ctx.state()
    now = time.time()
    kernel = watching.kernel_entries(state, ctx.nft()) or {}
    stored = watchstore.load(watchstore.path_for(state.epoch_file))
    merged = watch.harvest(stored, kernel, now)
    return {"watched": len(merged), "in_kernel": len(kernel), "origins": watch.counts(merged, now)}


@cli.command(epilog=examples("mtd down -s /etc/mtd"))
@state_options
@host_option
@pass_ctx
@friendly
def down(ctx: Ctx) -> None:
    """Remove the owned table on purpose (services are back at their real ports for all), and
    put back the fwmark_reflect sysctls mtd changed."""
    from reconciler.services.reconcile import take_down

    state = ctx.state()
    ctx.need_nftables()  # before the audit log is made
    auditlog.check_writable(state.audit_log)  # removing the table is a change to record
    with files.reconcile_lock(state.epoch_file):
        changed, done = take_down(state, ctx.nft(state))
        if changed:
            auditlog.log_down(state, origin="manual", host=ctx.hostname)
    click.echo(f"{'changed' if changed else 'ok'}: {'; '.join(done)}")


@cli.command(
    "confirm",
    epilog=examples("mtd confirm -s /etc/mtd   # within 120 s of: mtd apply --confirm 120"),
)
@state_options
@host_option
@pass_ctx
@friendly
def confirm_cmd(ctx: Ctx) -> None:
    """Keep what a pending `mtd apply --confirm` changed: cancel its revert."""
    from reconciler.services import confirm

    state = ctx.state()
    with files.reconcile_lock(state.epoch_file):
        rec = confirm.confirm(state)
    if rec is None:
        last = confirm.last_revert(state, ctx.hostname)
        if last is not None:
            raise MtdError(
                f"nothing to confirm: the deadline passed and the table of before was put back "
                f"at {last['time']}: `mtd diff` shows the change again"
            )
        click.echo("ok: nothing to confirm: no mtd apply --confirm is pending")
        return
    left = max(0.0, float(rec["deadline"]) - time.time())
    click.echo(
        f"confirmed: table inet {rec['table']} as applied at {rec['armed']} stays; its revert "
        f"(due in {left:.0f} s) is cancelled"
    )
