"""The subscriber: a thread that follows the fleet's Redis for the daemon.

It subscribes to the rotation channel (and the pull channel with `--pull`), reads the epoch
key on every (re)connect and every `check_interval` (which also notices a silently dead
link), and reconnects with capped exponential backoff. It only reports to its `Sink`; what to
do is the daemon's business. It also keeps this host's heartbeat record for `mtd fleet
status`, and publishes the watch changes made on this host while Redis was down.

Rejections are logged a few at a time (`LOG_BURST`), then as one summary line per
`LOG_WINDOW` with counts by reason, so a flood cannot flood the log.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import redis
from redis.backoff import EqualJitterBackoff

from reconciler import defaults
from reconciler.adapters.bus import (
    LOG,
    RECOVER,
    decode_message,
    decode_pull,
    publish_watch,
    put_back,
    read_epoch,
    read_watches,
    write_heartbeat,
)
from reconciler.adapters.redislink import LOG_WINDOW, BusConfig, _one_line, connect
from reconciler.core.messages import WATCH_MAX_AGE, BadMessage, Trigger, WatchOrder, decode_watch
from reconciler.errors import MtdError
from reconciler.logs import event

LOG_BURST = 5  # rejected or stale triggers logged in full per window, then only counted


RECONNECT_PULL_GAP = defaults.PULL_INTERVAL  # seconds between pulls asked by reconnects


class Sink(Protocol):
    """What the subscriber reports to (the daemon). `pulls`, `pull_now`, `pull_ignored`,
    `heartbeat`, `watch`, `unpublished` and `ahead_reason` are optional: a sink without one
    (a test's, a publisher's) is asked with `getattr` and simply gets none of that."""

    @property
    def pulls(self) -> bool:
        """Follow the pull channel too (`mtd run --pull`)."""
        ...

    def watch(self, order: WatchOrder, origin: str = "message") -> None:
        """A watch change from the fleet, or kept in Redis while this host was away."""

    def unpublished(self) -> list[dict[str, Any]]:
        """Watch changes made on this host alone while Redis was down: published now."""
        ...

    def known_epoch(self) -> int:
        """The highest epoch heard of: a trigger not beyond it is stale."""
        ...

    def applied_epoch(self) -> int:
        """The epoch live on this host: triggers move at most `max_epoch_step` beyond it,
        and it is what is put back into Redis when Redis is behind."""
        ...

    def trigger(self, trigger: Trigger) -> None: ...

    def connection(self, up: bool) -> None: ...

    def ignored(self, outcome: str) -> None: ...

    def pull_now(self, reason: str) -> None:
        """A "fetch now" notice arrived (or a reconnect may have missed one)."""

    def pull_ignored(self) -> None:
        """A pull notice was rejected (garbage, unsigned, forged, replayed)."""

    def heartbeat(self) -> dict[str, Any] | None:
        """This host's record for `mtd fleet status`; None: keep none."""
        return None

    def ahead_reason(self, epoch: int) -> str | None: ...


class LogBudget:
    """Ignored triggers in the log: the first `burst` of each window in full, the rest
    counted by reason and summarised in one line when the window ends (`flush`)."""

    def __init__(
        self,
        logger: logging.Logger,
        channel: str,
        burst: int = LOG_BURST,
        window: float = LOG_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        what: str = "triggers",
    ) -> None:
        self.log, self.channel, self.what = logger, channel, what
        self.burst, self.window, self.clock = burst, window, clock
        self.started: float | None = None
        self.logged = 0
        self.counts: Counter[tuple[str, str]] = Counter()

    def note(self, outcome: str, kind: str, log: Callable[[], None]) -> None:
        """One ignored trigger: `log()` writes its own line while the budget lasts."""
        self.flush()
        if self.started is None:
            self.started = self.clock()
        if self.logged < self.burst:
            self.logged += 1
            log()
        else:
            self.counts[(outcome, kind)] += 1

    def flush(self, force: bool = False) -> None:
        """At the end of a window (or `force`): one summary line if anything was held back."""
        if self.started is None:
            return
        took = self.clock() - self.started
        if not force and took < self.window:
            return
        if self.counts:
            total = sum(self.counts.values())
            outcomes: dict[str, Counter[str]] = {}
            for (outcome, kind), n in sorted(self.counts.items()):
                outcomes.setdefault(outcome, Counter())[kind] += n
            parts = [
                f"{o} {sum(c.values())} ({', '.join(f'{k} {n}' for k, n in sorted(c.items()))})"
                for o, c in outcomes.items()
            ]
            event(
                self.log,
                logging.WARNING,
                "rejected",
                f"{total} more {self.what} on {self.channel} ignored in {took:.3g} s: "
                + "; ".join(parts),
                channel=self.channel,
                suppressed=total,
                counts={f"{o}:{k}": n for (o, k), n in sorted(self.counts.items())},
                seconds=round(took, 3),
            )
        self.started, self.logged = None, 0
        self.counts.clear()


