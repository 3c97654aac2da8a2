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
    state = ctx.state() if log_path is None or at else None
    path = log_path or state.audit_log  # type: ignore[union-attr]
    log = auditlog.entries(path)
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
    view = _mapping_then(state, entry, source, Path(ctx.state_dir), ctx)
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
