"""Command line: parses options, calls the core and the shell, prints results.

Every error the user can fix arrives here as an `MtdError` and is printed once, as one line
per problem, with exit code 1. `mtd diff` exits 2 when changes are pending.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
import yaml

from reconciler import audit, diff, localfiles, render, shuffle
from reconciler.errors import MtdError
from reconciler.state import State, schema

EXIT_ERROR = 1
EXIT_PENDING = 2


class Ctx:
    """Options shared by every command."""

    def __init__(self, state_path: str, templates: tuple[str, ...], debug: bool) -> None:
        self.state_path = state_path
        # User directories come first, so a custom template can add to or shadow a shipped one;
        # then a templates/ directory kept with the state files (in the state repository).
        self.user_templates = [Path(t) for t in templates]
        self.templates = (
            self.user_templates + localfiles.state_templates(state_path) + render.template_dirs()
        )
        self.debug = debug
        self.host: str | None = None  # --host: which host of an inventory; None: this machine

    @property
    def hostname(self) -> str:
        return self.host or socket.gethostname()

    def state(self) -> State:
        return localfiles.load_state(self.state_path, self.hostname)

    def nft(self) -> Any:
        from reconciler.nft import Nft  # imported late: validate/render need no libnftables

        return Nft()


pass_ctx = click.make_pass_decorator(Ctx)


def host_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--host NAME`: the host of an inventory (groups/, hosts/) a command is about."""

    def remember(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(Ctx).host = value

    return click.option(
        "--host",
        metavar="NAME",
        expose_value=False,
        callback=remember,
        help="Host of an inventory state (groups/, hosts/); default: this machine's name.",
    )(fn)


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
@host_option
@pass_ctx
@friendly
def validate(ctx: Ctx) -> None:
    """Check the desired state (schema and meaning) and that it renders.

    An inventory is checked for every host it names (or only --host), each error line
    prefixed with the host.
    """
    hosts = localfiles.inventory_hosts(ctx.state_path)
    if hosts is not None:
        _validate_inventory(ctx, [ctx.host] if ctx.host else hosts)
        return
    state = ctx.state()
    render.render(state, shuffle.compute(state, b"\0" * 32, 0), ctx.templates)
    click.echo(
        f"ok: {ctx.state_path}: {len(state.watched)} watched sources, template {state.template}"
    )


def _validate_inventory(ctx: Ctx, hosts: list[str]) -> None:
    if not hosts:
        raise MtdError(f"{ctx.state_path}: the inventory names no host: expected hosts/NAME.yaml")
    problems = []
    for host in hosts:
        try:
            state = localfiles.load_state(ctx.state_path, host)
            render.render(state, shuffle.compute(state, b"\0" * 32, 0), ctx.templates)
        except MtdError as exc:
            problems += [f"{host}: {line}" for line in exc.problems]
            continue
        click.echo(f"ok: {host}: {len(state.watched)} watched sources, template {state.template}")
    if problems:
        raise MtdError(*problems)


@cli.command("render")
@click.option("--epoch", type=int, help="Render this epoch instead of the current one.")
@host_option
@pass_ctx
@friendly
def render_cmd(ctx: Ctx, epoch: int | None) -> None:
    """Print the nftables JSON document (contains the mapping: treat as secret)."""
    state = ctx.state()
    secret = localfiles.load_or_create_secret(state.secret_file)
    epoch = localfiles.read_epoch(state.epoch_file) if epoch is None else epoch
    commands = render.render(state, shuffle.compute(state, secret, epoch), ctx.templates)
    click.echo(json.dumps({"nftables": commands}, indent=1, default=list))  # element lists


def _pass(
    ctx: Ctx,
    *,
    check: bool,
    epoch: int | None = None,
    advance: bool = False,
    read_live: bool = True,
) -> Any:
    from reconciler.reconcile import reconcile

    state = ctx.state()
    with localfiles.reconcile_lock(state.epoch_file):
        current = localfiles.read_epoch(state.epoch_file)
        if advance:
            current += 1
            if not check:
                localfiles.write_epoch(state.epoch_file, current)
        result = reconcile(
            state,
            current if epoch is None else epoch,
            ctx.nft(),
            check=check,
            templates=ctx.templates,
            read_live=read_live,
        )
        if result.status == "changed":
            audit.log_result(state, result, origin="manual", host=ctx.hostname)
        return result


@cli.command("diff")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--stat", is_flag=True, help="Counts only.")
@click.option("--epoch", type=int, help="Compare against this epoch instead of the current one.")
@host_option
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
@host_option
@pass_ctx
@friendly
def apply(ctx: Ctx, check: bool, show_diff: bool) -> None:
    """Make the live table match the desired state at the current epoch."""
    _report(_pass(ctx, check=check), show_diff)


@cli.command()
@click.option("--check", is_flag=True, help="Report what would change; change nothing.")
@click.option("--diff", "show_diff", is_flag=True, help="Also print the changes.")
@click.option(
    "--publish",
    is_flag=True,
    help="Rotate the fleet instead: increment the epoch in Redis and publish it "
    "(every `mtd run` applies it; needs no root).",
)
@host_option
@pass_ctx
@friendly
def rotate(ctx: Ctx, check: bool, show_diff: bool, publish: bool) -> None:
    """Start a new epoch on this host (a reshuffle) and reconcile."""
    if publish:
        if check or show_diff:
            raise MtdError("--publish: expected no --check or --diff (the daemons apply it)")
        from reconciler import cli_daemon

        cli_daemon.publish(ctx)
        return
    # A new epoch moves every port: the table is replaced without reading it back first
    # (a minute at a million mappings) unless the changes are to be shown.
    _report(_pass(ctx, check=check, advance=True, read_live=check or show_diff), show_diff)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--state-dir",
    envvar="MTD_STATE_DIR",
    default="/var/lib/mtd",
    show_default=True,
    help="Where `mtd pull` keeps its clone and pull.json (shown when present).",
)
@host_option
@pass_ctx
@friendly
def status(ctx: Ctx, as_json: bool, state_dir: str) -> None:
    """Epoch, table, whether the live table matches the desired state, and the last pull."""
    from reconciler import gitops

    pulled = gitops.read_record(Path(state_dir) / "pull.json")
    result = _pass(ctx, check=True)
    out = {
        "epoch": result.epoch,
        "table": result.table,
        "in_sync": result.in_sync,
        "summary": diff.summary(result.changes),
        "fingerprint": result.fingerprint,
    }
    if pulled:
        out["pull"] = gitops.summary(pulled)
    if as_json:
        click.echo(json.dumps(out))
    else:
        state = "in sync" if result.in_sync else "out of sync"
        click.echo(f"table inet {result.table}: epoch {result.epoch}, {state}")
        for line in gitops.summary_lines(pulled) if pulled else []:
            click.echo(line)


