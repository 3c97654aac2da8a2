"""`mtd pull`: converge to the desired state kept in a git repository."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any

import click

from reconciler import defaults
from reconciler.adapters.git import redact
from reconciler.cli.common import (
    EXIT_AUDIT_FAILED,
    EXIT_ERROR,
    Ctx,
    cli,
    examples,
    friendly,
    host_option,
    pass_ctx,
    template_options,
)
from reconciler.errors import MtdError

_PULL_OPTIONS = [
    click.option(
        "--branch", default=defaults.BRANCH, show_default=True, help="The branch to follow."
    ),
    click.option(
        "--path", "subdir", default="", metavar="SUBDIR", help="State directory in the repository."
    ),
    click.option(
        "--verify-signatures",
        is_flag=True,
        help="Apply only commits whose signature `git verify-commit` accepts.",
    ),
    click.option(
        "--gpg-home",
        type=click.Path(file_okay=False),
        help="GNUPGHOME whose keyring holds the keys allowed to sign (--verify-signatures).",
    ),
    click.option(
        "--git-timeout",
        type=click.FloatRange(min=1),
        default=defaults.GIT_TIMEOUT,
        show_default=True,
        help="Seconds allowed to each git command.",
    ),
]


@dataclass(frozen=True)
class PullOptions:
    """The options of `pull_options`, as one value."""

    branch: str
    subdir: str
    verify_signatures: bool
    gpg_home: str | None
    git_timeout: float

    def config(
        self,
        ctx: Ctx,
        url: str,
        interval: float,
        *,
        session_check: bool = False,
        force: bool = False,
        write: bool = True,
    ) -> Any:
        """The `gitops.PullConfig` of a round for this host; `session_check` only for a
        `mtd pull` run by hand (docs/operations.md, "No lockouts")."""
        from reconciler.services import gitops

        return gitops.PullConfig(
            url=url,
            branch=self.branch,
            path=self.subdir,
            state_dir=Path(ctx.state_dir),
            host=ctx.hostname,
            templates=tuple(ctx.user_templates),
            verify_signatures=self.verify_signatures,
            gpg_home=self.gpg_home,
            interval=interval,
            timeout=self.git_timeout,
            config=tuple(ctx.local().documents),
            session_check=session_check,
            force=force,
            caches=ctx.caches(write=write),
        )


def pull_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Which repository state to follow and how it is trusted: one declaration for `mtd pull`
    and `mtd run --pull`, handed to the command as one `pull: PullOptions` argument."""

    @wraps(fn)
    def command(
        *args: Any,
        branch: str,
        subdir: str,
        verify_signatures: bool,
        gpg_home: str | None,
        git_timeout: float,
        **kwargs: Any,
    ) -> Any:
        options = PullOptions(branch, subdir, verify_signatures, gpg_home, git_timeout)
        return fn(*args, pull=options, **kwargs)

    for option in reversed(_PULL_OPTIONS):
        command = option(command)
    return command


@cli.command(
    epilog=examples(
        "mtd pull --repo https://git.example/ops/mtd-state.git --path mtd --once",
        "mtd pull --repo /srv/git/mtd-state.git --check --host web1",
    )
)
@click.option("--repo", "url", metavar="URL", help="The state repository (all but --notify).")
@pull_options
@click.option("--once", is_flag=True, help="One round, then exit (1: rejected or unreachable).")
@click.option("--check", is_flag=True, help="One round that only shows what would change.")
@click.option(
    "--show-mapping",
    is_flag=True,
    help="With --once or --check: print the mapped ports of map element changes (secret).",
)
@click.option(
    "--notify",
    is_flag=True,
    help="Only tell every `mtd run --pull` to fetch now, through Redis (from CI, after a merge).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=defaults.PULL_INTERVAL,
    show_default=True,
    help="Seconds between rounds (longer, with backoff, while the remote is unreachable).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Apply even a commit that moves the port of the SSH session this runs in "
    "(docs/operations.md: No lockouts); the audit line says so.",
)
@template_options
@host_option
@pass_ctx
@friendly
def pull(
    ctx: Ctx,
    url: str,
    once: bool,
    check: bool,
    show_mapping: bool,
    notify: bool,
    interval: float,
    force: bool,
    pull: PullOptions,
) -> None:
    """Converge to the desired state kept in a git repository (GitOps).

    Each round fetches the branch; a new commit is validated for this host, its changes are
    shown and it is applied, then recorded. A commit that fails is never applied: the host
    keeps the last good state until the next commit.
    """
    if notify:
        from reconciler.cli.fleet_status import notify_pull

        notify_pull(ctx)
        return
    if not url:
        raise MtdError("--repo: expected the state repository's URL (or --notify)")
    from reconciler.services import gitops

    cfg = pull.config(ctx, url, interval, session_check=True, force=force, write=not check)
    puller = gitops.Puller(cfg)
    puller.show_mapping = show_mapping
    nft = ctx.nft(write=not check)
    if once or check:
        outcome = puller.round(nft, check=check, show=click.echo)
        _pull_report(outcome, again=True)
        sys.exit(EXIT_AUDIT_FAILED if outcome.audit_error else 0 if outcome.ok else EXIT_ERROR)
    cfg = puller.config
    click.echo(
        f"mtd pull: following {redact(cfg.url)} branch {cfg.branch}"
        f"{f' path {cfg.path}' if cfg.path else ''} every {interval:g} s "
        f"(clone and pull.json in {cfg.state_dir})"
    )
    try:
        while True:
            try:  # the changes hold the mapping: not for a long-running log
                outcome = puller.round(nft)
                _pull_report(outcome, again=False, retry_in=puller.next_delay())
            except MtdError as exc:
                for line in exc.problems:
                    click.echo(f"mtd: error: {line}", err=True)
            time.sleep(puller.next_delay())
    except KeyboardInterrupt:
        return


def _pull_report(outcome: Any, again: bool, retry_in: float | None = None) -> None:
    """Applied commits always; problems once (or every time with `again`). `retry_in`: when
    the loop tries again after an unreachable remote (a one-round command never does)."""
    if outcome.ok:
        if outcome.new or again:
            click.echo(outcome.message.split("; applied, audit failed: ")[0])
            if outcome.audit_error:
                click.echo(f"mtd: error: {outcome.audit_error}", err=True)
    elif outcome.new or again:
        lines = outcome.problems or [outcome.message]
        if outcome.status == "unreachable" and retry_in is not None:
            lines = [*lines[:-1], f"{lines[-1]}: next try in {retry_in:.0f} s"]
        for line in lines:
            click.echo(f"mtd: error: {line}", err=True)
