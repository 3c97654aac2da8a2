"""`mtd run`: keep this host converged, forever, to the desired state at the fleet's epoch.

Triggers only decide when `reconcile.reconcile` runs: at start, on a Redis trigger or a
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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
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

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily

from reconciler import __version__, defaults
from reconciler.adapters import auditlog, bus, files, watchstore
from reconciler.adapters.credentials import redact
from reconciler.adapters.kernel import Backend
from reconciler.core import diff, render, repair, shuffle, watch
from reconciler.core.state import State
from reconciler.core.state import warnings as state_warnings
from reconciler.errors import MtdError
from reconciler.logs import LOGGER, event
from reconciler.services import watching
from reconciler.services.reconcile import (
    Result,
    provision_secret,
    reconcile,
    repair_events,
    take_down,
)

LOG = logging.getLogger(f"{LOGGER}.daemon")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RETRY = 30.0  # seconds before a failed pass is tried again (at most)
NOTICE_GAP = 1.0  # at most one notice-driven pull per this many seconds (bursts coalesce)
RECONNECT_SPREAD = 10.0  # seconds over which a fleet's pulls after a Redis outage spread
LOCAL_EPOCH_CHECK = 1.0  # seconds between looks at the epoch file (a local `mtd rotate`)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


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


class Metrics:
    """Prometheus metrics of one daemon (own registry, served by `--metrics`)."""

    def __init__(self, pull: bool = False) -> None:
        """`pull`: also the metrics of `--pull` (not exported at 0 by a daemon that never pulls)."""
        # No `_created` series: a timestamp per series that no dashboard reads, doubling what
        # every scrape carries (a process-wide switch of prometheus-client).
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        self.build = Gauge(
            "mtd_build_info", "1, labelled with the running mtd's version", ["version"], registry=r
        )
        self.build.labels(__version__).set(1)
        self.in_sync = Gauge(
            "mtd_in_sync",
            "1 while the last pass succeeded at the highest epoch known (and, with --pull, "
            "at the branch head): what mtd fleet status shows as converged",
            registry=r,
        )
        self.last_success = Gauge(
            "mtd_last_success_timestamp_seconds",
            "Unix time the last reconcile pass succeeded (0: none yet)",
            registry=r,
        )
        self.redis_reconnects = Counter(
            "mtd_redis_reconnects",
            "Times the Redis subscription came back after a loss",
            registry=r,
        )
        self.reconciles = Counter(
            "mtd_reconciles", "Reconcile passes by result", ["result"], registry=r
        )
        self.duration = Histogram(
            "mtd_reconcile_duration_seconds", "Duration of a reconcile pass", registry=r
        )
        self.latency = Histogram(
            "mtd_trigger_to_applied_seconds",
            "From a trigger's publish time to its epoch being live",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.epoch = Gauge("mtd_epoch", "Epoch of the live mapping", registry=r)
        self.drift = Counter(
            "mtd_drift_corrections", "Owned table changed by someone else, restored", registry=r
        )
        self.redis_up = Gauge("mtd_redis_connected", "1 while subscribed to Redis", registry=r)
        self.triggers = Counter(
            "mtd_triggers", "Trigger messages by outcome", ["outcome"], registry=r
        )
        self.notices = Counter(
            "mtd_pull_notices", "Pull notices received, by outcome", ["outcome"], registry=r
        )
        self.audit_failures = Counter(
            "mtd_audit_failures",
            "Changes applied whose audit line could not be written",
            registry=r,
        )
        self.events_up = Gauge(
            "mtd_events_up", "1 while the kernel's nftables change events are followed", registry=r
        )
        self.events_lost = Counter(
            "mtd_events_lost",
            "Times nftables events were lost (or unavailable): a full compare ran instead",
            registry=r,
        )
        self.drift_missed = Counter(
            "mtd_drift_missed_by_events",
            "Drift found by a full compare that no event had reported",
            registry=r,
        )
        self.repair = Histogram(
            "mtd_drift_repair_seconds",
            "From the event of someone else's change to the owned table to its repair",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        if pull:
            self.pulls = Counter("mtd_pulls", "Git pull rounds by outcome", ["outcome"], registry=r)
            self.pull_head_rejected = Gauge(
                "mtd_pull_head_rejected",
                "1 while the branch head is a commit not applied",
                registry=r,
            )
            self.pull_fetch_failures = Gauge(
                "mtd_pull_fetch_failures",
                "Consecutive failed fetches of the state repository",
                registry=r,
            )
            for outcome in ("applied", "unchanged", "rejected", "unreachable", "error"):
                self.pulls.labels(outcome)
        for result in ("changed", "ok", "error"):
            self.reconciles.labels(result)
        for outcome in ("accepted", "rejected"):
            self.notices.labels(outcome)
        for outcome in ("accepted", "rejected", "stale"):
            self.triggers.labels(outcome)
        self.watched = Gauge(
            "mtd_watched_sources",
            "Dynamic sources watched (mtd watch, Redis, the tripwire), by origin",
            ["origin"],
            registry=r,
        )
        self.watches = Counter(
            "mtd_watch_messages", "Watch messages received, by outcome", ["outcome"], registry=r
        )
        for origin in watch.ORIGINS:
            self.watched.labels(origin)
        for outcome in ("accepted", "rejected"):
            self.watches.labels(outcome)
        self.packets = Packets(lambda: None)  # the daemon gives it the kernel to read
        r.register(self.packets)  # type: ignore[arg-type]

    def serve(self, address: str) -> None:
        """In a background thread, for as long as the process lives."""
        host, port = parse_address(address)
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MtdError(f"--metrics {address}: cannot listen: {exc.strerror or exc}") from None


PACKET_KINDS = ("moved", "stateless", "real_port", "tripwire")
PACKET_FAMILIES = ("ip", "ip6")
COUNTER_OF = {"tripwire": "trip"}  # kind -> the ruleset's counter prefix, when they differ


class Packets:
    """`mtd_packets_total{kind,family}`: the ruleset's named counters (`KIND_FAMILY`), kept
    monotonic although every rotation replaces the table and its counters with it: the
    values read just before a replacement are carried, and nothing exported ever goes down.
    Read from the kernel at each scrape (a listing of counter objects only: no elements)."""

    def __init__(self, read: Callable[[], dict[str, int] | None]) -> None:
        self.read = read  # the live counters, callable from the HTTP thread
        self.carried: dict[str, int] = {}
        self.last: dict[str, int] = {}  # the last live values seen (the table may vanish)
        self.exported: dict[str, int] = {}
        self._lock = threading.Lock()

    def snapshot(self, live: dict[str, int] | None) -> dict[str, int]:
        """The live values (or the last ones seen, when the table is gone)."""
        with self._lock:
            if live is not None:
                self.last = dict(live)
            return dict(self.last)

    def replaced(self, before: dict[str, int]) -> None:
        with self._lock:
            for name, packets in before.items():
                self.carried[name] = self.carried.get(name, 0) + packets
            self.last = {}

    def totals(self) -> dict[str, int]:
        try:
            live = self.read()
        except MtdError:
            live = None
        with self._lock:
            if live is not None:
                self.last = dict(live)
            for kind in PACKET_KINDS:
                for family in PACKET_FAMILIES:
                    name = f"{kind}_{family}"
                    counter = f"{COUNTER_OF.get(kind, kind)}_{family}"
                    now = self.carried.get(counter, 0) + self.last.get(counter, 0)
                    self.exported[name] = max(self.exported.get(name, 0), now)
            return dict(self.exported)

    def describe(self) -> list[CounterMetricFamily]:
        return [self._family()]

    def collect(self) -> list[CounterMetricFamily]:
        family = self._family()
        for name, value in sorted(self.totals().items()):
            kind, fam = name.rsplit("_", 1)
            family.add_metric([kind, fam], value)
        return [family]

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "mtd_packets",
            "Packets counted by the ruleset: moved (new connections from watched sources to "
            "a moved port), stateless (probes rewritten), real_port (new connections from a "
            "watched source to the real port of a service moved for it: a leak signal), "
            "tripwire (packets of unlisted sources to a tripwire port: trips)",
            labels=["kind", "family"],
        )


def parse_address(text: str) -> tuple[str, int]:
    """`127.0.0.1:9108`, `[::1]:9108` or `:9108` (every address)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise MtdError(
            f"--metrics {text!r}: expected ADDR:PORT such as 127.0.0.1:9108 or [::1]:9108"
        )
    return host or "::", int(port)


