"""The fleet commands: `mtd run` (the daemon), `mtd trigger` and `mtd rotate --publish`."""

from __future__ import annotations

import logging
import random
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from reconciler import defaults
from reconciler.cli.common import cli, friendly, host_option, pass_ctx
from reconciler.errors import MtdError

if TYPE_CHECKING:
    from reconciler.adapters import bus


def publish(ctx: Any) -> None:
    """One fleet rotation: increment the epoch in Redis and publish it (no root, no nft)."""
    from reconciler.adapters import bus

    config = bus.BusConfig.from_state(ctx.state())
    click.echo(_published(config, bus.publish_rotation(config)))


def _published(config: bus.BusConfig, p: bus.Published) -> str:
    return (
        f"published: epoch {p.epoch} on {config.channel} at {config.where} "
        f"({p.receivers} subscriber{'' if p.receivers == 1 else 's'})"
    )


def parse_every(text: str) -> tuple[float, float]:
    """`30..90` (random in between) or `60`."""
    lo, sep, hi = text.partition("..")
    try:
        low, high = float(lo), float(hi if sep else lo)
        if not 0 <= low <= high < float("inf"):
            raise ValueError
    except ValueError:
        raise MtdError(
            f"--every {text!r}: expected L..U seconds with 0 <= L <= U, such as 30..90"
        ) from None
    return low, high


def run_daemon(ctx: Any, opts: dict[str, Any]) -> None:
    from reconciler import logs
    from reconciler.services.daemon import Daemon, Options

    logs.setup(opts.pop("log_json"))
    metrics_addr = opts.pop("metrics")
    if opts["pull"]:  # the state comes from the clone under --state-dir
        nft = ctx.nft(cache_dir=Path(opts["state_dir"]) / defaults.CACHE)
    else:
        nft = ctx.nft(ctx.state())
    puller = _first_pull(ctx, nft, opts, logging.getLogger(f"{logs.LOGGER}.daemon"))
    daemon = Daemon(
        ctx.state,
        nft,
        templates=ctx.templates,
        host=ctx.hostname,
        options=Options(**opts),
        logger=logging.getLogger(f"{logs.LOGGER}.daemon"),
        puller=puller,
    )
    if metrics_addr:
        daemon.metrics.serve(metrics_addr)
    daemon.run()


def _first_pull(ctx: Any, nft: Any, opts: dict[str, Any], logger: logging.Logger) -> Any:
    """`--pull URL`: one round before the daemon loads its state, which is then the clone's
    (the commit applied last); a remote down at start is fine once a commit was applied."""

    from reconciler import logs
    from reconciler.services import gitops

    url = opts.pop("pull")
    config = {k: opts.pop(k) for k in ("branch", "path", "verify_signatures", "gpg_home")}
    state_dir, interval = Path(opts.pop("state_dir")), opts.pop("pull_interval")
    if url is None:
        return None
    puller = gitops.Puller(
        gitops.PullConfig(
            url=url,
            host=ctx.hostname,
            templates=tuple(ctx.user_templates),
            state_dir=state_dir,
            interval=interval,
            **config,
        )
    )
    outcome = puller.round(nft)
    level = logging.INFO if outcome.ok else logging.ERROR
    logs.event(logger, level, "pull", outcome.message, result=outcome.status, commit=outcome.commit)
    if puller.repo.head() is None:
        raise MtdError(f"--pull: no commit applied yet: {outcome.message}")
    ctx.state_path = str(puller.config.state_path)
    ctx.templates = puller.config.template_dirs()
    return puller


def trigger_loop(ctx: Any, every: str | None, count: int | None) -> None:
    if every is None:
        if count is not None:
            raise MtdError("--count: expected --every L..U too")
        publish(ctx)
        return
    from reconciler.adapters import bus

    low, high = parse_every(every)
    config = bus.BusConfig.from_state(ctx.state())
    client = bus.connect(config)
    draw = random.SystemRandom()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    done = failed = 0
    try:
        while count is None or done < count:
            time.sleep(draw.uniform(low, high))
            done += 1
            try:
                click.echo(_published(config, bus.publish_rotation(config, client)))
            except MtdError as exc:  # Redis down: say so, try again at the next interval
                failed += 1
                for line in exc.problems:
                    click.echo(f"mtd: error: {line}", err=True)
    except KeyboardInterrupt:
        return
    finally:
        client.close()
    if failed:
        raise MtdError(f"{failed} of {done} rotations could not be published")


