"""The fleet commands: `mtd run` (the daemon), `mtd trigger` and `mtd rotate --publish`."""

from __future__ import annotations

import logging
import random
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from reconciler import defaults
from reconciler.cli.common import Ctx, cli, examples, friendly, host_option, pass_ctx, state_options
from reconciler.cli.pull import PullOptions, pull_options
from reconciler.errors import MtdError

if TYPE_CHECKING:
    from reconciler.adapters import bus


def publish(ctx: Any) -> None:
    """One fleet rotation: increment the epoch in Redis and publish it (no root, no nft)."""
    from reconciler.adapters import bus

    config = bus.BusConfig.from_state(ctx.state())
    click.echo(_published(config, bus.publish_rotation(config)))


def _published(config: bus.BusConfig, p: bus.Published) -> str:
    replicas = ""
    if p.replicas is not None:
        replicas = f", {p.replicas} replica{'' if p.replicas == 1 else 's'}"
    return (
        f"published: epoch {p.epoch} on {config.channel} at {config.where} "
        f"({p.receivers} subscriber{'' if p.receivers == 1 else 's'}{replicas})"
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


def _first_pull(ctx: Ctx, nft: Any, config: Any, logger: logging.Logger) -> Any:
    """`--pull URL`: one round before the daemon loads its state, which is then the clone's
    (the commit applied last); a remote down at start is fine once a commit was applied."""
    from reconciler import logs
    from reconciler.services import gitops

    puller = gitops.Puller(config)
    outcome = puller.round(nft)
    level = logging.INFO if outcome.ok and not outcome.audit_error else logging.ERROR
    logs.event(logger, level, "pull", outcome.message, result=outcome.status, commit=outcome.commit)
    if puller.repo.head() is None:
        raise MtdError(f"--pull: no commit applied yet: {outcome.message}")
    ctx.state_path = str(puller.config.state_path)
    ctx.untrusted = True  # the clone holds what commits wrote: no host-local key there
    ctx.templates = puller.config.template_dirs()
    return puller


def trigger_loop(ctx: Any, every: str | None, count: int | None) -> None:
    from reconciler.adapters import bus

    if every is None and count is None:
        publish(ctx)
        return
    low, high = parse_every(every) if every is not None else (0.0, 0.0)
    config = bus.BusConfig.from_state(ctx.state())
    client = bus.connect(config)
    draw = random.SystemRandom()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    done = failed = 0
    try:
        while count is None or done < count:
            if high > 0:
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


@cli.command(
    "run",
    epilog=examples(
        "mtd run -s /etc/mtd --metrics 127.0.0.1:9108 --log-json",
        "mtd run --pull https://git.example/ops/mtd-state.git --path mtd",
    ),
)
@click.option(
    "--drift-interval",
    type=click.FloatRange(min=0.05),
    help="Seconds between full drift compares (a backstop to the change events); "
    "default: the state's drift_interval (3600).",
)
@click.option(
    "--reconnect-min",
    type=click.FloatRange(min=0.01),
    default=defaults.RECONNECT_MIN,
    show_default=True,
    help="First Redis reconnect delay, seconds (doubles up to --reconnect-max).",
)
@click.option(
    "--reconnect-max",
    type=click.FloatRange(min=0.01),
    default=defaults.RECONNECT_MAX,
    show_default=True,
    help="Longest Redis reconnect delay, seconds.",
)
@click.option(
    "--redis-check",
    type=click.FloatRange(min=0.05),
    default=defaults.REDIS_CHECK,
    show_default=True,
    help="Seconds between reads of the epoch key (catches lost triggers, dead links).",
)
@click.option(
    "--redis-timeout",
    type=click.FloatRange(min=0.05),
    default=defaults.REDIS_TIMEOUT,
    show_default=True,
    help="Redis connect and command timeout, seconds.",
)
@click.option("--log-json", is_flag=True, help="One JSON object per log line.")
@click.option(
    "--log-mapping", is_flag=True, help="Also log the mapping itself after each change (sensitive)."
)
@click.option(
    "--metrics", metavar="ADDR:PORT", help="Serve Prometheus metrics here, e.g. 127.0.0.1:9108."
)
@click.option(
    "--full-compare",
    is_flag=True,
    help="Read and diff the live table on every pass (by default a pass trusts the "
    "kernel's change events and replaces the table unread; the drift timer compares).",
)
@click.option(
    "--down-on-exit",
    is_flag=True,
    help="Remove the owned table when stopping (default: leave it in place).",
)
@click.option(
    "--pull",
    "pull_url",
    metavar="URL",
    help="Also follow the desired state kept in this git repository (GitOps); the options "
    "below as in `mtd pull`.",
)
@click.option(
    "--pull-interval",
    type=click.FloatRange(min=0.1),
    default=defaults.PULL_INTERVAL,
    show_default=True,
    help="Seconds between pulls (longer, with backoff, while the remote is down).",
)
@pull_options
@state_options
@host_option
@pass_ctx
@friendly
def run(
    ctx: Ctx,
    drift_interval: float | None,
    reconnect_min: float,
    reconnect_max: float,
    redis_check: float,
    redis_timeout: float,
    log_json: bool,
    log_mapping: bool,
    metrics: str | None,
    full_compare: bool,
    down_on_exit: bool,
    pull_url: str | None,
    pull_interval: float,
    pull: PullOptions,
) -> None:
    """Keep this host converged: at start, on every Redis trigger, on a drift timer.

    Follows the fleet's epoch in Redis (catching up after any outage), restores the
    owned table when someone changes it, reloads the desired state on SIGHUP and exits
    on SIGTERM/SIGINT leaving the table in place (unless --down-on-exit).
    """
    import dataclasses
    import os

    from reconciler import logs
    from reconciler.adapters.monitor import Monitor
    from reconciler.core import caches
    from reconciler.services.daemon import Daemon, Options

    logs.setup(log_json)
    logger = logging.getLogger(f"{logs.LOGGER}.daemon")
    # With --pull the state comes from the clone under --state-dir, once a round ran.
    nft = ctx.nft(None if pull_url is not None else ctx.state(), one_shot=False)
    puller = None
    if pull_url is not None:
        puller = _first_pull(ctx, nft, pull.config(ctx, pull_url, pull_interval), logger)
    kept = ctx.caches(write=True)
    if "rendered" in caches.chosen(os.environ.get(caches.ENV)):
        # The same text at every epoch (mapping and seed are placeholders): kept in memory,
        # a rotation skips Jinja2 (a third of a pass at 64 buckets).
        kept = dataclasses.replace(kept, rendered=caches.Memory())
    daemon = Daemon(
        ctx.state,
        nft,
        templates=ctx.templates,
        caches=kept,
        host=ctx.hostname,
        options=Options(
            drift_interval=drift_interval,
            reconnect_min=reconnect_min,
            reconnect_max=reconnect_max,
            redis_check=redis_check,
            redis_timeout=redis_timeout,
            log_mapping=log_mapping,
            down_on_exit=down_on_exit,
            full_compare=full_compare,
        ),
        logger=logger,
        puller=puller,
        monitor=Monitor(),
    )
    if metrics:
        daemon.metrics.serve(metrics)
    daemon.run()


@cli.command(
    epilog=examples(
        "mtd trigger -s /etc/mtd                 # one fleet rotation now",
        "mtd trigger -s /etc/mtd --every 30..90  # again and again, like the proof of concept",
        "mtd trigger -s /etc/mtd --count 3       # three rotations now",
    )
)
@click.option(
    "--every", metavar="L..U", help="Publish after a random wait of L to U seconds, again."
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="Publish N rotations (now, or one per --every wait).",
)
@state_options
@host_option
@pass_ctx
@friendly
def trigger(ctx: Ctx, every: str | None, count: int | None) -> None:
    """Publish fleet rotations: once, N at once (--count), or at random intervals of L to U
    seconds (--every, forever or --count times).

    Each one increments the fleet's epoch in Redis and publishes it (signed when
    redis.signing_key_file is set); every `mtd run` on the channel converges to it.
    """
    trigger_loop(ctx, every, count)
