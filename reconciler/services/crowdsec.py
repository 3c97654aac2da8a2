"""`mtd run` follows a CrowdSec Local API: its ban decisions become dynamic sources.

A thread pulls the decision stream every `crowdsec.interval` seconds: first (and after any
failure: the Local API restarted, or was away) the whole list (`startup=true`), then what
changed. What the book of live decisions says differs from what was last handed on becomes
watch orders (origin crowdsec), which the daemon publishes to the fleet like `mtd watch`
(or, without Redis or while it is down, applies on this host). A resync compares with what
was handed on, so nothing is lost while the Local API is away and nothing is applied twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from reconciler.adapters import crowdsec as lapi
from reconciler.adapters.bus import WatchOrder
from reconciler.core import crowdsec
from reconciler.core.crowdsec import Units
from reconciler.errors import MtdError
from reconciler.logs import event

MAX_LINES = 10  # problem lines logged for one pull; the rest are counted


class Follower:
    """One Local API followed in a thread; `sink(orders)` is called from that thread."""

    def __init__(
        self,
        config: lapi.Config,
        sink: Callable[[list[WatchOrder]], None],
        *,
        held: Callable[[], Units],
        trusted: Callable[[], list[Any]],
        logger: logging.Logger,
        client: Any = None,
        metrics: Any = None,
    ) -> None:
        """`held`: the crowdsec entries the store holds (what a previous run handed on);
        `client`: a stand-in for `adapters.crowdsec.Lapi` in tests. Reads the key file
        here, so a missing or readable-by-others key stops `mtd run` at its start."""
        self.config, self.sink, self.held, self.trusted, self.log = (
            config,
            sink,
            held,
            trusted,
            logger,
        )
        self.client = client or lapi.Lapi(config.url, lapi.read_key(config.key_file))
        self.book = crowdsec.Book()
        self.sent: Units | None = None  # what was handed on; None: read `held` first
        self.synced = False
        self.up: bool | None = None
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mtd-crowdsec", daemon=True)

    def start(self) -> Follower:
        event(
            self.log,
            logging.INFO,
            "crowdsec",
            f"following the decisions of crowdsec {self.config.where} every "
            f"{self.config.interval:g} s",
            crowdsec=self.config.where,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 0.5) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def pull(self, now: float | None = None) -> list[WatchOrder]:
        """One pull of the stream: the orders that bring what was handed on to what the
        decisions say. `LapiError` leaves everything as it was (the next pull resyncs)."""
        try:
            new, deleted = self.client.stream(startup=not self.synced)
        except MtdError:
            self.synced = False
            raise
        now = time.time() if now is None else now
        before = self.held() if self.sent is None else self.sent
        if self.synced:
            problems = self.book.delta(new, deleted, now)
        else:
            problems = self.book.full(new, now)
            self.synced = True
        after = self.book.units(now)
        add, remove, refused = crowdsec.changes(before, after, now, self.trusted())
        self._problems(problems + refused)
        self.sent = after
        orders = [
            WatchOrder("add", e.source, crowdsec.left(e.expires_at, now), e.reason, now, "crowdsec")
            for e in add
        ]
        orders += [WatchOrder("del", s, 0, "", now, "crowdsec") for s in remove]
        if self.metrics is not None:
            self.metrics.crowdsec_decisions.set(len(self.book.decisions))
        return [o for o in orders if o.op == "del" or o.seconds >= 1]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                orders = self.pull()
            except MtdError as exc:
                self._connection(False, "; ".join(exc.problems))
            except Exception as exc:  # a bug must not end the following (nor the daemon)
                self._connection(False, f"internal error: {type(exc).__name__}: {exc}")
            else:
                self._connection(True)
                if orders:
                    self.sink(orders)
            self._stop.wait(self.config.interval)

    def _connection(self, up: bool, problem: str = "") -> None:
        if self.metrics is not None:
            self.metrics.crowdsec_up.set(1 if up else 0)
        if up == self.up:
            return
        was, self.up = self.up, up
        if up:
            if was is False:
                event(
                    self.log,
                    logging.INFO,
                    "crowdsec",
                    f"crowdsec {self.config.where} answers again: decisions resynchronised",
                    crowdsec=self.config.where,
                )
            return
        event(
            self.log,
            logging.WARNING,
            "crowdsec",
            f"{problem}: keeping the decisions held, retrying every {self.config.interval:g} s",
            crowdsec=self.config.where,
            error=problem,
        )

    def _problems(self, problems: list[str]) -> None:
        for line in problems[:MAX_LINES]:
            event(self.log, logging.WARNING, "crowdsec", f"decision refused: {line}", error=line)
        if len(problems) > MAX_LINES:
            more = len(problems) - MAX_LINES
            event(self.log, logging.WARNING, "crowdsec", f"and {more} more decisions refused")


def register(metrics: Any) -> None:
    """The follower's metrics, in the daemon's registry (only when it follows a Local API:
    a host without CrowdSec exports no `connected 0` to alert on)."""
    if hasattr(metrics, "crowdsec_up"):
        return
    from prometheus_client import Gauge

    metrics.crowdsec_up = Gauge(
        "mtd_crowdsec_connected",
        "1 while the CrowdSec Local API answers",
        registry=metrics.registry,
    )
    metrics.crowdsec_decisions = Gauge(
        "mtd_crowdsec_decisions",
        "CrowdSec ban decisions held (each watches one or more sources)",
        registry=metrics.registry,
    )


def follower(state: Any, daemon: Any) -> Follower | None:
    """The follower `crowdsec:` of the host's configuration asks for (None without one),
    handing its orders to `daemon.crowdsec_orders`; `MtdError` for a bad key file."""
    config = lapi.Config.from_state(state)
    if config is None:
        return None
    metrics = daemon.metrics
    register(metrics)

    def held() -> Units:
        from reconciler.adapters import watchstore

        try:
            entries = watchstore.load(watchstore.path_for(daemon.state.epoch_file))
        except MtdError:
            return {}
        return {
            s: (e.expires_at, e.reason)
            for s, e in entries.items()
            if e.origin == crowdsec.ORIGIN and e.left(time.time()) >= 1
        }

    return Follower(
        config,
        daemon.crowdsec_orders,
        held=held,
        trusted=lambda: list(daemon.state.trusted),
        logger=daemon.log,
        metrics=metrics,
    )


def reloaded(daemon: Any, state: Any) -> Follower | None:
    """After a reload (SIGHUP): the same follower when `crowdsec:` did not change; else the
    old one stopped and the new one started (a bad key file is logged, none followed)."""
    old = daemon.crowdsec
    config = lapi.Config.from_state(state)
    if old is not None and old.config == config:
        return old
    if old is not None:
        old.stop(timeout=0.1)
    if config is None:
        return None
    try:
        new = follower(state, daemon)
    except MtdError as exc:
        problem = "; ".join(exc.problems)
        event(daemon.log, logging.ERROR, "crowdsec", f"not followed: {problem}", error=problem)
        return None
    return new.start() if new is not None else None
