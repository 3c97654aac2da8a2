"""The daemon's Prometheus metrics (its own registry, served by `--metrics`), and the
packets collector that keeps `mtd_packets_total` monotonic across table replacements."""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily

from reconciler import __version__
from reconciler.core import watch
from reconciler.errors import MtdError

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


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
