"""`mtd run --log-json` in a lab namespace, its log lines read as they arrive.

The one helper the demo, the daemon tests and the benchmarks use to start a daemon and wait
for what it logs: a reader thread keeps every line with its arrival time (CLOCK_MONOTONIC),
and waits block on a condition, never on a polling sleep. Lines that are not JSON are kept
as `{"event": "raw", "message": line}`, so a traceback cannot go unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.lab.netns import Lab

Event = dict[str, Any]


class MtdRun:
    """One `mtd -s STATE run --log-json ARGS` inside `role`'s namespace.

    `log`, when given, receives a copy of every line (to read after a failure).
    """

    def __init__(
        self,
        lab: Lab,
        role: str,
        state: Path,
        *args: str,
        log: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.role, self.state, self.log = role, state, log
        argv = [sys.executable, "-m", "reconciler", "-s", str(state), "run", "--log-json", *args]
        self.proc = lab.spawn(
            role, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd
        )
        self.lines: list[tuple[float, Event]] = []
        self.raw: list[str] = []
        self.changed = threading.Condition()
        self._seen = 0  # for `wait_for`: what was already reported
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        out = self.log.open("a") if self.log else None
        try:
            for line in self.proc.stderr:
                arrived = time.monotonic()
                try:
                    entry = json.loads(line)
                    if not isinstance(entry, dict):
                        raise ValueError
                except ValueError:
                    entry = {"event": "raw", "message": line.rstrip("\n")}
                if out:
                    out.write(line)
                    out.flush()
                with self.changed:
                    self.raw.append(line)
                    self.lines.append((arrived, entry))
                    self.changed.notify_all()
        finally:
            if out:
                out.close()
            with self.changed:
                self.changed.notify_all()  # the process ended: wake the waiters

    def text(self) -> str:
        with self.changed:
            return "".join(self.raw)

    def events(self) -> list[Event]:
        with self.changed:
            return [e for _, e in self.lines]

    def mark(self) -> int:
        with self.changed:
            return len(self.lines)

    def arrival(
        self, pred: Callable[[Event], bool], since: int = 0, timeout: float = 15
    ) -> tuple[float, Event]:
        """The first event from `since` on that satisfies `pred`, and when it arrived."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for arrived, ev in self.lines[since:]:
                    if pred(ev):
                        return arrived, ev
                if not self._reader.is_alive():
                    raise RuntimeError(f"{self.role}: mtd run exited:\n{''.join(self.raw)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"{self.role}: timed out after {timeout} s; log:\n{''.join(self.raw)}"
                    )
                self.changed.wait(left)

    def wait(self, pred: Callable[[Event], bool], since: int = 0, timeout: float = 15) -> Event:
        return self.arrival(pred, since, timeout)[1]

    def wait_for(self, event: str, timeout: float = 20, **fields: object) -> Event:
        """The next event of this kind (and fields) after the one this returned last."""

        def match(ev: Event) -> bool:
            return ev.get("event") == event and all(ev.get(k) == v for k, v in fields.items())

        ev = self.wait(match, self._seen, timeout)
        with self.changed:
            self._seen = next(
                i + 1 for i, (_, e) in enumerate(self.lines) if e is ev and i >= self._seen
            )
        return ev
