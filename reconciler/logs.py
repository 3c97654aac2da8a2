"""Structured daemon logs: one event per line, readable text or one JSON object.

Events carry an `event` name and plain fields (epoch, result, duration...), so the JSON form
can be queried and the text form stays one readable line. Callers never pass the secret;
the mapping is only passed when `--log-mapping` asked for it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

LOGGER = "mtd"


def event(logger: logging.Logger, level: int, name: str, message: str, **fields: Any) -> None:
    """Log one event: `message` is the readable line, `fields` what JSON consumers query."""
    logger.log(level, message, extra={"mtd_event": name, "mtd_fields": fields})


def _time(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """`{"time": ..., "level": "info", "event": "reconcile", "message": ..., fields...}`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "event": getattr(record, "mtd_event", "log"),
            "message": record.getMessage(),
        }
        for key, value in (getattr(record, "mtd_fields", None) or {}).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """`2024-05-01T12:00:00.000Z info  reconcile: changed: table inet mtd epoch 4 ...`."""

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "mtd_event", "log")
        line = f"{_time(record)} {record.levelname.lower():<7} {name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(as_json: bool, level: int = logging.INFO) -> logging.Logger:
    """Send the `mtd` logger to stderr (the journal under systemd), nowhere else."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger
