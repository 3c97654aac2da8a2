"""The daemon's logic against the in-memory kernel: no root, no Redis, no namespace.

The loop is driven as the bus would drive it (`trigger()`, `request_reload()`,
`request_stop()`), and every assertion waits for the log event it needs, never for time.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters import bus, files
from reconciler.adapters.fake import FakeKernel
from reconciler.services.daemon import Daemon, Options
from tests.conftest import write_state

Event = dict[str, Any]
_names = itertools.count()


class Recorder(logging.Handler):
    """The daemon's events as dicts, with a wait for the one a test needs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[Event] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        ev = {
            "event": getattr(record, "mtd_event", "log"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "at": time.monotonic(),
            **(getattr(record, "mtd_fields", None) or {}),
        }
        with self.changed:
            self.events.append(ev)
            self.changed.notify_all()

    def wait(self, pred: Callable[[Event], bool], since: int = 0, timeout: float = 20) -> Event:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for ev in self.events[since:]:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; events: {self.events}"
                self.changed.wait(left)

    def passes(self, since: int = 0) -> list[Event]:
        return [e for e in self.events[since:] if is_pass(e)]

    def mark(self) -> int:
        return len(self.events)


def is_pass(e: Event) -> bool:
    return e["event"] == "reconcile" and e.get("result") in ("changed", "ok")


class NoBus:
    """Stands in for the Redis subscriber: the test calls `trigger()` itself."""

    def __init__(self, *_: Any, **__: Any) -> None:
        self.stopped = False

    def stop(self, timeout: float = 0) -> None:
        self.stopped = True

    def beat(self) -> None:
        """Heartbeats go nowhere: there is no Redis."""


class Run:
    """One daemon on a FakeKernel, its loop in a thread."""

    def __init__(self, tmp: Path, min_interval: float = 0.0, drift: float = 60.0) -> None:
        self.state_path = write_state(tmp / "state.yaml", redis={"min_interval": min_interval})
        self.kernel = FakeKernel()
        self.log = Recorder()
        logger = logging.getLogger(f"mtd.test{next(_names)}")
        logger.addHandler(self.log)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        self.daemon = Daemon(
            lambda: files.load_state(self.state_path),
            self.kernel,
            host="h1",
            options=Options(drift_interval=drift, start_wait=0),
            logger=logger,
            subscribe=NoBus,
        )
        self.thread = threading.Thread(target=self.daemon.serve, daemon=True)

    @property
    def state(self) -> Any:
        return files.load_state(self.state_path)

    def start(self) -> Run:
        self.thread.start()
        return self

    def trigger(self, epoch: int, published: float | None = None) -> None:
        self.daemon.trigger(bus.Trigger(epoch, published or time.time(), "message"))

    def applied(self, epoch: int, since: int = 0) -> Event:
        return self.log.wait(lambda e: is_pass(e) and e["epoch"] == epoch, since)

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def make(**kw: Any) -> Run:
        r = Run(tmp_path, **kw)
        runs.append(r)
        return r

    yield make
    for r in runs:
        if r.thread.is_alive():
            r.stop()


def test_start_converges_then_each_trigger_applies_its_epoch_in_order(run):
    r = run().start()
    first = r.applied(0)
    assert (first["origin"], first["result"]) == ("start", "changed")
    assert r.kernel.sysctls == {"net/ipv4/fwmark_reflect": "1", "net/ipv6/fwmark_reflect": "1"}
    for epoch in (1, 2, 3):
        mark = r.log.mark()
        r.trigger(epoch)
        ev = r.applied(epoch, mark)
        assert (ev["origin"], ev["result"]) == ("redis", "changed")
        assert files.read_epoch(r.state.epoch_file) == epoch
    r.trigger(2)  # older than the applied epoch: never goes back
    r.stop()
    assert [e["epoch"] for e in r.log.passes()] == [0, 1, 2, 3]
    assert len(r.kernel.applied) == 4
    assert r.log.events[-1]["event"] == "stop"