@cli.command()
@host_option
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


STATE_DIR_OPTION = click.option(
    "--state-dir",
    envvar="MTD_STATE_DIR",
    default="/var/lib/mtd",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the pull keeps its clone (repo/) and pull.json.",
)


@cli.command()
@click.option("--repo", "url", required=True, metavar="URL", help="The state repository.")
@click.option("--branch", default="main", show_default=True, help="The branch to follow.")
@click.option("--path", "subdir", default="", metavar="SUBDIR", help="State directory in it.")
@STATE_DIR_OPTION
@click.option("--once", is_flag=True, help="One round, then exit (1: rejected or unreachable).")
@click.option("--check", is_flag=True, help="One round that only shows what would change.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds between rounds (longer, with backoff, while the remote is unreachable).",
)
@click.option(
    "--verify-signatures",
    is_flag=True,
    help="Apply only commits whose signature `git verify-commit` accepts.",
)
@click.option(
    "--gpg-home",
    type=click.Path(file_okay=False),
    help="GNUPGHOME whose keyring holds the keys allowed to sign (--verify-signatures).",
)
@click.option(
    "--git-timeout",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="Seconds allowed to each git command.",
)
@host_option
@pass_ctx
@friendly
def pull(
    ctx: Ctx,
    url: str,
    branch: str,
    subdir: str,
    state_dir: str,
    once: bool,
    check: bool,
    interval: float,
    verify_signatures: bool,
    gpg_home: str | None,
    git_timeout: float,
) -> None:
    """Converge to the desired state kept in a git repository (GitOps).

    Each round fetches the branch; a new commit is validated for this host, its changes are
    shown and it is applied, then recorded. A commit that fails is never applied: the host
    keeps the last good state until the next commit.
    """
    from reconciler import gitops

    puller = gitops.Puller(
        gitops.PullConfig(
            url=url,
            branch=branch,
            path=subdir,
            state_dir=Path(state_dir),
            host=ctx.hostname,
            templates=tuple(ctx.user_templates),
            verify_signatures=verify_signatures,
            gpg_home=gpg_home,
            interval=interval,
            timeout=git_timeout,
        )
    )
    nft = ctx.nft()
    if once or check:
        outcome = puller.round(nft, check=check, show=click.echo)
        _pull_report(outcome, again=True)
        sys.exit(0 if outcome.ok else EXIT_ERROR)
    try:
        while True:
            try:  # the changes hold the mapping: not for a long-running log
                _pull_report(puller.round(nft), again=False)
            except MtdError as exc:
                for line in exc.problems:
                    click.echo(f"mtd: error: {line}", err=True)
            time.sleep(puller.next_delay())
    except KeyboardInterrupt:
        return