class Subscriber:
    """Follows the fleet's epoch in a background thread, through any Redis outage."""

    POLL = 0.25  # longest wait for a message, so stop() takes effect quickly

    def __init__(self, config: BusConfig, sink: Sink, logger: logging.Logger = LOG) -> None:
        self.config = config
        self.sink = sink
        self.log = logger
        self.first_attempt = threading.Event()  # set once the first connect succeeded or failed
        self._stop = threading.Event()
        self._check_now = threading.Event()  # read the epoch key at once (check_soon)
        self._backoff = EqualJitterBackoff(cap=config.reconnect_max, base=config.reconnect_min)
        self._thread: threading.Thread | None = None
        self._reported: str | None = None  # last problem with the key, logged once
        self.budget = LogBudget(logger, config.channel, window=config.log_window)
        self.pull_budget = LogBudget(
            logger, config.pull_channel or "", window=config.log_window, what="pull notices"
        )
        self._beat_now = threading.Event()
        self._next_beat = 0.0
        self._connects = 0
        self._notices: collections.deque[float] = collections.deque(maxlen=256)
        self._watches_seen: collections.deque[tuple[str, str, float]] = collections.deque(
            maxlen=4096
        )
        self._kept_seen: set[tuple[str, float]] = set()  # handed over at the last catch-up
        self._reconnect_pulled: float | None = None  # monotonic time of the last such pull

    @property
    def pull_channel(self) -> str | None:
        """Followed only for a sink that pulls (`mtd run --pull`)."""
        wants = getattr(self.sink, "pulls", False)
        return self.config.pull_channel if wants else None

    def beat(self) -> None:
        """Write the heartbeat at the next turn of the loop (after a pass, a pull)."""
        self._beat_now.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="mtd-redis", daemon=True)
        self._thread.start()

    def check_soon(self) -> None:
        """Read (and maybe raise) the fleet's epoch now rather than at the next check."""
        self._check_now.set()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.budget.flush(force=True)  # a flood's counts are not lost at exit
            self.pull_budget.flush(force=True)

    def delay(self, failures: int) -> float:
        """Capped exponential backoff with jitter: base * 2**(n-1), at most the cap."""
        return min(self.config.reconnect_max, self._backoff.compute(failures - 1))

    def run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            up = False
            client = connect(self.config)
            pubsub = client.pubsub()
            try:
                self._subscribe(client, pubsub)
                up = True
                failures = 0
                self._listen(client, pubsub)
            except (redis.RedisError, OSError) as exc:
                problem = _one_line(exc)
            except Exception as exc:  # a bug must not end the following: log it, go on
                problem = f"internal error: {type(exc).__name__}: {_one_line(exc)}"
                self.log.debug("subscriber internal error", exc_info=True)
            else:
                return  # stopped
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
                with contextlib.suppress(Exception):
                    client.close()
            failures += 1
            delay = self.delay(failures)
            if up:
                self.sink.connection(False)
                event(
                    self.log,
                    logging.WARNING,
                    "redis",
                    f"{self.config.where}: connection lost: {problem}: keeping the last "
                    f"desired state, reconnecting in {delay:.1f} s",
                    connected=False,
                    error=problem,
                    retry_in=round(delay, 3),
                )
            else:
                event(
                    self.log,
                    logging.WARNING if failures == 1 else logging.INFO,
                    "redis",
                    f"{self.config.where}: unreachable: {problem}: attempt {failures}, "
                    f"next in {delay:.1f} s",
                    connected=False,
                    error=problem,
                    attempt=failures,
                    retry_in=round(delay, 3),
                )
            self.first_attempt.set()
            self._stop.wait(delay)

    def _subscribe(self, client: redis.Redis, pubsub: Any) -> int:
        """Subscribe first, then read the key: nothing published in between is missed."""
        channels = [self.config.channel]
        if self.pull_channel and self.pull_channel != self.config.channel:
            channels.append(self.pull_channel)
        pubsub.subscribe(*channels)
        deadline = time.monotonic() + self.config.timeout
        confirmed = 0
        while confirmed < len(channels):
            msg = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg.get("type") == "subscribe":
                confirmed += 1
            elif time.monotonic() >= deadline:
                raise redis.TimeoutError("no reply to SUBSCRIBE")
        # Connected first, then what the epoch key says (or why it cannot be read): the log
        # reads in the order things happened. The sink hears of it once caught up.
        event(
            self.log,
            logging.INFO,
            "redis",
            f"{self.config.where}: connected, subscribed to {self.config.channel}",
            connected=True,
            channel=self.config.channel,
        )
        epoch = self._catch_up(client, connecting=True)
        self._catch_up_watches(client)
        self._publish_kept()
        self._connects += 1
        if self.pull_channel and self._connects > 1 and self._reconnect_pull_due():
            self.sink.pull_now("reconnect")  # a notice may have been sent while we were away
        self._next_beat = 0.0
        self._heartbeat(client)
        self.sink.connection(True)
        self.first_attempt.set()
        return epoch

    def _reconnect_pull_due(self) -> bool:
        """At most one pull for reconnects per `RECONNECT_PULL_GAP`: anyone who can publish
        can force reconnects (one message over Redis' pub/sub output buffer), and each must
        not cost a fetch; a notice missed meanwhile waits for the pull interval at worst."""
        now = time.monotonic()
        if self._reconnect_pulled is not None and now - self._reconnect_pulled < RECONNECT_PULL_GAP:
            return False
        self._reconnect_pulled = now
        return True

    def _listen(self, client: redis.Redis, pubsub: Any) -> None:
        next_check = time.monotonic() + self.config.check_interval
        while not self._stop.is_set():
            wait = min(self.POLL, max(0.0, next_check - time.monotonic()))
            msg = pubsub.get_message(timeout=wait)
            if msg is not None and msg.get("type") == "message":
                channel = msg.get("channel")
                if isinstance(channel, bytes):
                    channel = channel.decode("utf-8", "replace")
                if channel == self.pull_channel and channel != self.config.channel:
                    self._on_pull(msg["data"])
                else:
                    self._on_message(msg["data"])
            self.budget.flush()
            self.pull_budget.flush()
            self._heartbeat(client)
            if time.monotonic() >= next_check or self._check_now.is_set():
                self._check_now.clear()
                self._catch_up(client)  # a GET with a timeout: a dead link raises here
                next_check = time.monotonic() + self.config.check_interval

    def _heartbeat(self, client: redis.Redis) -> None:
        """Refresh the record every third of its lifetime, or at once after a `beat()`."""
        now = time.monotonic()
        if not self.config.heartbeat_key or (now < self._next_beat and not self._beat_now.is_set()):
            return
        self._beat_now.clear()
        self._next_beat = now + max(0.1, self.config.heartbeat_ttl / 3)
        beat = getattr(self.sink, "heartbeat", None)
        record = beat() if beat is not None else None
        if record is None:
            return
        try:
            write_heartbeat(client, self.config, record)
        except redis.ResponseError as exc:  # an ACL without SET/HSET: say so once, go on
            key = self.config.heartbeat_key
            self._report(f"cannot write the heartbeat {key}: {_one_line(exc)}")

    def _on_pull(self, data: bytes) -> None:
        channel = self.pull_channel or ""
        try:
            published = decode_pull(data, self.config, channel)
            if published in self._notices:  # the same notice again: a replay costs nothing
                raise BadMessage(
                    f"time {published}: already received (duplicate or replayed)", "replayed"
                )
            self._notices.append(published)
        except BadMessage as exc:
            self._pull_rejected(exc, channel)
            return
        self.sink.pull_now("notice")

    def _pull_rejected(self, exc: BadMessage, channel: str) -> None:
        counted = getattr(self.sink, "pull_ignored", None)
        if counted is not None:
            counted()
        self._note_rejected(self.pull_budget, exc, f"pull notice on {channel}", channel)

    def _on_message(self, data: bytes) -> None:
        try:
            message = decode_message(data, self.config)
            if isinstance(message, WatchOrder):
                self._on_watch(message)
                return
            trigger = message
            self._check_step(trigger)
        except BadMessage as exc:
            self._rejected(exc)
            return
        known = self.sink.known_epoch()
        if trigger.epoch <= known:
            self.sink.ignored("stale")
            self.budget.note(
                "stale",
                "not newer",
                lambda: event(
                    self.log,
                    logging.WARNING,
                    "stale",
                    f"trigger on {self.config.channel} ignored: epoch {trigger.epoch} is not "
                    f"newer than epoch {known} (stale, duplicate or replayed)",
                    channel=self.config.channel,
                    epoch=trigger.epoch,
                    known=known,
                ),
            )
            return
        event(
            self.log,
            logging.INFO,
            "trigger",
            f"trigger on {self.config.channel}: epoch {trigger.epoch}",
            channel=self.config.channel,
            epoch=trigger.epoch,
            published=trigger.published,
        )
        self.sink.trigger(trigger)

    def _on_watch(self, order: WatchOrder, origin: str = "message") -> None:
        """A watch change for the sink (a daemon); the same message again (a replay within
        `WATCH_MAX_AGE`) is rejected."""
        watch = getattr(self.sink, "watch", None)
        if watch is None:
            return
        seen = (order.op, order.source, order.published)
        if origin == "message":
            if seen in self._watches_seen:
                raise BadMessage(
                    f"watch {order.op} {order.source}: already received (duplicate or replayed)",
                    "replayed",
                )
            self._watches_seen.append(seen)
        watch(order, origin)

    def _publish_kept(self) -> None:
        """What `mtd watch` applied on this host alone while Redis was down (the sink's
        `unpublished`): published to the fleet now, with the time each has left."""
        take = getattr(self.sink, "unpublished", None)
        if take is None:
            return
        from reconciler.core.watch import MAX_SECONDS

        changes = take()
        for i, c in enumerate(changes):
            now = time.time()
            left = math.ceil(c["expires_at"] - now) if c["op"] == "add" else 0
            left = min(left, MAX_SECONDS)  # a record from a clock set back
            if c["op"] == "add" and left < 1:
                continue  # expired while Redis was down
            origin = c.get("origin", "redis")  # a CrowdSec decision stays one fleet-wide
            order = WatchOrder(c["op"], c["source"], left, c["reason"], round(now, 6), origin)
            try:
                publish_watch(self.config, order)
            except MtdError as exc:
                self.sink.keep_unpublished(changes[i:])
                self._report(f"watch {c['op']} {c['source']} kept on this host: {exc}")
                return
            event(
                self.log,
                logging.INFO,
                "watch",
                f"published watch {c['op']} {c['source']}"
                + (f" for {left} s" if c["op"] == "add" else "")
                + f" on {self.config.channel}: applied on this host alone while Redis was down",
                source=c["source"],
                op=c["op"],
            )

    def _catch_up_watches(self, client: redis.Redis) -> None:
        """The fleet's live watch entries kept in Redis: what was published while this
        daemon was away (or before it started). Expired and invalid ones are skipped, and
        one already handed over at an earlier connect is not handed over again: a forced
        reconnect costs a bounded read, never a kernel transaction."""
        if getattr(self.sink, "watch", None) is None:
            return
        what = "kept watch in " + self.config.watch_key
        now = time.time()
        delivered: set[tuple[str, float]] = set()
        try:
            for values, too_large in read_watches(client, self.config):
                for line in too_large:
                    self._rejected(BadMessage(line, "too large"), what)
                for data in values:
                    order = self._kept(data, now, what)
                    if order is None:
                        continue
                    seen = (order.source, order.published)
                    delivered.add(seen)
                    if seen not in self._kept_seen:
                        self._on_watch(order, "catch-up")
        except MtdError as exc:
            self._report(str(exc))
            return
        self._kept_seen = delivered

    def _kept(self, data: bytes, now: float, what: str) -> WatchOrder | None:
        """A kept watch message worth handing over (a live add), or None (said why)."""
        try:
            order = decode_watch(data, self.config)
        except BadMessage as exc:
            self._rejected(exc, what)
            return None
        if order.published > now + WATCH_MAX_AGE:
            self._rejected(
                BadMessage(
                    f"watch {order.op} {order.source}: published in the future "
                    f"({order.published - now:.0f} s ahead: a clock is off)",
                    "stale watch",
                ),
                what,
            )
            return None
        return order if order.op == "add" and order.expires_at > now + 1 else None

    @staticmethod
    def _kind(exc: BadMessage) -> str:
        return "watch" if str(exc).startswith("watch ") else "trigger"

    def _rejected(self, exc: BadMessage, what: str = "") -> None:
        self.sink.ignored("rejected")
        channel = self.config.channel
        self._note_rejected(self.budget, exc, what or f"{self._kind(exc)} on {channel}", channel)

    def _note_rejected(self, budget: LogBudget, exc: BadMessage, what: str, channel: str) -> None:
        """One warning line per rejected message, within `budget` (a flood is summarised)."""
        budget.note(
            "rejected",
            exc.kind,
            lambda: event(
                self.log,
                logging.WARNING,
                "rejected",
                f"{what} ignored: {exc}",
                channel=channel,
                reason=str(exc),
                kind=exc.kind,
            ),
        )

    def _check_step(self, trigger: Trigger) -> None:
        """An epoch at most `max_epoch_step` ahead of the one live here. Before its first
        pass a host joins at the fleet's epoch (`known`, from the catch-up) instead."""
        base = self.sink.applied_epoch() or self.sink.known_epoch()
        step = self.config.max_epoch_step
        if trigger.epoch - base > step:
            raise BadMessage(
                f"epoch {trigger.epoch} is {trigger.epoch - base} ahead of epoch {base} on "
                f"this host: expected at most redis.max_epoch_step {step} ahead",
                "too far ahead",
            )

    def _catch_up(self, client: redis.Redis, connecting: bool = False) -> int:
        """Read the fleet's epoch: move to it if newer, put back ours if Redis is behind.
        `connecting`: also say so when the host is already at the fleet's epoch.

        A host that never applied an epoch joins at the fleet's, whatever it is (up to
        `MAX_EPOCH`); any other host follows it only `max_epoch_step` at a time (an epoch
        further ahead is reported once, with the command to follow it on purpose)."""
        try:
            epoch = read_epoch(client, self.config)
        except BadMessage as exc:  # a bad last trigger: a put-back writes a good one
            self._report(f"cannot read the fleet epoch: {exc}")
            epoch, connecting = 0, False
        except MtdError as exc:  # a key no put-back can raise either: said once, left alone
            self._report(f"cannot read the fleet epoch: {exc}")
            return self.sink.known_epoch()
        known = self.sink.known_epoch()
        if connecting and epoch == known:
            event(
                self.log,
                logging.INFO,
                "redis",
                f"fleet epoch {epoch} ({self.config.epoch_key}): this host is at it",
                epoch=epoch,
            )
        applied = self.sink.applied_epoch()
        if epoch > known and applied and epoch - applied > self.config.max_epoch_step:
            self._report(
                f"catch-up: {self.config.epoch_key} is at epoch {epoch}, {epoch - applied} "
                f"ahead of epoch {applied} on this host: expected at most redis.max_epoch_step "
                f"{self.config.max_epoch_step}: not followed (if the fleet really moved that "
                f'far, write {{"epoch": {epoch}}} to this host\'s epoch file; {RECOVER})'
            )
            return epoch
        if epoch > known:
            event(
                self.log,
                logging.INFO,
                "trigger",
                f"catch-up: {self.config.epoch_key} is at epoch {epoch}, this host at {known}",
                epoch=epoch,
                known=known,
                origin="catch-up",
            )
            self.sink.trigger(Trigger(epoch, None, "catch-up"))
            return epoch
        if epoch < applied:
            try:
                # A fresh Redis (or one that restarted without its data) holds no epoch: to
                # be filled in, not warned about as a fleet behind this host.
                absent = epoch == 0 and not client.exists(
                    self.config.epoch_key, self.config.last_key
                )
                raised = put_back(client, self.config, applied)
            except MtdError as exc:
                self._report(str(exc))
                return epoch
            why = getattr(self.sink, "ahead_reason", None)  # a sink may not know
            reason = why(applied) if why else None
            if raised:
                self._reported = None
            if raised and reason:
                event(
                    self.log,
                    logging.INFO,
                    "redis",
                    f"{self.config.epoch_key} raised from epoch {epoch} to {applied}: {reason}, "
                    "so the fleet follows",
                    epoch=applied,
                    was=epoch,
                    reason=reason,
                )
            elif raised and absent:
                event(
                    self.log,
                    logging.INFO,
                    "redis",
                    f"{self.config.epoch_key} not set (a new Redis, or one that restarted "
                    f"without its data): put back epoch {applied}, this host's",
                    epoch=applied,
                )
            elif raised:
                event(
                    self.log,
                    logging.WARNING,
                    "redis",
                    f"{self.config.epoch_key} was at epoch {epoch}, behind this host: "
                    f"put back epoch {applied}",
                    epoch=applied,
                    was=epoch,
                )
            return applied
        if epoch < known:
            return known
        self._reported = None
        return epoch

    def _report(self, problem: str) -> None:
        """A bad key is logged when it appears, not on every check."""
        if problem != self._reported:
            self._reported = problem
            event(self.log, logging.ERROR, "error", problem, error=problem)


def start_subscriber(
    config: BusConfig, sink: Sink, wait: float = 0.0, logger: logging.Logger = LOG
) -> Subscriber:
    """Start following the bus; wait up to `wait` s for the first connection attempt."""
    sub = Subscriber(config, sink, logger)
    sub.start()
    if wait > 0:
        sub.first_attempt.wait(wait)
    return sub