@dataclass
class _Event:
    kind: str  # trigger | pull | reload | stop | foreign | lost | watch
    trigger: bus.Trigger | None = None
    order: Any = None  # bus.WatchOrder of `watch`
    change: Any = None  # monitor.Change of `foreign`
    reason: str = ""  # of `lost`, `pull`
    at: float = 0.0  # monotonic time the event arrived


class Subscribe(Protocol):
    """How the daemon follows the bus: `bus.start_subscriber`, or a stand-in in tests that
    feed `trigger()` themselves."""

    def __call__(
        self, config: bus.BusConfig, sink: Any, *, wait: float = 0.0, logger: logging.Logger
    ) -> Any: ...


class Daemon:
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
        self._queue: queue.Queue[_Event] = queue.Queue()
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
        self.subscriber: bus.Subscriber | None = None
        self.puller = puller
        self._next_pull = float("inf") if puller is None else time.monotonic() + puller.next_delay()
        self.monitor = monitor
        self._subscribe: Subscribe = subscribe or bus.start_subscriber
        self._trusted = False  # the table is as the last pass left it (events say so)
        self._foreign: list[_Event] = []  # changes by others, not yet repaired
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
        self._queue.put(_Event("trigger", trigger))

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
        self._queue.put(_Event("watch", order=order, reason=origin))

    def crowdsec_orders(self, orders: list[bus.WatchOrder]) -> None:
        """CrowdSec's decisions (from the follower's thread): to the fleet, as `mtd watch`
        does; on this host alone without Redis, or while it cannot take them."""
        config = self.bus_config
        if config is not None:
            try:
                _, problems = bus.publish_watches(config, orders)
            except MtdError as exc:
                problem = "; ".join(exc.problems)
                event(
                    self.log,
                    logging.WARNING,
                    "crowdsec",
                    f"{problem}: CrowdSec decisions applied on this host alone, published to "
                    "the fleet once Redis is back",
                    error=problem,
                )
                kept = [
                    {"op": o.op, "source": o.source, "reason": o.reason, "origin": o.origin,
                     "expires_at": o.expires_at if o.op == "add" else 0}
                    for o in orders
                ]  # fmt: skip
                with contextlib.suppress(MtdError):
                    watchstore.keep_unpublished(self.state.epoch_file, kept)
            else:
                for problem in problems:
                    event(self.log, logging.ERROR, "crowdsec", problem, error=problem)
                return
        for order in orders:
            self._queue.put(_Event("watch", order=order, reason="crowdsec"))

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
        self._queue.put(_Event("foreign", change=change, at=time.monotonic()))

    def lost(self, reason: str) -> None:
        self._queue.put(_Event("lost", reason=reason, at=time.monotonic()))

    def pull_now(self, reason: str) -> None:
        if reason == "notice":
            self.metrics.notices.labels("accepted").inc()
        self._queue.put(_Event("pull", reason=reason))

    def pull_ignored(self) -> None:
        self.metrics.notices.labels("rejected").inc()

    def heartbeat(self) -> dict[str, Any]:
        """What `mtd fleet status` shows of this host: no secret, no mapping, no URL."""
        known = self.known_epoch()
        pull = self._pull_info
        error = self._last_error or (pull["error"] if pull else None)
        in_sync = self.in_sync()
        return {
            "host": self.host,
            "epoch": self.applied,
            "fleet_epoch": known,
            "commit": pull["commit"] if pull else None,
            "head": pull["head"] if pull else None,
            "pull_rejected": bool(pull and pull["rejected"]),
            "in_sync": bool(in_sync),
            "result": self._last_result,
            "error": redact(error) if error else None,
            "version": __version__,
            "time": round(time.time(), 3),
            "started": round(self._started, 3),
            "ttl": self.bus_config.heartbeat_ttl if self.bus_config else None,
        }

    def in_sync(self) -> bool:
        """The last pass succeeded at the highest epoch known, and with `--pull` at the
        branch head (also read by the metrics thread: a snapshot of plain attributes)."""
        pull = self._pull_info
        return (
            self._last_result in ("ok", "changed")
            and self.applied >= self.known_epoch()
            and (pull is None or (pull["commit"] is not None and pull["head"] == pull["commit"]))
        )

    def _read_pull_info(self) -> dict[str, Any] | None:
        if self.puller is None:
            return None
        from reconciler.services import gitops  # only with --pull

        s = gitops.summary(gitops.read_record(self.puller.config.record_path))
        return {
            "commit": s["applied"],
            "head": s["head"],
            "rejected": bool(s["error"]),
            "error": s["error"],
        }

    def _beat(self) -> None:
        if self.subscriber is not None:
            self.subscriber.beat()

    # -- requests (signal handlers, tests) -----------------------------------------------

    def request_reload(self) -> None:
        self._queue.put(_Event("reload"))

    def request_stop(self) -> None:
        self._stop_requested.set()
        self._queue.put(_Event("stop"))

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
        if self._scrape_nft is None:
            self._scrape_nft = type(self.nft)()
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
        if self._watches:
            return 0.0
        now = time.monotonic()
        until = min(self._next_drift, self._next_pull, now + LOCAL_EPOCH_CHECK)
        if self._dirty:
            until = now if self._foreign else min(until, self._last_run + self.min_interval)
        return max(0.0, until - now)

    def _drain(self, timeout: float) -> None:
        """Fold every queued event into the pending work: bursts become one pass."""
        try:
            ev: _Event | None = self._queue.get(timeout=timeout) if timeout > 0 else None
        except queue.Empty:
            return
        while True:
            if ev is not None:
                self._fold(ev)
            try:
                ev = self._queue.get_nowait()
            except queue.Empty:
                return

    def _fold(self, ev: _Event) -> None:
        if ev.kind == "stop":
            self._stopping = True
        elif ev.kind == "reload":
            self._reload(secret=True)
        elif ev.kind == "pull" and self.puller is not None:
            # Coalesced: at most one notice-driven round per NOTICE_GAP (or pull interval).
            # After a reconnect (a notice may have been missed) the fleet does not all fetch
            # at the same moment: each host waits a random part of RECONNECT_SPREAD.
            gap = min(NOTICE_GAP, self.puller.config.interval)
            soon = max(time.monotonic(), self._last_pull + gap)
            if ev.reason == "reconnect":
                soon += random.uniform(0, min(RECONNECT_SPREAD, self.puller.config.interval))
            self._next_pull = min(self._next_pull, soon)
        elif ev.kind == "trigger" and ev.trigger and ev.trigger.epoch > self.target:
            self.target = ev.trigger.epoch
            self._pending = ev.trigger
            self._dirty = True
            if self._origin != "start":
                self._origin = "redis"
        elif ev.kind == "foreign" and ev.change.generation > self._covered:
            self._foreign.append(ev)
            self._dirty = True
            if self._origin == "drift":
                self._origin = "events"
        elif ev.kind == "watch":
            self._watches.append(ev.order)
        elif ev.kind == "lost":
            self._trusted = False
            self._dirty = True
            self.metrics.events_lost.inc()
            event(
                self.log,
                logging.WARNING,
                "events",
                f"nftables events lost ({ev.reason}): comparing the table in full",
                error=ev.reason,
            )

    def _warn(self, state: State) -> None:
        """What the state declares that cannot work (`core.state.warnings`), one line each,
        as every command that loads it says."""
        for line in state_warnings(state):
            event(self.log, logging.WARNING, "state", line, warning=line)

    def _reload(self, secret: bool = False) -> None:
        """SIGHUP (`secret`): a new state is taken only if it validates and renders, and the
        secret file is read again (a missing or unreadable one: the loaded secret is kept).
        After a pulled commit: the state only."""
        try:
            state = self.load()
            render.check(state, self.templates)
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
        try:
            with files.reconcile_lock(state.epoch_file), self._quiet() as window:
                local = files.read_epoch(state.epoch_file)
                epoch = max(self.target, local)
                result, why = None, ""
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
                    blind = not compare and (bool(foreign) or epoch != previous)
                    counted = self._counters_before()
                    result = reconcile(
                        state,
                        epoch,
                        self.nft,
                        secret=self.secret,
                        templates=self.templates,
                        read_live=not blind,
                        dynamic=watching.gather(state, self.nft, write=True),
                    )
                    if result.status == "changed":  # replaced: its counters start at zero
                        self.packets.replaced(counted)
                    if window is not None:
                        self._covered = max(self._covered, window.before)
                if epoch != local:
                    files.write_epoch(state.epoch_file, epoch)
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

    def _apply_watches(self) -> None:
        """Watch changes from the fleet: the store, then one small element transaction in
        dyn4/dyn6 (never a table replacement). For each source the last change wins."""
        orders, self._watches = self._watches, []
        last = {o.source: o for o in orders}
        nets = watching.trusted(self.state)
        now = time.time()
        add, remove, release = [], [], []
        for o in last.values():
            if o.op == "del" and o.origin == "crowdsec":  # never ends an operator's watch
                release.append((o.source, o.origin))
                continue
            if o.op == "del":
                remove.append(o.source)
                continue
            try:
                watch.canonical(o.source, nets)
            except MtdError as exc:
                self.metrics.watches.labels("rejected").inc()
                event(self.log, logging.WARNING, "rejected", f"watch add ignored: {exc}")
                continue
            if o.expires_at - now >= 1:
                add.append(watch.Entry(o.source, o.origin, o.reason, o.expires_at))
        if not add and not remove and not release:
            return
        try:
            with files.reconcile_lock(self.state.epoch_file), self._quiet():
                out = watching.change(self.state, self.nft, add, remove, now=now, release=release)
        except MtdError as exc:
            problem = "; ".join(exc.problems)
            event(
                self.log, logging.ERROR, "watch", f"watch change failed: {problem}", error=problem
            )
            return
        for problem in out.problems:
            event(self.log, logging.ERROR, "watch", problem, error=problem)
        self._count_watched()
        event(
            self.log,
            logging.INFO,
            "watch",
            out.line(self.state.table),
            added=[e.source for e in out.added],
            removed=out.removed,
            kernel=out.kernel,
        )

    def _count_watched(self) -> None:
        """`mtd_watched_sources{origin}` from the store (tripwire entries once harvested)."""
        try:
            entries = watchstore.load(watchstore.path_for(self.state.epoch_file))
        except MtdError:
            return
        for origin, n in watch.counts(entries, time.time()).items():
            self.metrics.watched.labels(origin).set(n)

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

    def _write_status(self, running: bool = True) -> None:
        """daemon.json: what `mtd status` shows of this daemon (no secret, no URL password);
        removed when it stops."""
        path = files.daemon_status_path(self.state.epoch_file)
        config = self.bus_config
        try:
            with self._status_lock:
                if not running:
                    path.unlink(missing_ok=True)
                    return
                status = {
                    "pid": os.getpid(),
                    "started": round(self._started, 3),
                    "secret_problem": self.secret_problem,
                    "redis": None
                    if config is None
                    else {
                        "where": config.where,
                        "connected": self._redis_connected,
                        "last_trigger": self._last_trigger,
                    },
                    "last_pass": self._last_pass,
                }
                text = json.dumps(status) + "\n"
                files.write_atomic(path, text, mode=0o600, sync=False)
        except (OSError, MtdError) as exc:
            problem = "; ".join(getattr(exc, "problems", [f"{path}: {exc}"]))
            event(self.log, logging.ERROR, "error", problem, error=problem)

    def _failed(self, origin: str, problem: str, took: float) -> None:
        """The next try comes with the drift timer, sooner when that is an hour away."""
        retry = min(self.drift_interval, RETRY)
        self._next_drift = self._last_run + retry
        self._last_result, self._last_error = "error", problem
        self._last_pass = {
            "time": round(time.time(), 3),
            "result": "error",
            "epoch": self.target,
            "error": redact(problem),
        }
        self._write_status()
        self._beat()
        self.metrics.reconciles.labels("error").inc()
        event(
            self.log,
            logging.ERROR,
            "reconcile",
            f"failed (trigger {origin}): {problem}: retrying in {retry:g} s",
            result="error",
            origin=origin,
            epoch=self.target,
            error=problem,
            duration=round(took, 6),
        )

    def _report(
        self,
        result: Result,
        origin: str,
        took: float,
        drift: bool,
        pending: bus.Trigger | None,
        foreign: list[_Event],
        compared: bool,
        why: str = "",
    ) -> None:
        self._last_result, self._last_error = result.status, None
        now = time.time()
        self._last_pass = {"time": round(now, 3), "result": result.status, "epoch": result.epoch}
        self._write_status()
        self._beat()
        m = self.metrics
        m.last_success.set(now)
        m.reconciles.labels(result.status).inc()
        m.duration.observe(took)
        m.epoch.set(result.epoch)
        fields: dict[str, Any] = {
            "result": result.status,
            "origin": origin,
            "epoch": result.epoch,
            "duration": round(took, 6),
            "summary": dict(sorted(_summary(result).items())),
            "fingerprint": result.fingerprint,
        }
        if pending is not None and pending.published is not None and result.epoch == pending.epoch:
            latency = max(0.0, time.time() - pending.published)
            m.latency.observe(latency)
            fields["latency"] = round(latency, 6)
        level = logging.INFO if result.status == "changed" or origin != "drift" else logging.DEBUG
        event(self.log, level, "reconcile", f"{result.line()}, trigger {origin}", **fields)
        if drift:
            m.drift.inc()
            self._drift(result, foreign, compared, why)
        if result.status == "changed":
            self._audit(result, "drift" if drift else origin)
            if self.options.log_mapping:
                self._log_mapping(result.epoch)

    def _drift(self, result: Result, foreign: list[_Event], compared: bool, why: str) -> None:
        """Who changed the table (from the events), how it was repaired (one small
        transaction, or the table replaced, and why) and how long that took; or, from a full
        compare that no event announced, that the events missed it."""
        now = time.monotonic()
        summary = _summary(result)
        fields: dict[str, Any] = {"epoch": result.epoch, "summary": summary}
        what = ", ".join(f"{k} {n}" for k, n in sorted(summary.items()))
        if foreign:
            first = foreign[0]
            took = now - first.at
            self.metrics.repair.observe(took)
            by = sorted({f"{e.change.process or '?'} (pid {e.change.pid})" for e in foreign})
            seen = "; ".join(e.change.text() for e in foreign)
            fields |= {
                "found_by": "events",
                "by": [e.change.process for e in foreign],
                "pids": [e.change.pid for e in foreign],
                "generations": [e.change.generation for e in foreign],
                "changes": seen,
                "repair_seconds": round(took, 6),
                "repair": "events" if result.repaired else "table",
            }
            if result.repaired:
                fields["repaired"] = result.repaired
                how = f"by one transaction: {result.repaired}"
            else:
                fields["replaced_because"] = why
                how = f"by replacing the table: {why}" if why else "by replacing the table"
            message = (
                f"table inet {result.table} was changed outside mtd by {', '.join(by)}: "
                f"{seen}; restored in {took:.3f} s {how} ({what})"
            )
        else:
            missed = self.monitor is not None and compared
            if missed:
                self.metrics.drift_missed.inc()
            fields["found_by"] = "compare"
            fields["missed_by_events"] = missed
            message = f"table inet {result.table} was changed outside mtd: restored ({what})"
            if missed:
                message += "; no nftables event had reported it"
        event(self.log, logging.WARNING, "drift", message, **fields)

    def _audit(self, result: Result, origin: str) -> None:
        """After a change: a failure to record it is reported, never undone or retried (the
        change is what the desired state asks for)."""
        try:
            auditlog.log_result(self.state, result, origin=origin, host=self.host)
        except (MtdError, ValueError) as exc:
            self.metrics.audit_failures.inc()
            problem = "; ".join(getattr(exc, "problems", [str(exc)]))
            event(
                self.log,
                logging.ERROR,
                "audit",
                problem,
                result="audit failed",
                epoch=result.epoch,
                error=problem,
            )

    def _log_mapping(self, epoch: int) -> None:
        """Only with --log-mapping: the ports each watched source sees (sensitive)."""
        for (source, proto), moves in sorted(
            shuffle.compute(self.state, self.secret, epoch).moves.items()
        ):
            pairs = " ".join(f"{real}->{hidden}" for real, hidden in sorted(moves.items()))
            event(
                self.log,
                logging.INFO,
                "mapping",
                f"epoch {epoch}: {source} {proto} {pairs}",
                epoch=epoch,
                source=source,
                proto=proto,
                moves={str(k): v for k, v in sorted(moves.items())},
            )

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

    def _audit_down(self) -> None:
        try:
            auditlog.log_down(self.state, origin="manual", host=self.host)
        except MtdError as exc:  # the table is gone all the same: say it was not recorded
            self.metrics.audit_failures.inc()
            problem = "; ".join(exc.problems)
            event(self.log, logging.ERROR, "audit", f"removed, audit failed: {problem}")

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


def _summary(result: Result) -> dict[str, int]:
    return diff.summary(result.changes)
