"""Every default mtd has, in one place: the CLI, the daemon, the bus, the pull and the state
model import them from here, so a default changes in one line and cannot drift.

Pure constants (no I/O): any layer may import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Where mtd keeps what it owns on a host: the secret, the epoch, the lock, the pull's clone
# and pull.json, the caches (cache/).
STATE_DIR = Path("/var/lib/mtd")
SECRET_FILE = STATE_DIR / "secret"
CACHE = "cache"  # the caches (adapters.cachedir): a private directory in the state directory

YAML_SUFFIXES = (".yaml", ".yml")

# The desired state's optional keys.
TABLE = "mtd"
TEMPLATE = "maps"
DRIFT_INTERVAL = 3600  # a safety net: the daemon follows the kernel's change events
MARK = 0x01000000
STATE: dict[str, Any] = {
    "table": TABLE,
    "template": TEMPLATE,
    "ownership": "table",
    "mark": MARK,
    "drift_interval": DRIFT_INTERVAL,
    "repository_templates": False,  # a commit that carries templates is rejected
}
MAX_MESSAGE_BYTES = 1024
MAX_EPOCH_STEP = 10_000  # a trigger further ahead of the applied epoch is rejected
HEARTBEAT_TTL = 15.0  # seconds: a host whose heartbeat is older is silent
REDIS: dict[str, Any] = {
    "channel": "mtd:rotate",
    "epoch_key": "mtd:epoch",
    "min_interval": 0.0,
    "max_message_bytes": MAX_MESSAGE_BYTES,
    "max_epoch_step": MAX_EPOCH_STEP,
    "pull_channel": "mtd:pull",
    "heartbeat_key": "mtd:hosts",
    "heartbeat_ttl": HEARTBEAT_TTL,
}

# `mtd run`'s Redis timers, seconds.
RECONNECT_MIN = 0.5  # first reconnect delay (doubles up to RECONNECT_MAX)
RECONNECT_MAX = 30.0
REDIS_CHECK = 5.0  # between reads of the epoch key while connected
REDIS_TIMEOUT = 5.0  # connect and command timeout
START_WAIT = 2.0  # at start, how long to wait for the fleet epoch before the first pass

# `mtd pull` and `mtd run --pull`.
BRANCH = "main"
PULL_INTERVAL = 60.0
GIT_TIMEOUT = 120.0  # per git command

# The latest time a message or a heartbeat may carry, unix seconds (36,000 years): exact
# as a float, so one chained comparison bounds any JSON number, a 400-digit integer too.
MAX_UNIX_SECONDS = 1 << 40
# The secret a preview uses when none exists yet (day zero): never written, never live.
PLACEHOLDER_SECRET = bytes(32)