def test_a_burst_queued_before_a_pass_costs_one_pass_and_the_highest_epoch_wins(run):
    r = run()
    for epoch in (3, 1, 7, 5, 2):
        r.trigger(epoch)
    r.start()
    r.applied(7)
    r.stop()
    assert [(e["epoch"], e["origin"]) for e in r.log.passes()] == [(7, "start")]
    assert len(r.kernel.applied) == 1
    assert files.read_epoch(r.state.epoch_file) == 7


def test_passes_are_spaced_by_min_interval_and_coalesce_what_comes_meanwhile(run):
    r = run(min_interval=0.4).start()
    r.applied(0)
    mark = r.log.mark()
    for epoch in range(1, 11):
        r.trigger(epoch)
    last = r.applied(10, mark)
    r.stop()
    passes = r.log.passes(mark)
    assert passes[-1] is last and 1 <= len(passes) <= 2, passes  # the burst: two passes at most
    # min_interval spaces the starts of passes; a log line comes when its pass ends, and a
    # slow first pass on a loaded machine would make the ends closer than the starts.
    starts = [e["at"] - e["duration"] for e in r.log.passes()]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g >= 0.4 - 0.01 for g in gaps), gaps  # never closer than min_interval


def test_a_refused_pass_is_logged_and_retried_at_the_next_drift_check(run):
    r = run(drift=0.2).start()
    r.applied(0)
    r.kernel.refuse(index=1, times=2)  # the next two transactions are refused
    mark = r.log.mark()
    r.trigger(1)
    failed = r.log.wait(lambda e: e["event"] == "reconcile" and e["result"] == "error", mark)
    assert failed["level"] == "error" and failed["epoch"] == 1 and failed["origin"] == "redis"
    assert failed["error"].startswith("nftables refused rendered command 1 (add chain ")
    assert "retrying in 0.2 s" in failed["message"]
    ev = r.applied(1, mark)
    assert (ev["origin"], ev["result"]) == ("drift", "changed")  # the retry
    r.stop()
    errors = [e for e in r.log.events[mark:] if e.get("result") == "error"]
    assert len(errors) == 2  # refused twice, then applied; never fatal
    assert files.read_epoch(r.state.epoch_file) == 1  # written only after the success
    assert r.daemon.metrics.reconciles.labels("error")._value.get() == 2


def test_drift_is_restored_reported_and_audited(run):
    r = run(drift=0.1).start()
    r.applied(0)
    r.log.wait(lambda e: is_pass(e) and e["origin"] == "drift" and e["result"] == "ok")
    mark = r.log.mark()
    r.kernel.drift("mtd")
    ev = r.log.wait(lambda e: e["event"] == "drift", mark)
    assert ev["level"] == "warning" and ev["summary"] == {"+element": 1}
    r.stop()
    assert r.daemon.metrics.drift._value.get() == 1
    audit = Path(r.state.audit_log).read_text().splitlines()
    assert len(audit) == 2 and '"origin": "drift"' in audit[1].replace('":"', '": "')


def test_a_broken_reload_is_rejected_and_the_previous_state_kept(run):
    r = run().start()
    r.applied(0)
    good = r.state_path.read_text()
    r.state_path.write_text("ports: {range: [1, 20]\n")
    mark = r.log.mark()
    r.daemon.request_reload()
    ev = r.log.wait(lambda e: e["event"] == "reload", mark)
    assert ev["result"] == "rejected" and "invalid YAML" in ev["message"]
    r.trigger(1)  # still enforced, with the previous state
    assert r.applied(1, mark)["result"] == "changed"
    r.state_path.write_text(good.replace("ignore:\n    tcp:\n    - 1\n    - 2", "ignore: {}"))
    mark = r.log.mark()
    r.daemon.request_reload()
    ev = r.log.wait(lambda e: is_pass(e) and e["origin"] == "manual", mark)
    assert ev["result"] == "changed"
    r.stop()


def test_metrics_and_latency_of_an_applied_trigger(run):
    r = run().start()
    r.applied(0)
    r.trigger(1, published=time.time() - 2)
    ev = r.applied(1)
    r.stop()
    m = r.daemon.metrics
    assert ev["latency"] >= 2
    assert m.epoch._value.get() == 1
    assert m.reconciles.labels("changed")._value.get() == 2
    assert m.triggers.labels("accepted")._value.get() == 1
    assert m.latency._sum.get() >= 2
