"""The daemon's scheduling decisions as plain functions: how each event changes the pending
work (`fold`), and how long the loop may sleep before it looks again (`wait`).

No thread, queue, clock or random draw: the caller says what time it is and gives the draw,
so every decision is a row of a table-driven test (`tests/test_schedule.py`). The daemon's
loop around them (`services.daemon`) only queues events, sleeps and runs what is due.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from reconciler.core.messages import Trigger, WatchOrder

# Why the next pass runs: the first one, a fleet trigger, the drift timer, the kernel's
# change events, or this host's own `mtd rotate` (`manual`).
Origin = Literal["start", "redis", "drift", "events", "manual"]

NOTICE_GAP = 1.0  # at most one notice-driven pull per this many seconds (bursts coalesce)
RECONNECT_SPREAD = 10.0  # seconds over which a fleet's pulls after a Redis outage spread
LOCAL_EPOCH_CHECK = 1.0  # seconds between looks at the epoch file (a local `mtd rotate`)


@dataclass(frozen=True)
class Stop:
    """SIGTERM or SIGINT."""


@dataclass(frozen=True)
class Reload:
    """SIGHUP: read the state (and the secret) again."""


@dataclass(frozen=True)
class PullNotice:
    """Fetch the state repository soon: a notice on the pull channel, or a reconnect."""

    reason: str


@dataclass(frozen=True)
class Triggered:
    """A fleet trigger (a message, or the epoch key read on a check)."""

    trigger: Trigger


@dataclass(frozen=True)
class Foreign:
    """A change by someone else to the owned table (`adapters.monitor.Change`)."""

    change: Any
    at: float = 0.0  # monotonic time it arrived


@dataclass(frozen=True)
class Lost:
    """The kernel's change events were lost: only a full compare can tell the table now."""

    reason: str
    at: float = 0.0


@dataclass(frozen=True)
class Watched:
    """A dynamic watch change for this host (from the fleet, or a CrowdSec decision)."""

    order: WatchOrder
    origin: str = "message"


Event = Stop | Reload | PullNotice | Triggered | Foreign | Lost | Watched


@dataclass(frozen=True)
class Schedule:
    """The daemon's pending work and its timers (monotonic seconds)."""

    target: int  # the highest epoch heard of
    dirty: bool  # a pass is due (when `min_interval` allows)
    origin: Origin  # why
    trusted: bool  # the table is as the last pass left it (the events say so)
    covered: int  # the event generation up to which a pass replaced or compared the table
    next_pull: float
    last_pull: float
    next_drift: float
    last_run: float
    pending: Trigger | None = None  # the trigger the next pass answers
    foreign: tuple[Foreign, ...] = ()  # changes by others, not yet repaired
    watches: tuple[WatchOrder, ...] = ()  # watch changes not applied yet
    stopping: bool = False


@dataclass(frozen=True)
class Decision:
    """The schedule after an event, and what the loop must do about it now."""

    schedule: Schedule
    reload: bool = False  # read the state again (SIGHUP)
    lost: str = ""  # events were lost: say so (once per event)


def fold(
    s: Schedule, ev: Event, *, now: float, pull_interval: float | None, draw: float = 0.0
) -> Decision:
    """`ev` folded into the pending work: a burst of events becomes one pass.

    `pull_interval` is None without `--pull`; `draw` (0 to 1) spreads the fleet's pulls after
    a reconnect over `RECONNECT_SPREAD`, so that not every host fetches at once."""
    change = dataclasses.replace
    match ev:
        case Stop():
            return Decision(change(s, stopping=True))
        case Reload():
            return Decision(s, reload=True)
        case PullNotice(reason) if pull_interval is not None:
            # Coalesced: at most one notice-driven round per NOTICE_GAP (or pull interval).
            soon = max(now, s.last_pull + min(NOTICE_GAP, pull_interval))
            if reason == "reconnect":
                soon += draw * min(RECONNECT_SPREAD, pull_interval)
            return Decision(change(s, next_pull=min(s.next_pull, soon)))
        case Triggered(trigger) if trigger.epoch > s.target:
            origin: Origin = s.origin if s.origin == "start" else "redis"
            return Decision(
                change(s, target=trigger.epoch, pending=trigger, dirty=True, origin=origin)
            )
        case Foreign(found) if found.generation > s.covered:
            origin = "events" if s.origin == "drift" else s.origin
            return Decision(change(s, foreign=(*s.foreign, ev), dirty=True, origin=origin))
        case Watched(order):
            return Decision(change(s, watches=(*s.watches, order)))
        case Lost(reason):
            return Decision(change(s, trusted=False, dirty=True), lost=reason)
    return Decision(s)  # stale, or not followed: nothing to do


def wait(s: Schedule, *, now: float, min_interval: float) -> float:
    """Seconds the loop may sleep before something is due: watch changes at once, the next
    pull, the drift timer, a look at the epoch file, and a pending pass (at once for the
    kernel's events, else no sooner than `min_interval` after the last one)."""
    if s.watches:
        return 0.0
    until = min(s.next_drift, s.next_pull, now + LOCAL_EPOCH_CHECK)
    if s.dirty:
        until = now if s.foreign else min(until, s.last_run + min_interval)
    return max(0.0, until - now)
