"""`mtd run`: keep this host converged, forever, to the desired state at the fleet's epoch.

Triggers only decide when the pass (`reconcile.run_pass`) runs: at start, on a Redis trigger or a
catch-up after a reconnect, on a change to the owned table by another process (the kernel's
nftables events, `adapters.monitor`), on the drift timer, on SIGHUP. They are fed to one
worker loop (this thread) through a queue, so passes never overlap; a burst of triggers
costs one pass per `redis.min_interval` and the highest epoch wins (repairs do not wait).
The epoch is max(local epoch file, fleet epoch); the file is written after each successful
pass, so an epoch is applied once and survives restarts. Redis being down changes nothing
here: the last desired state keeps being enforced.

While the events are followed, the table is known to be as the last pass left it, so a new
epoch replaces it without reading it back, and a change by someone else is repaired from
what its events said (chains, rules and single elements in one small transaction, anything
else, or an element event not decoded with certainty, by replacing the table). A full
compare (read, diff) runs at start, after a reload, when events were lost, on the drift
timer (a backstop: it reports what the events missed) and with `--full-compare`.

What is due when is decided by `core.schedule` (pure: events in, the pending work out); this
module is the thread and queue around it. Beside it: `metrics`, `reporting` (log and audit
lines, daemon.json, the heartbeat) and `daemon_watches` (the fleet's watch changes).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from reconciler import defaults
from reconciler.adapters import auditlog, bus, files, subscriber, watchstore
from reconciler.adapters.kernel import Backend
from reconciler.core import render, repair, schedule
from reconciler.core.advice import warnings as state_warnings
from reconciler.core.caches import NONE, Caches
from reconciler.core.state import State
from reconciler.errors import MtdError
from reconciler.logs import LOGGER, event
from reconciler.services.daemon_watches import Watches
from reconciler.services.metrics import Metrics, Packets, parse_address  # noqa: F401 (callers say `daemon.*`)
from reconciler.services.reconcile import (
    PassOutcome,
    PassRequest,
    Result,
    provision_secret,
    repair_events,
    run_pass,
    take_down,
)
from reconciler.services.reporting import Reporting

LOG = logging.getLogger(f"{LOGGER}.daemon")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Options:
    drift_interval: float | None = None  # None: the state's drift_interval
    reconnect_min: float = defaults.RECONNECT_MIN
    reconnect_max: float = defaults.RECONNECT_MAX
    redis_check: float = defaults.REDIS_CHECK
    redis_timeout: float = defaults.REDIS_TIMEOUT
    start_wait: float = defaults.START_WAIT
    log_mapping: bool = False
    down_on_exit: bool = False
    full_compare: bool = False  # read and diff the table on every pass, events or not

    def bus_timers(self) -> dict[str, float]:
        return {
            "reconnect_min": self.reconnect_min,
            "reconnect_max": self.reconnect_max,
            "check_interval": self.redis_check,
            "timeout": self.redis_timeout,
        }


class Subscribe(Protocol):
    """How the daemon follows the bus: `subscriber.start_subscriber`, or a stand-in in tests that
    feed `trigger()` themselves."""

    def __call__(
        self, config: bus.BusConfig, sink: Any, *, wait: float = 0.0, logger: logging.Logger
    ) -> Any: ...


class Daemon(Reporting, Watches):
    """The worker loop. `load` reads and validates the desired state (raises `MtdError`).

    `nft` is any `kernel.Backend` (`adapters.fake.FakeKernel` in root-free tests); with
    `subscribe` a test drives it without Redis through `trigger()` and `request_*()`.
    """

    def __init__(
        self,
        load: Callable[[], State],
        nft: Backend,
        *,
        templates: list[Path] | None = None,
        caches: Caches = NONE,
        host: str,
        options: Options,
        metrics: Metrics | None = None,
        logger: logging.Logger = LOG,
        puller: Any = None,  # gitops.Puller of `--pull`: its rounds run in this loop
        monitor: Any = None,  # monitor.Monitor (or a fake): the owned table's change events
        subscribe: Subscribe | None = None,
    ) -> None:
        self.load = load
        self.nft = nft
        self.templates = templates
        self.caches = caches  # what rendering may reuse (`core.caches`)
        self.host = host
        self.options = options
        self.metrics = metrics or Metrics(pull=puller is not None)
        self.log = logger
        self.state = load()
        self.bus_config = self._bus_config(self.state)
        auditlog.check_writable(self.state.audit_log)  # as does an audit log it cannot write
        # The secret is read (created at the first start) once: a file that later disappears
        # or changes never silently becomes a new mapping; only a reload (SIGHUP) takes it.
        self.secret = provision_secret(self.state, nft)
        self.secret_file = self.state.secret_file
        self.secret_problem: str | None = None
        self._queue: queue.Queue[schedule.Event] = queue.Queue()
        self._lock = threading.Lock()
        self.applied = files.read_epoch(self.state.epoch_file)
        self._known = self.applied  # highest epoch heard of (applied or pending)
        self._ahead: tuple[int, str | None] = (-1, None)  # epoch of a local rotation, and why
        self.target = self.applied
        self._pending: bus.Trigger | None = None  # the trigger that set `target`
        self._dirty = True
        self._origin = "start"
        self._clean = False  # True after a pass of this state and epoch succeeded
        self._last_run = float("-inf")
        self._next_drift = 0.0
        self._stopping = False
        self.subscriber: subscriber.Subscriber | None = None
        self.puller = puller
        self._next_pull = float("inf") if puller is None else time.monotonic() + puller.next_delay()
        self.monitor = monitor
        self._subscribe: Subscribe = subscribe or subscriber.start_subscriber
        self._trusted = False  # the table is as the last pass left it (events say so)
        self._foreign: list[schedule.Foreign] = []  # changes by others, not yet repaired
        self._covered = -1  # generation up to which a pass replaced or compared the table
        self._last: Result | None = None
        self._last_pull = float("-inf")
        self._last_result: str | None = None  # of the last pass: changed, ok or error
        self._last_error: str | None = None
        self._started = time.time()
        self._pull_info = self._read_pull_info()
        self._scrape_nft: Any = None
        self._watches: list[bus.WatchOrder] = []  # watch changes not applied yet
        from reconciler.services import crowdsec  # `crowdsec:` of the host's configuration

        self.crowdsec = crowdsec.follower(self.state, self)
        self.packets = self.metrics.packets
        self.packets.read = self._read_counters
        self._redis_seen = self._redis_lost = False  # for mtd_redis_reconnects_total
        self._stop_requested = threading.Event()
        # What `mtd status` shows of this daemon (daemon.json): written by the loop and the
        # bus thread, so under a lock of its own.
        self._status_lock = threading.Lock()
        self._redis_connected = False
        self._last_trigger: dict[str, Any] | None = None
        self._last_pass: dict[str, Any] | None = None
        self.metrics.in_sync.set_function(lambda: 1.0 if self.in_sync() else 0.0)

    @property
    def pulls(self) -> bool:
        """Follow the pull channel only with `--pull`."""
        return self.puller is not None

    # -- the bus reports here (from its thread) ------------------------------------------

    def known_epoch(self) -> int:
        with self._lock:
            return self._known

    def applied_epoch(self) -> int:
        with self._lock:
            return self.applied

    def ahead_reason(self, epoch: int) -> str | None:
        """Why this host is at `epoch`, ahead of the fleet, when it knows (a local rotation):
        the bus says so when it raises the fleet's epoch, rather than blame Redis."""
        with self._lock:
            ahead, why = self._ahead
            return why if ahead == epoch else None

    def trigger(self, trigger: bus.Trigger) -> None:
        with self._lock:
            self._known = max(self._known, trigger.epoch)
        self._last_trigger = {
            "epoch": trigger.epoch,
            "origin": trigger.origin,
            "time": round(time.time(), 3),
        }
        if trigger.origin == "message":
            self.metrics.triggers.labels("accepted").inc()
        self._queue.put(schedule.Triggered(trigger))

    def connection(self, up: bool) -> None:
        if up and self._redis_lost:
            self.metrics.redis_reconnects.inc()
        if up:
            self._redis_seen, self._redis_lost = True, False
        elif self._redis_seen:
            self._redis_lost = True
        self.metrics.redis_up.set(1 if up else 0)
        if up != self._redis_connected:
            self._redis_connected = up
            self._write_status()

    def watch(self, order: bus.WatchOrder, origin: str = "message") -> None:
        """A watch change from the fleet: applied by the loop at once (no `min_interval`:
        it is one small element transaction, not a pass)."""
        if origin == "message":
            self.metrics.watches.labels("accepted").inc()
        self._queue.put(schedule.Watched(order, origin))

    def ignored(self, outcome: str) -> None:
        self.metrics.triggers.labels(outcome).inc()

    def unpublished(self) -> list[dict[str, Any]]:
        """Watch changes `mtd watch` applied here alone while Redis was down, for the
        subscriber to publish now that it is connected (removed from their file)."""
        try:
            return watchstore.take_unpublished(self.state.epoch_file)
        except MtdError:
            return []

    def keep_unpublished(self, changes: list[dict[str, Any]]) -> None:
        with contextlib.suppress(MtdError):
            watchstore.keep_unpublished(self.state.epoch_file, changes)

    # -- the monitor reports here (from its thread) --------------------------------------

    def changed(self, change: Any) -> None:
        # A dynamic watch set's elements are runtime state (`watch add --local`, the
        # fail2ban action, an `nft add element` by hand): never a reason to repair.
        what = [w for w in change.what if not repair.runtime(w[1], w[2])]
        if not what:
            return
        change.what = what
        if getattr(change, "elements", None):
            change.elements = [e for e in change.elements if not repair.runtime("element", e.set)]
        self._queue.put(schedule.Foreign(change, time.monotonic()))

    def lost(self, reason: str) -> None:
        self._queue.put(schedule.Lost(reason, time.monotonic()))

    def pull_now(self, reason: str) -> None:
        if reason == "notice":
            self.metrics.notices.labels("accepted").inc()
        self._queue.put(schedule.PullNotice(reason))

    def pull_ignored(self) -> None:
        self.metrics.notices.labels("rejected").inc()

    # -- requests (signal handlers, tests) -----------------------------------------------

    def request_reload(self) -> None:
        self._queue.put(schedule.Reload())

    def request_stop(self) -> None:
        self._stop_requested.set()
        self._queue.put(schedule.Stop())

    def _first_attempt(self, subscriber: Any) -> None:
        """Up to `start_wait` for the fleet's epoch before the first pass, but not past a
        SIGTERM: the unit promises a stop within a second, also while Redis is away."""
        first = getattr(subscriber, "first_attempt", None)
        if first is None:
            return
        deadline = time.monotonic() + self.options.start_wait
        while not first.is_set() and not self._stop_requested.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            first.wait(min(left, 0.05))

    def _read_counters(self) -> dict[str, int] | None:
        """From the metrics thread: a libnftables context of its own (one is not shared)."""
        if self._scrape_nft is None:  # a backend of one context (the fake) is its own
            sibling = getattr(self.nft, "sibling", None)
            self._scrape_nft = sibling() if sibling is not None else self.nft
        counters: Callable[[str], dict[str, int] | None] | None = getattr(
            self._scrape_nft, "counters", None
        )
        return None if counters is None else counters(self.state.table)

    def _counters_before(self) -> dict[str, int]:
        """The live counters, read before a pass that may replace the table."""
        counters = getattr(self.nft, "counters", None)
        try:
            live = counters(self.state.table) if counters is not None else None
        except MtdError:
            live = None
        return self.packets.snapshot(live)

    # -- the loop ------------------------------------------------------------------------

    @property
    def drift_interval(self) -> float:
        return self.options.drift_interval or self.state.drift_interval

    @property
    def min_interval(self) -> float:
        return float(self.state.redis["min_interval"])

    def _bus_config(self, state: State) -> bus.BusConfig | None:
        """None without `redis.url`: no fleet, no Redis (a GitOps-only or standalone host).
        A bad URL or signing key fails here, at start or reload, not in the thread."""
        if not bus.configured(state):
            return None
        config = bus.BusConfig.from_state(state, **self.options.bus_timers())
        bus.connect(config)
        return config

    def run(self) -> None:
        """Until SIGTERM/SIGINT; the table stays in place unless `down_on_exit`."""
        with self._signals():
            self.serve()

    def serve(self) -> None:
        """The loop without signal handlers (any thread): until `request_stop()`."""
        config = self.bus_config
        fleet = (
            f"fleet {config.where} channel {config.channel}"
            if config
            else "no fleet (no redis.url: no Redis triggers)"
        )
        event(
            self.log,
            logging.INFO,
            "start",
            f"mtd run: table inet {self.state.table}, local epoch {self.applied}, "
            f"{fleet}, drift check every {self.drift_interval:g} s",
            epoch=self.applied,
            table=self.state.table,
            redis=config.where if config else None,
            channel=config.channel if config else None,
            drift_interval=self.drift_interval,
            min_interval=self.min_interval,
            signed=config is not None and config.signing_key is not None,
        )
        self._warn(self.state)
        if config is not None and config.signing_key is None and not config.local:
            event(
                self.log,
                logging.WARNING,
                "start",
                f"redis.url {config.where} is not on this host and "
                "redis.signing_key_file is not set: anyone who can publish on "
                f"{config.channel} can rotate this host (set a signing key)",
                redis=config.where,
                signed=False,
            )
        self.metrics.redis_up.set(0)
        self.metrics.epoch.set(self.applied)
        self._write_status(running=False)  # what a daemon killed before left behind
        self._follow_events()
        if config is not None:
            self.subscriber = self._subscribe(config, self, logger=self.log)
            self._first_attempt(self.subscriber)
        if self.crowdsec is not None:
            self.crowdsec.start()
        try:
            self._loop()
        finally:
            if self.crowdsec is not None:
                self.crowdsec.stop(timeout=0.1)
            if self.subscriber is not None:
                # A thread blocked connecting to a Redis that is away is left to die with
                # the process: a stop takes well under the second the unit promises.
                self.subscriber.stop(timeout=0.25)
                if self._stopping and self.bus_config is not None and self._redis_connected:
                    bus.write_stopped(self.bus_config, self.heartbeat())  # `stopped`, on purpose
            if self.monitor is not None:
                self.monitor.stop()
            self._exit()

    def _follow_events(self) -> None:
        """Without events mtd still works: every pass then compares in full."""
        if self.monitor is None:
            self.metrics.events_up.set(0)
            return
        try:
            self.monitor.set_table(self.state.table)
            self.monitor.start(self.changed, self.lost)
        except OSError as exc:
            self.metrics.events_up.set(0)
            self.metrics.events_lost.inc()
            event(
                self.log,
                logging.WARNING,
                "events",
                f"cannot follow nftables events ({exc.strerror or exc}): every pass compares "
                f"the table in full, drift is found by the timer",
                error=str(exc),
            )
            self.monitor = None
            return
        self.metrics.events_up.set(1)

    def _loop(self) -> None:
        while True:
            self._drain(self._wait())
            if self._stopping:
                return
            if self._watches:
                self._apply_watches()
            if time.monotonic() >= self._next_pull:
                self._pull()
            self._notice_local_rotation()
            now = time.monotonic()
            if now >= self._next_drift and not self._dirty:
                self._dirty, self._origin = True, "drift"
            if self._dirty and (self._foreign or now >= self._last_run + self.min_interval):
                self._pass()

    def _notice_local_rotation(self) -> None:
        """A `mtd rotate` on this host wrote a newer epoch file: apply (and publish) it now,
        not at the next drift check."""
        if self._dirty:
            return
        with contextlib.suppress(MtdError):  # a bad file is the pass's to report
            if files.read_epoch(self.state.epoch_file) > max(self.target, self.applied):
                self._dirty, self._origin = True, "manual"

    def _wait(self) -> float:
        return schedule.wait(self._schedule(), now=time.monotonic(), min_interval=self.min_interval)

    def _schedule(self) -> schedule.Schedule:
        """The pending work and timers, as the pure decisions read them."""
        return schedule.Schedule(
            target=self.target,
            dirty=self._dirty,
            origin=self._origin,
            trusted=self._trusted,
            covered=self._covered,
            next_pull=self._next_pull,
            last_pull=self._last_pull,
            next_drift=self._next_drift,
            last_run=self._last_run,
            pending=self._pending,
            foreign=tuple(self._foreign),
            watches=tuple(self._watches),
            stopping=self._stopping,
        )

    def _drain(self, timeout: float) -> None:
        """Fold every queued event into the pending work: bursts become one pass."""
        try:
            ev: schedule.Event | None = self._queue.get(timeout=timeout) if timeout > 0 else None
        except queue.Empty:
            return
        while True:
            if ev is not None:
                self._fold(ev)
            try:
                ev = self._queue.get_nowait()
            except queue.Empty:
                return

    def _fold(self, ev: schedule.Event) -> None:
        interval = self.puller.config.interval if self.puller is not None else None
        decided = schedule.fold(
            self._schedule(), ev, now=time.monotonic(), pull_interval=interval, draw=random.random()
        )
        new = decided.schedule
        self.target, self._pending, self._dirty, self._origin = (
            new.target,
            new.pending,
            new.dirty,
            new.origin,
        )
        self._trusted, self._covered, self._stopping = new.trusted, new.covered, new.stopping
        self._next_pull, self._foreign, self._watches = (
            new.next_pull,
            list(new.foreign),
            list(new.watches),
        )
        if decided.reload:
            self._reload(secret=True)
        if decided.lost:
            self.metrics.events_lost.inc()
            event(
                self.log,
                logging.WARNING,
                "events",
                f"nftables events lost ({decided.lost}): comparing the table in full",
                error=decided.lost,
            )

    def _warn(self, state: State) -> None:
        """What the state declares that cannot work (`core.advice.warnings`), one line each,
        as every command that loads it says."""
        for line in state_warnings(state):
            event(self.log, logging.WARNING, "state", line, warning=line)

    def _reload(self, secret: bool = False) -> None:
        """SIGHUP (`secret`): a new state is taken only if it validates and renders, and the
        secret file is read again (a missing or unreadable one: the loaded secret is kept).
        After a pulled commit: the state only."""
        try:
            state = self.load()
            render.check(state, self.templates, self.caches)
            config = self._bus_config(state)
        except Exception as exc:  # MtdError, or a bug: either way the old state stays
            problems = (
                exc.problems
                if isinstance(exc, MtdError)
                else [f"internal error: {type(exc).__name__}: {exc}"]
            )
            event(
                self.log,
                logging.ERROR,
                "reload",
                "new desired state rejected, keeping the previous one: " + "; ".join(problems),
                result="rejected",
                errors=problems,
            )
            return
        if state.table != self.state.table and self.monitor is not None:
            self.monitor.set_table(state.table)
        self.state = state
        self._warn(state)
        self._clean = False
        self._trusted = False
        self._dirty = True
        self._origin = "manual"
        event(self.log, logging.INFO, "reload", "desired state reloaded", result="reloaded")
        if secret:
            self._reload_secret(state)
        self._check_secret()
        from reconciler.services import crowdsec

        self.crowdsec = crowdsec.reloaded(self, state)
        if config != self.bus_config:
            self.bus_config = config
            if self.subscriber is not None:
                self.subscriber.stop(timeout=0.5)
                self.subscriber = None
                self.metrics.redis_up.set(0)
            if config is not None:
                self.subscriber = self._subscribe(config, self, logger=self.log)

    def _reload_secret(self, state: State) -> None:
        """The secret file again (SIGHUP); a missing or unreadable one keeps the loaded
        secret (`_check_secret` keeps reporting it)."""
        try:
            new = files.read_private_key(state.secret_file, "secret file")
        except MtdError:
            return
        if new != self.secret or state.secret_file != self.secret_file:
            self.secret, self.secret_file = new, state.secret_file
            event(
                self.log,
                logging.WARNING,
                "secret",
                f"{state.secret_file}: new secret loaded: a new mapping at the same epoch",
                secret_file=state.secret_file,
            )

    def _pull(self) -> None:
        """One git pull round, in this loop: never at the same time as a pass. A round
        reconciles and audits (origin pull) by itself; an applied commit is then reloaded
        as on SIGHUP (new Redis settings included)."""
        self._last_pull = time.monotonic()
        try:
            with self._quiet():
                outcome = self.puller.round(self.nft, secret=self.secret)
        except MtdError as exc:  # the commit is live but not recorded: the next round retries
            self.metrics.pulls.labels("error").inc()
            event(self.log, logging.ERROR, "pull", "; ".join(exc.problems), result="error")
            outcome = None
        except Exception as exc:  # a bug must not stop triggers and drift repair
            self.metrics.pulls.labels("error").inc()
            problem = f"internal error: {type(exc).__name__}: {exc}"
            event(self.log, logging.ERROR, "pull", problem, result="error")
            outcome = None
        self._next_pull = time.monotonic() + self.puller.next_delay()
        self._pull_info = self._read_pull_info()
        self._beat()
        self.metrics.pull_fetch_failures.set(self.puller.failures)
        if outcome is None:
            return
        self.metrics.pulls.labels(outcome.status).inc()
        if outcome.status != "unreachable":
            self.metrics.pull_head_rejected.set(1 if outcome.status == "rejected" else 0)
        if outcome.audit_error:
            self.metrics.audit_failures.inc()
        if outcome.new:
            retry = self._next_pull - time.monotonic()
            event(
                self.log,
                logging.INFO if outcome.ok and not outcome.audit_error else logging.ERROR,
                "pull",
                outcome.message
                + (f": next try in {retry:.0f} s" if outcome.status == "unreachable" else ""),
                result=outcome.status,
                commit=outcome.commit,
                errors=outcome.problems,
            )
        if outcome.status == "applied":
            self._reload()

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[Any]:
        """Around mtd's own commits: their events are not read (see `monitor.quiet`)."""
        if self.monitor is None:
            yield None
            return
        with self.monitor.quiet(lambda: getattr(self.nft, "commits", 0)) as window:
            yield window

    def _pass(self) -> None:
        state, origin, pending = self.state, self._origin, self._pending
        foreign, self._foreign = self._foreign, []
        self._dirty, self._pending, self._origin = False, None, "drift"
        self._last_run = start = time.monotonic()
        self._next_drift = start + self.drift_interval
        previous = self.applied
        # A full compare unless the events vouch for the table; the drift timer always does.
        compare = not self._trusted or self.options.full_compare or origin == "drift"
        self._check_secret()
        why, counted = "", None

        def repair(epoch: int) -> Result | None:
            nonlocal why, counted
            result = None
            if foreign and not compare and epoch == previous and self._last is not None:
                events = [w for ev in foreign for w in ev.change.what]
                raw = [e for ev in foreign for e in getattr(ev.change, "elements", ())]
                undecoded = "; ".join(
                    u for ev in foreign if (u := getattr(ev.change, "undecoded", ""))
                )
                out = repair_events(self._last, self.nft, events, state, raw, undecoded)
                result, why = (None, out) if isinstance(out, str) else (out, "")
            elif foreign:
                why = (
                    "a new epoch replaces it anyway"
                    if epoch != previous
                    else "the table was read and compared in full (events were lost, the "
                    "start, a reload or --full-compare)"
                )
            if result is None:
                counted = self._counters_before()
            return result

        def taken(out: PassOutcome) -> None:
            if not out.repaired:
                if out.result.status == "changed" and not out.result.patched:
                    # replaced: its counters start at zero (a patch keeps them counting)
                    self.packets.replaced(counted)
                if out.entered is not None:
                    self._covered = max(self._covered, out.entered.before)

        try:
            outcome = run_pass(
                PassRequest(
                    state,
                    self.nft,
                    secret=self.secret,
                    at_least=self.target,
                    write_epoch=True,
                    templates=self.templates,
                    caches=self.caches,
                    # blind: the events vouch for the table, or a new epoch replaces it
                    read_live=lambda epoch: compare or not (bool(foreign) or epoch != previous),
                    # what the table holds, when the events vouch for it: a rotation patches it
                    held=None if compare or foreign or self._last is None else self._last.rendered,
                    around=self._quiet,
                    repair=repair,
                    taken=taken,
                )
            )
            result, epoch, local = outcome.result, outcome.epoch, outcome.file_epoch
        except MtdError as exc:
            self._trusted = False
            self._foreign = foreign + self._foreign
            self._failed(origin, "; ".join(exc.problems), time.monotonic() - start)
            return
        except Exception as exc:  # a bug must not stop the enforcement of the others
            self._trusted = False
            problem = f"internal error: {type(exc).__name__}: {exc}"
            self._failed(origin, problem, time.monotonic() - start)
            return
        took = time.monotonic() - start
        drift = result.status == "changed" and self._clean and epoch == previous
        local_rotation = local > max(self.target, previous)
        self._trusted, self._last = self.monitor is not None, result
        with self._lock:
            self.applied, self.target, self._clean = epoch, max(self.target, epoch), True
            self._known = max(self._known, epoch)
            if local_rotation:
                self._ahead = (epoch, f"a local `mtd rotate` moved this host to epoch {epoch}")
        if foreign:
            origin = "events" if origin == "drift" else origin
        if local_rotation:
            origin = "manual" if origin in ("drift", "events") else origin
            fleet = "raising the fleet's epoch to it" if self.subscriber else "no fleet to raise"
            event(
                self.log,
                logging.INFO,
                "rotation",
                f"local rotation: the epoch file is at {local}, ahead of epoch {previous} "
                f"(`mtd rotate` on this host): {fleet}",
                epoch=local,
                previous=previous,
            )
            if self.subscriber is not None:
                self.subscriber.check_soon()
        self._report(
            result, origin, took, drift and not local_rotation, pending, foreign, compare, why
        )
        self._count_watched()

    def _check_secret(self) -> None:
        """The secret file still holds the loaded secret? A change is logged once (and
        cleared once), kept for `mtd status` in daemon.json, and changes nothing else."""
        problem = files.secret_problem(self.secret_file, self.secret)
        if problem == self.secret_problem:
            return
        self.secret_problem = problem
        if problem:
            event(
                self.log,
                logging.ERROR,
                "secret",
                f"{problem}: still using the secret loaded at start (the mapping does not "
                "change); restore the file, or reload (SIGHUP, systemctl reload mtd) to take "
                "a new one",
                error=problem,
            )
        else:
            event(self.log, logging.INFO, "secret", f"{self.secret_file}: holds the loaded secret")
        self._write_status()

    def _exit(self) -> None:
        self._write_status(running=False)
        removed = ""
        self.monitor = None  # stopped: the removal below is ours
        if self.options.down_on_exit:
            try:
                with files.reconcile_lock(self.state.epoch_file):
                    changed, done = take_down(self.state, self.nft)
                removed = ", " + "; ".join(done)
                if changed:
                    self._audit_down()
            except MtdError as exc:
                removed = f", table not removed: {'; '.join(exc.problems)}"
        else:
            removed = f", table inet {self.state.table} left in place"
        event(
            self.log,
            logging.INFO,
            "stop",
            f"stopped at epoch {self.applied}{removed}",
            epoch=self.applied,
        )

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def stop(signum: int, _: FrameType | None) -> None:
            self.request_stop()

        def reload(signum: int, _: FrameType | None) -> None:
            self.request_reload()

        old = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