def _pull_report(outcome: Any, again: bool) -> None:
    """Applied commits always; problems once (or every time with `again`)."""
    if outcome.ok:
        if outcome.new or again:
            click.echo(outcome.message)
    elif outcome.new or again:
        for line in outcome.problems or [outcome.message]:
            click.echo(f"mtd: error: {line}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="The raw JSON lines.")
@click.option(
    "--log",
    "log_path",
    type=click.Path(dir_okay=False),
    help="Audit log; default: the state's audit_log.",
)
@click.option(
    "--mapping-at",
    "at",
    metavar="TIME",
    help="Recompute the mapping live at TIME (2024-05-01T12:00:00Z): needs the secret.",
)
@click.option("--source", metavar="ADDR", help="With --mapping-at: whose mapping to print.")
@STATE_DIR_OPTION
@host_option
@pass_ctx
@friendly
def history(
    ctx: Ctx,
    as_json: bool,
    log_path: str | None,
    at: str | None,
    source: str | None,
    state_dir: str,
) -> None:
    """Every applied change: time, host, origin, commit, epoch, result, keyed fingerprint.

    With --mapping-at and --source, print the ports that source saw at that time (this is
    the mapping itself: treat the output as secret). The desired state of that time is taken
    from the pull clone when the change came from a commit, else the current one; the
    recorded fingerprint confirms it is the right one.
    """
    state = ctx.state() if log_path is None or at else None
    path = log_path or state.audit_log  # type: ignore[union-attr]
    log = audit.entries(path)
    if not at:
        for entry in log:
            click.echo(json.dumps(entry) if as_json else audit.line(entry))
        return
    if not source:
        raise MtdError("--mapping-at: expected --source ADDR too")
    when = audit.parse_time(at)
    entry = audit.live_at(log, when, ctx.host)
    if entry is None:
        raise MtdError(f"{path}: no applied change at or before {at}: mtd was not live then")
    assert state is not None
    view = _mapping_then(state, entry, source, Path(state_dir))
    origin = f"{entry.get('origin')}" + (
        f" of commit {entry['commit'][:12]}" if entry.get("commit") else ""
    )
    click.echo(
        f"{source} at {audit.timestamp(when)}: epoch {entry['epoch']}, applied "
        f"{entry['time']} by {origin} (fingerprint {entry['fingerprint']} verified)"
    )
    if view.watched is None:
        click.echo(f"{source}: not watched: it saw the real ports")
        return
    click.echo(f"{source}: watched as {view.watched.label}")
    for proto, moves in view.moves.items():
        for real, hidden in sorted(moves.items()):
            click.echo(f"{proto} {real} -> {hidden}")


def _mapping_then(state: State, entry: Any, source: str, state_dir: Path) -> Any:
    """The source's view, from the state whose fingerprint matches the recorded one."""
    from reconciler import gitops

    states = []
    pulled = gitops.read_record(state_dir / "pull.json")
    if entry.get("commit") and pulled:
        remote = pulled.get("remote") or {}
        puller = gitops.Puller(
            gitops.PullConfig(
                url=remote.get("url", ""),
                path=remote.get("path", ""),
                state_dir=state_dir,
                host=entry.get("host") or socket.gethostname(),
            )
        )
        if puller.repo.is_commit(entry["commit"]):
            with contextlib.suppress(MtdError):  # then the current state, if it matches
                states.append(puller.state_at(entry["commit"]))
    states.append(state)
    for candidate in states:
        secret_file = Path(candidate.secret_file)
        if not secret_file.exists():
            continue
        secret = localfiles.load_or_create_secret(secret_file)
        view = audit.mapping_of(candidate, secret, entry["epoch"], source)
        if view.fingerprint == entry.get("fingerprint"):
            return view
    raise MtdError(
        f"{entry['time']}: the recorded fingerprint {entry.get('fingerprint')} does not match "
        "the desired state and secret at hand: expected the state and secret of that time "
        "(a pulled commit is read from --state-dir)"
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


def _register_fleet_commands() -> None:
    """`mtd run` and `mtd trigger` live in cli_daemon, next to the daemon."""
    from reconciler import cli_daemon

    cli_daemon.register(cli)


_register_fleet_commands()


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `mtd diff | head` is not an error
    cli(prog_name="mtd")
