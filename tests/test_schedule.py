"""The daemon's scheduling decisions (`core.schedule`), row by row: an event and a schedule
in, the schedule and what to do out. No thread, queue or clock."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from reconciler.core import schedule as sc
from reconciler.core.messages import Trigger, WatchOrder

BASE = sc.Schedule(
    target=5,
    dirty=False,
    origin="drift",
    trusted=True,
    covered=10,
    next_pull=1000.0,
    last_pull=90.0,
    next_drift=500.0,
    last_run=95.0,
)
T7 = Trigger(7, 1.0, "message")
ORDER = WatchOrder("add", "192.0.2.9", 60, "scan", 1.0)
OLD, NEW = SimpleNamespace(generation=9), SimpleNamespace(generation=11)


def s(**changes: object) -> sc.Schedule:
    return dataclasses.replace(BASE, **changes)


@pytest.mark.parametrize(
    ("before", "event", "pull_interval", "draw", "after", "reload", "lost"),
    [
        (BASE, sc.Stop(), None, 0, s(stopping=True), False, ""),
        (BASE, sc.Reload(), None, 0, BASE, True, ""),
        # a newer trigger: a pass, for Redis; the first pass keeps its origin
        (BASE, sc.Triggered(T7), None, 0,
         s(target=7, pending=T7, dirty=True, origin="redis"), False, ""),
        (s(origin="start"), sc.Triggered(T7), None, 0,
         s(origin="start", target=7, pending=T7, dirty=True), False, ""),
        # not newer than the epoch heard of: stale, nothing to do
        (s(target=7), sc.Triggered(T7), None, 0, s(target=7), False, ""),
        # a change by someone else after the last replacement: repaired from the events
        (BASE, sc.Foreign(NEW), None, 0,
         s(foreign=(sc.Foreign(NEW),), dirty=True, origin="events"), False, ""),
        (s(origin="redis"), sc.Foreign(NEW), None, 0,
         s(origin="redis", foreign=(sc.Foreign(NEW),), dirty=True), False, ""),
        (BASE, sc.Foreign(OLD), None, 0, BASE, False, ""),  # already overwritten
        (BASE, sc.Lost("ENOBUFS"), None, 0, s(trusted=False, dirty=True), False, "ENOBUFS"),
        (BASE, sc.Watched(ORDER), None, 0, s(watches=(ORDER,)), False, ""),
        # pulls: none without --pull; coalesced to one per NOTICE_GAP; spread on reconnect
        (BASE, sc.PullNotice("notice"), None, 0, BASE, False, ""),
        (BASE, sc.PullNotice("notice"), 60.0, 0, s(next_pull=100.0), False, ""),
        (s(last_pull=99.5), sc.PullNotice("notice"), 60.0, 0,
         s(last_pull=99.5, next_pull=100.5), False, ""),
        (BASE, sc.PullNotice("reconnect"), 60.0, 0.5, s(next_pull=105.0), False, ""),
        (BASE, sc.PullNotice("reconnect"), 4.0, 0.5, s(next_pull=102.0), False, ""),
        (s(next_pull=50.0), sc.PullNotice("notice"), 60.0, 0, s(next_pull=50.0), False, ""),
    ],
)  # fmt: skip
def test_fold(before, event, pull_interval, draw, after, reload, lost):
    decided = sc.fold(before, event, now=100.0, pull_interval=pull_interval, draw=draw)
    assert (decided.schedule, decided.reload, decided.lost) == (after, bool(reload), lost)


@pytest.mark.parametrize(
    ("state", "seconds"),
    [
        (BASE, sc.LOCAL_EPOCH_CHECK),  # nothing due: the next look at the epoch file
        (s(next_drift=100.5), 0.5),
        (s(next_pull=99.0), 0.0),  # overdue: at once
        (s(watches=(ORDER,)), 0.0),
        (s(dirty=True), 0.0),  # min_interval since the last pass has passed
        (s(dirty=True, last_run=99.8), pytest.approx(0.2)),  # spaced by min_interval
        (s(dirty=True, last_run=99.8, foreign=(sc.Foreign(NEW),)), 0.0),  # events: at once
    ],
)
def test_wait(state, seconds):
    assert sc.wait(state, now=100.0, min_interval=0.4) == seconds
