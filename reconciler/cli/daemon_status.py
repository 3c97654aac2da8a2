"""What `mtd status` says of the daemon (daemon.json) and of a pending `apply --confirm`,
in text: the same facts `--json` carries, one line each.

daemon.json is mtd's own file (0600, next to the epoch file), but it may be stale (a daemon
killed with SIGKILL) or damaged: every field is checked before it is shown, and a daemon
whose pid is gone is said to be gone.
"""

from __future__ import annotations

import os
import time
from typing import Any


def alive(pid: Any) -> bool:
    """Whether `pid` is a live process (a daemon killed hard leaves its daemon.json)."""
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def when(t: Any, now: float) -> str:
    if not isinstance(t, int | float) or not 0 < t < 1e11:
        return "?"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    return f"{stamp} ({_ago(now - t)})"


def _ago(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    if s < 172800:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def daemon_lines(daemon: dict[str, Any], running: bool, now: float) -> list[str]:
    """The daemon's lines (none when no daemon.json)."""
    if not daemon:
        return ["mtd run: not running on this state (no daemon.json)"]
    pid = daemon.get("pid")
    if not running:
        return [f"mtd run: not running (pid {pid} of daemon.json has exited without removing it)"]
    out = [f"mtd run: pid {pid}, running since {when(daemon.get('started'), now)}"]
    redis = daemon.get("redis")
    if isinstance(redis, dict):
        where = _text(redis.get("where"))
        state = "connected" if redis.get("connected") is True else "not connected"
        trig = redis.get("last_trigger")
        if isinstance(trig, dict) and type(trig.get("epoch")) is int:
            heard = f"last trigger epoch {trig['epoch']} ({_text(trig.get('origin'))}) at " + when(
                trig.get("time"), now
            )
        else:
            heard = "no trigger since the start"
        out.append(f"redis: {state} to {where}; {heard}")
    elif "redis" in daemon:
        out.append("redis: none configured (no fleet triggers)")
    last = daemon.get("last_pass")
    if isinstance(last, dict):
        line = (
            f"last pass: {_text(last.get('result'))} at epoch {_text(last.get('epoch'))}, "
            + when(last.get("time"), now)
        )
        if last.get("error"):
            line += f": {_text(last.get('error'), 300)}"
        out.append(line)
    elif "last_pass" in daemon:
        out.append("last pass: none yet")
    return out


def pending_line(rec: dict[str, Any] | None, now: float) -> list[str]:
    """A pending `mtd apply --confirm` revert, if any."""
    if not rec:
        return []
    deadline = rec.get("deadline")
    left = max(0.0, float(deadline) - now) if isinstance(deadline, int | float) else 0.0
    return [
        f"pending revert: mtd apply --confirm puts table inet {_text(rec.get('table'))} of "
        f"before back in {left:.0f} s unless `mtd confirm` runs"
    ]


def _text(value: Any, limit: int = 80) -> str:
    """Printable, one line, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
