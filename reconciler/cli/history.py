"""`mtd history`: the audit log, and the mapping a source saw at a given time."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Any

import click

from reconciler.adapters import auditlog, files
from reconciler.cli.common import (
    Ctx,
    cli,
    examples,
    friendly,
    host_option,
    pass_ctx,
    state_options,
)
from reconciler.core import audit
from reconciler.core.state import State
from reconciler.errors import MtdError


@cli.command(
    epilog=examples(
        "mtd history -s /etc/mtd",
        "mtd history -s /etc/mtd --mapping-at 2024-05-01T12:00:00Z --source 192.0.2.3",
    )
)
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
@state_options
@host_option
@pass_ctx
@friendly
def history(
    ctx: Ctx,
    as_json: bool,
    log_path: str | None,
    at: str | None,
    source: str | None,
) -> None:
    """Every applied change: time, host, origin, commit, epoch, result, keyed fingerprint.

    With --mapping-at and --source, print the ports that source saw at that time (this is
    the mapping itself: treat the output as secret). The desired state of that time is taken
    from the pull clone when the change came from a commit, else the current one; the
    recorded fingerprint confirms it is the right one.
    """
    if at and not source:
        raise MtdError("--mapping-at: expected --source ADDR too")
    state = ctx.state() if log_path is None or at else None
    path = log_path or state.audit_log  # type: ignore[union-attr]
    if not Path(path).exists():
        if log_path is not None:  # named on purpose: a typo must not read as "no history"
            raise MtdError(f"--log {log_path}: no such audit log")
        if not at:
            click.echo(f"mtd: {path}: no audit log yet: nothing applied on this host", err=True)
            return
    log = auditlog.entries(path)
    if not at:
        if as_json:
            for entry in log:
                click.echo(json.dumps(entry))
        else:
            for line in audit.table(log):
                click.echo(line)
        return
    assert source is not None
    when = audit.parse_time(at)
    entry = audit.live_at(log, when, ctx.host)
    if entry is None:
        raise MtdError(f"{path}: no applied change at or before {at}: mtd was not live then")
    later = audit.next_within(log, when, 1.0, ctx.host) if _whole_second(at) else None
    if later is not None:
        click.echo(
            f"mtd: note: a change was applied at {later['time']}, within the second after "
            f"{at}: give the time to the microsecond to pick it",
            err=True,
        )
    origin = f"{entry.get('origin')}" + (
        f" of commit {entry['commit'][:12]}" if entry.get("commit") else ""
    )
    if entry.get("result") == audit.DOWN:
        click.echo(
            f"{source} at {audit.timestamp(when)}: table inet {entry.get('table', '?')} was "
            f"down (removed {entry['time']} by {origin}): every source saw the real ports"
        )
        return
    assert state is not None
    view = _mapping_then(state, entry, source, Path(ctx.state_dir), ctx)
    click.echo(
        f"{source} at {audit.timestamp(when)}: epoch {entry['epoch']}, applied "
        f"{entry['time']} by {origin} (fingerprint {entry['fingerprint']} verified)"
    )
    if view.watched is None:
        why = "trusted" if view.trusted else "not watched"
        click.echo(f"{source}: {why}: it saw the real ports")
        return
    bucket = f", bucket {view.bucket}" if view.bucket is not None else ""
    click.echo(f"{source}: watched as {view.watched.label}{bucket}")
    for proto, moves in view.moves.items():
        for real, hidden in sorted(moves.items()):
            click.echo(f"{proto} {real} -> {hidden}")


def _whole_second(text: str) -> bool:
    """A time without a fraction of a second (`12:00:00Z`, `@1714564800`)."""
    return "." not in text


def _mapping_then(state: State, entry: Any, source: str, state_dir: Path, ctx: Ctx) -> Any:
    """The source's view, from the state whose fingerprint matches the recorded one."""
    from reconciler.services import gitops

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
                config=tuple(ctx.local().documents),
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
        secret = files.load_secret(secret_file)
        view = audit.mapping_of(candidate, secret, entry["epoch"], source)
        if view.fingerprint == entry.get("fingerprint"):
            return view
    raise MtdError(
        f"{entry['time']}: the recorded fingerprint {entry.get('fingerprint')} does not match "
        "the desired state and secret at hand: expected the state and secret of that time "
        "(a pulled commit is read from --state-dir)"
    )
