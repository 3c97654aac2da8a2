"""What the daemon says: its log and audit lines about each pass, the status file
`mtd status` reads (daemon.json), and the heartbeat `mtd fleet status` reads. Beside the
daemon's loop (`services.daemon`), never deciding anything: the loop calls these with what a
pass did."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from reconciler import __version__
from reconciler.adapters import auditlog, files
from reconciler.adapters.credentials import redact
from reconciler.core import diff, schedule, shuffle
from reconciler.core.messages import Trigger
from reconciler.errors import MtdError
from reconciler.logs import event
from reconciler.services.reconcile import Result

RETRY = 30.0  # seconds before a failed pass is tried again (at most)


class Reporting:
    """The daemon's reporting half (a mixin of `services.daemon.Daemon`, whose loop owns
    every attribute read here)."""

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
        pending: Trigger | None,
        foreign: list[schedule.Foreign],
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

    def _drift(
        self, result: Result, foreign: list[schedule.Foreign], compared: bool, why: str
    ) -> None:
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

    def _audit_down(self) -> None:
        try:
            auditlog.log_down(self.state, origin="manual", host=self.host)
        except MtdError as exc:  # the table is gone all the same: say it was not recorded
            self.metrics.audit_failures.inc()
            problem = "; ".join(exc.problems)
            event(self.log, logging.ERROR, "audit", f"removed, audit failed: {problem}")


def _summary(result: Result) -> dict[str, int]:
    return diff.summary(result.changes)
