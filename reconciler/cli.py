"""Command line: parses options, calls the core and the shell, prints results.

Every error the user can fix arrives here as an `MtdError` and is printed once, as one line
per problem, with exit code 1. `mtd diff` exits 2 when changes are pending.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
import yaml

from reconciler import diff, localfiles, render, shuffle
from reconciler.errors import MtdError
from reconciler.state import State, schema

EXIT_ERROR = 1
EXIT_PENDING = 2


class Ctx:
    """Options shared by every command."""

    def __init__(self, state_path: str, templates: tuple[str, ...], debug: bool) -> None:
        self.state_path = state_path
        # User directories come first, so a custom template can add to or shadow a shipped one.
        self.templates = [Path(t) for t in templates] + render.template_dirs()
        self.debug = debug

    def state(self) -> State:
        return localfiles.load_state(self.state_path)

    def nft(self) -> Any:
        from reconciler.nft import Nft  # imported late: validate/render need no libnftables

        return Nft()


pass_ctx = click.make_pass_decorator(Ctx)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print an `MtdError` as its lines and exit 1; anything else as one line too."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MtdError as exc:
            for line in exc.problems:
                click.echo(f"mtd: error: {line}", err=True)
            sys.exit(EXIT_ERROR)
        except PermissionError as exc:
            click.echo(
                f"mtd: error: {exc.filename or ''}: permission denied (run as root)", err=True
            )
            sys.exit(EXIT_ERROR)
        except Exception as exc:
            ctx = click.get_current_context(silent=True)
            if ctx and ctx.find_object(Ctx) and ctx.find_object(Ctx).debug:
                raise
            click.echo(
                f"mtd: internal error: {type(exc).__name__}: {exc} (--debug shows more)", err=True
            )
            sys.exit(EXIT_ERROR)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-s",
    "--state",
    "state_path",
    envvar="MTD_STATE",
    default="desired_state",
    show_default=True,
    help="Desired state: a YAML file or a directory of them.",
)
@click.option(
    "--templates",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Template directory (repeatable); default: the shipped templates.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.version_option(package_name="mtd")
@click.pass_context
def cli(ctx: click.Context, state_path: str, templates: tuple[str, ...], debug: bool) -> None:
    """mtd: hide this host's services from untrusted sources on shifting ports."""
    ctx.obj = Ctx(state_path, templates, debug)


@cli.command()
@pass_ctx
@friendly
def validate(ctx: Ctx) -> None:
    """Check the desired state (schema and meaning) and that it renders."""
    state = ctx.state()
    render.render(state, shuffle.compute(state, b"\0" * 32, 0), ctx.templates)
    click.echo(
        f"ok: {ctx.state_path}: {len(state.watched)} watched sources, template {state.template}"
    )


@cli.command("render")
@click.option("--epoch", type=int, help="Render this epoch instead of the current one.")
@pass_ctx
@friendly
def render_cmd(ctx: Ctx, epoch: int | None) -> None:
    """Print the nftables JSON document (contains the mapping: treat as secret)."""
    state = ctx.state()
    secret = localfiles.load_or_create_secret(state.secret_file)
    epoch = localfiles.read_epoch(state.epoch_file) if epoch is None else epoch
    commands = render.render(state, shuffle.compute(state, secret, epoch), ctx.templates)
    click.echo(json.dumps({"nftables": commands}, indent=1))


def _pass(ctx: Ctx, *, check: bool, epoch: int | None = None, advance: bool = False) -> Any:
    from reconciler.reconcile import reconcile

    state = ctx.state()
    with localfiles.reconcile_lock(state.epoch_file):
        current = localfiles.read_epoch(state.epoch_file)
        if advance:
            current += 1
            if not check:
                localfiles.write_epoch(state.epoch_file, current)
        return reconcile(
            state,
            current if epoch is None else epoch,
            ctx.nft(),
            check=check,
            templates=ctx.templates,
        )


@cli.command("diff")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--stat", is_flag=True, help="Counts only.")
@click.option("--epoch", type=int, help="Compare against this epoch instead of the current one.")
@pass_ctx
@friendly
def diff_cmd(ctx: Ctx, as_json: bool, stat: bool, epoch: int | None) -> None:
    """Preview: what `mtd apply` would change. Exit 0 in sync, 2 pending, 1 error."""
    result = _pass(ctx, check=True, epoch=epoch)
    if as_json:
        out = result.as_dict() | {"changes": [c.as_dict() for c in result.changes]}
        click.echo(json.dumps(out, indent=1))
    else:
        click.echo(f"--- live    table inet {result.table}")
        click.echo(f"+++ desired table inet {result.table} (epoch {result.epoch})")
        if stat or not result.changes:
            click.echo(result.line())
        else:
            for c in result.changes:
                click.echo(f"{c.op} {c.text}")
    sys.exit(EXIT_PENDING if result.changes else 0)


def _report(result: Any, show_diff: bool) -> None:
    if show_diff:
        for c in result.changes:
            click.echo(f"{c.op} {c.text}")
    click.echo(result.line())


@cli.command()
@click.option("--check", is_flag=True, help="Report what would change; change nothing.")
@click.option("--diff", "show_diff", is_flag=True, help="Also print the changes.")
@pass_ctx
@friendly
def apply(ctx: Ctx, check: bool, show_diff: bool) -> None:
    """Make the live table match the desired state at the current epoch."""
    _report(_pass(ctx, check=check), show_diff)


@cli.command()
@click.option("--check", is_flag=True, help="Report what would change; change nothing.")
@click.option("--diff", "show_diff", is_flag=True, help="Also print the changes.")
@pass_ctx
@friendly
def rotate(ctx: Ctx, check: bool, show_diff: bool) -> None:
    """Start a new epoch on this host (a reshuffle) and reconcile."""
    _report(_pass(ctx, check=check, advance=True), show_diff)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
@friendly
def status(ctx: Ctx, as_json: bool) -> None:
    """Epoch, table and whether the live table matches the desired state."""
    result = _pass(ctx, check=True)
    out = {
        "epoch": result.epoch,
        "table": result.table,
        "in_sync": result.in_sync,
        "summary": diff.summary(result.changes),
        "fingerprint": result.fingerprint,
    }
    if as_json:
        click.echo(json.dumps(out))
    else:
        state = "in sync" if result.in_sync else "out of sync"
        click.echo(f"table inet {result.table}: epoch {result.epoch}, {state}")


@cli.command()
@pass_ctx
@friendly
def down(ctx: Ctx) -> None:
    """Remove the owned table on purpose (services are back at their real ports for all)."""
    state = ctx.state()
    with localfiles.reconcile_lock(state.epoch_file):
        removed = ctx.nft().delete_table(state.table)
    click.echo(
        f"{'changed' if removed else 'ok'}: table inet {state.table} "
        f"{'removed' if removed else 'absent'}"
    )


@cli.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of the desired state."""
    click.echo(json.dumps(schema(), indent=2))


@cli.command("import-seed")
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


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `mtd diff | head` is not an error
    cli(prog_name="mtd")