def run(ctx: Any, **opts: Any) -> None:
    """Keep this host converged: at start, on every Redis trigger, on a drift timer.

    Follows the fleet's epoch in Redis (catching up after any outage), restores the
    owned table when someone changes it, reloads the desired state on SIGHUP and exits
    on SIGTERM/SIGINT leaving the table in place (unless --down-on-exit).
    """
    run_daemon(ctx, opts)


options = [
    click.option(
        "--drift-interval",
        type=click.FloatRange(min=0.05),
        help="Seconds between drift checks; default: the state's drift_interval (30).",
    ),
    click.option(
        "--reconnect-min",
        type=click.FloatRange(min=0.01),
        default=defaults.RECONNECT_MIN,
        show_default=True,
        help="First Redis reconnect delay, seconds (doubles up to --reconnect-max).",
    ),
    click.option(
        "--reconnect-max",
        type=click.FloatRange(min=0.01),
        default=defaults.RECONNECT_MAX,
        show_default=True,
        help="Longest Redis reconnect delay, seconds.",
    ),
    click.option(
        "--redis-check",
        type=click.FloatRange(min=0.05),
        default=defaults.REDIS_CHECK,
        show_default=True,
        help="Seconds between reads of the epoch key (catches lost triggers, dead links).",
    ),
    click.option(
        "--redis-timeout",
        type=click.FloatRange(min=0.05),
        default=defaults.REDIS_TIMEOUT,
        show_default=True,
        help="Redis connect and command timeout, seconds.",
    ),
    click.option("--log-json", is_flag=True, help="One JSON object per log line."),
    click.option(
        "--log-mapping",
        is_flag=True,
        help="Also log the mapping itself after each change (sensitive).",
    ),
    click.option(
        "--metrics",
        metavar="ADDR:PORT",
        help="Serve Prometheus metrics here, e.g. 127.0.0.1:9108.",
    ),
    click.option(
        "--rotate-without-diff",
        is_flag=True,
        help="Apply a new epoch without reading the live table first (states with very "
        "many mappings); drift checks still compare in full.",
    ),
    click.option(
        "--pull",
        metavar="URL",
        help="Also follow the desired state kept in this git repository (GitOps).",
    ),
    click.option(
        "--pull-interval",
        type=click.FloatRange(min=0.1),
        default=defaults.PULL_INTERVAL,
        show_default=True,
        help="Seconds between pulls (longer, with backoff, while the remote is down).",
    ),
    click.option("--branch", default=defaults.BRANCH, show_default=True, help="With --pull."),
    click.option("--path", default="", metavar="SUBDIR", help="With --pull: state dir."),
    click.option(
        "--state-dir",
        envvar="MTD_STATE_DIR",
        default=str(defaults.STATE_DIR),
        show_default=True,
        help="With --pull: where the clone (repo/) and pull.json are kept.",
    ),
    click.option("--verify-signatures", is_flag=True, help="With --pull: signed only."),
    click.option("--gpg-home", help="With --pull: GNUPGHOME of the allowed signers."),
    click.option(
        "--down-on-exit",
        is_flag=True,
        help="Remove the owned table when stopping (default: leave it in place).",
    ),
]
fn: Any = friendly(run)
fn = pass_ctx(fn)
fn = host_option(fn)
for option in reversed(options):
    fn = option(fn)
cli.command("run")(fn)


def trigger(ctx: Any, every: str | None, count: int | None) -> None:
    """Publish fleet rotations: once, or at random intervals of L to U seconds.

    Each one increments the fleet's epoch in Redis and publishes it (signed when
    redis.signing_key_file is set); every `mtd run` on the channel converges to it.
    """
    trigger_loop(ctx, every, count)


fn = host_option(pass_ctx(friendly(trigger)))
fn = click.option(
    "--count", type=click.IntRange(min=1), help="Stop after N rotations (with --every)."
)(fn)
fn = click.option(
    "--every", metavar="L..U", help="Publish after a random wait of L to U seconds, again."
)(fn)
cli.command("trigger")(fn)
