"""The Redis bus: the fleet's epoch, rotation triggers, and the subscriber that follows them.

The only module that imports redis-py. It knows:
- the epoch key (`redis.epoch_key`, an integer) and next to it `<epoch_key>:last`, the last
  trigger message published, so a subscriber that was away can catch up (and, with signing
  on, check that the epoch it catches up to was signed);
- the message format: JSON `{"epoch": N, "time": UNIX_SECONDS, "sig": HEX}`, `sig` an
  HMAC-SHA256 over channel, epoch and time when `redis.signing_key_file` is set. Messages
  are data: anything else is rejected in one line and never acted on;
- `publish_rotation`: increment the epoch and publish it in one transaction;
- `put_back`: raise the key to an epoch a daemon knows (compare-and-set in Lua), so that
  after Redis lost its data the next trigger still moves every host forward;
- `Subscriber`: a thread that subscribes, reads the key on every (re)connect and every
  `check_interval` (which also notices a silently dead link), and reconnects with capped
  exponential backoff. It only reports; what to do is the daemon's business. It also
  follows the pull channel (`redis.pull_channel`: "fetch the state repository now") and
  keeps this host's heartbeat record (`redis.heartbeat_key`) for `mtd fleet status`;
- `connect`: the one place a client is made, for a plain URL or a Sentinel deployment
  (`redis+sentinel://`), so every caller follows a failover by reconnecting.

A replay is a message whose epoch is not newer than the one the daemon knows, or whose
signature does not match: the signature covers the epoch, and epochs only move forward.

Anyone who can publish on the channel (or write the keys) is untrusted: an epoch beyond
`MAX_EPOCH`, or more than `redis.max_epoch_step` ahead of the epoch this host last applied,
is rejected and never put back into Redis; rejections are logged a few at a time, then as
one summary line per `LOG_WINDOW` with counts by reason, so a flood cannot flood the log.
Every key is read by a short script that checks its type and length first (`read_strings`,
`read_hash`): nothing larger than mtd's own values ever leaves Redis.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.connection
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from reconciler import defaults
from reconciler.adapters import files
from reconciler.adapters.credentials import redact
from reconciler.core.shuffle import MAX_EPOCH
from reconciler.core.state import REDIS_DEFAULTS, State
from reconciler.errors import BusError, MtdError
from reconciler.logs import LOGGER, event

MAX_EPOCH_STEP = int(REDIS_DEFAULTS["max_epoch_step"])
LOG_BURST = 5  # rejected or stale triggers logged in full per window, then only counted
LOG_WINDOW = 60.0  # seconds between summary lines of a flood
RECOVER = "see README, Recovering the fleet epoch"
SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}
SENTINEL_PORT = 26379
SENTINEL_FORM = "redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]"
SENTINEL_PARAMS = ("sentinel_username", "sentinel_password")  # query: the Sentinels' own login
MAX_HOSTS = 100_000  # heartbeat records `mtd fleet status` reads at most
REPLICA_WAIT = 1.0  # seconds a sentinel publish waits for one replica to acknowledge it
FAILOVER_WAIT = 15.0  # seconds a sentinel publish keeps retrying while a failover runs
MESSAGE_KEYS = frozenset({"epoch", "time", "sig"})
FORMAT = '{"epoch": N, "time": UNIX_SECONDS[, "sig": HEX]}'
LOG = logging.getLogger(f"{LOGGER}.bus")

# Raise the epoch key to ARGV[1] unless it is already there or beyond; store the matching
# trigger message (ARGV[2]) with it. Atomic, so concurrent daemons and publishers never
# lower the epoch.
_PUT_BACK = """
local t = redis.call('TYPE', KEYS[1])['ok']
local current = 0
if t ~= 'none' then
  if t ~= 'string' then
    return redis.error_reply('is a ' .. t .. ': expected a string holding an integer')
  end
  local n = redis.call('STRLEN', KEYS[1])
  if n > #ARGV[3] then
    return redis.error_reply('holds ' .. n .. ' bytes: expected an integer')
  end
  local raw = redis.call('GET', KEYS[1])
  if not (raw == '0' or string.match(raw, '^[1-9][0-9]*$')) or #raw > #ARGV[3]
     or (#raw == #ARGV[3] and raw > ARGV[3]) then
    return redis.error_reply('holds ' .. string.sub(raw, 1, 40) ..
      ': expected an integer from 0 to ' .. ARGV[3])
  end
  current = tonumber(raw)
end
if current >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2]) end
return 1
"""


class BadMessage(Exception):
    """A message that is not a valid trigger; `str()` is the one line to log, `kind` the
    reason it is counted under in a flood's summary."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Trigger:
    """An epoch to converge to. `published` (unix time) is known for messages only."""

    epoch: int
    published: float | None
    origin: str  # "message": received on the channel; "catch-up": read from the epoch key


@dataclass(frozen=True)
class Published:
    epoch: int
    published: float
    receivers: int
    replicas: int | None = None  # Sentinel deployments: replicas that acknowledged it


@dataclass(frozen=True)
class BusConfig:
    """Where the fleet's epoch lives and how hard to try reaching it."""

    url: str = field(repr=False)  # may hold a password: `where` is what is shown
    channel: str
    epoch_key: str
    signing_key: bytes | None = field(default=None, repr=False)
    max_message_bytes: int = defaults.MAX_MESSAGE_BYTES
    max_epoch_step: int = MAX_EPOCH_STEP
    log_window: float = LOG_WINDOW
    pull_channel: str | None = None  # "fetch now" notices; None: not followed
    heartbeat_key: str | None = None  # hash of last records; per-host keys `<key>:<host>`
    heartbeat_ttl: float = (
        defaults.HEARTBEAT_TTL
    )  # a host whose record is older than this is silent
    reconnect_min: float = defaults.RECONNECT_MIN  # first backoff step, seconds
    reconnect_max: float = defaults.RECONNECT_MAX  # backoff cap, seconds
    check_interval: float = defaults.REDIS_CHECK  # between epoch key reads while connected
    timeout: float = defaults.REDIS_TIMEOUT  # connect and command timeout, seconds

    @property
    def last_key(self) -> str:
        return f"{self.epoch_key}:last"

    @property
    def watch_key(self) -> str:
        """The fleet's live watch messages (hash source -> message), for a daemon that was
        away when they were published; `<watch_key>:expiry` orders them by expiry."""
        return f"{self.epoch_key}:watch"

    @property
    def where(self) -> str:
        """The URL without its password: what messages and logs show."""
        return redact(self.url)

    @property
    def sentinel(self) -> bool:
        return is_sentinel(self.url)

    @classmethod
    def from_state(cls, state: State, **timers: float) -> BusConfig:
        r = state.redis
        key_file = r.get("signing_key_file")
        url = r.get("url") or "redis://localhost/0"  # with sentinels only: their hosts count
        if r.get("sentinels"):
            url = sentinel_url(url, r["sentinels"], r.get("master_name") or "")
        if r["pull_channel"] == r["channel"]:
            raise MtdError(
                f"redis.pull_channel {r['pull_channel']!r}: expected a channel other than "
                "redis.channel (rotations and pull notices are different messages)"
            )
        taken = {r["epoch_key"], f"{r['epoch_key']}:last", f"{r['epoch_key']}:watch"}
        if r["heartbeat_key"] in taken or r["epoch_key"].startswith(f"{r['heartbeat_key']}:"):
            raise MtdError(
                f"redis.heartbeat_key {r['heartbeat_key']!r}: expected a key apart from "
                f"redis.epoch_key {r['epoch_key']!r} and the keys next to it"
            )
        if not configured(state):
            raise MtdError(
                "redis.url: not set: expected the fleet's Redis, such as "
                "redis://127.0.0.1:6379/0 (mtd uses no Redis it was not given)"
            )
        return cls(
            url=url,
            channel=r["channel"],
            epoch_key=r["epoch_key"],
            signing_key=read_signing_key(key_file) if key_file else None,
            max_message_bytes=int(r["max_message_bytes"]),
            max_epoch_step=int(r.get("max_epoch_step", MAX_EPOCH_STEP)),
            pull_channel=r["pull_channel"],
            heartbeat_key=r["heartbeat_key"],
            heartbeat_ttl=float(r["heartbeat_ttl"]),
            **timers,
        )

    @property
    def local(self) -> bool:
        """A unix socket or loopback addresses (every Sentinel's, for a Sentinel URL): only
        this host's users can publish."""
        if self.sentinel:
            try:
                hosts = [h for h, _ in parse_sentinel_url(self.url).sentinels]
            except ValueError:
                return False
            return all(_loopback(h) for h in hosts)
        try:
            parts = urlsplit(self.url)
            return parts.scheme == "unix" or _loopback(parts.hostname or "localhost")
        except ValueError:  # not a URL urlsplit takes: connect() says what is wrong with it
            return False


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(url: str) -> SplitResult:
    """urlsplit, without its checks of one host (a Sentinel URL lists several, some in
    brackets); a URL it cannot split at all comes back whole as the path."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#(.*))?$", url)
    if m is None:
        return SplitResult("", "", url, "", "")
    return SplitResult(m[1].lower(), m[2], m[3], m[4] or "", m[5] or "")


def is_sentinel(url: str) -> bool:
    return url.partition("://")[0] in SENTINEL_SCHEMES


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed `redis+sentinel://` URL: where to ask, for which master, with which login."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    master_kwargs: dict[str, Any] = field(repr=False)
    sentinel_kwargs: dict[str, Any] = field(repr=False)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """`redis+sentinel://[user:pw@]h1:26379,h2:26379/MASTER/DB[?query]` (rediss+sentinel: TLS
    to the Sentinels and the master). The user info and the query (ssl_* options...) are the
    master's, as in a plain URL; `sentinel_username`/`sentinel_password` in the query log in
    to the Sentinels. Raises `ValueError` saying what is wrong, never showing a password."""
    parts = _split(url)
    base = SENTINEL_SCHEMES.get(parts.scheme)
    if base is None:
        raise ValueError(f"expected {SENTINEL_FORM}")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    sentinels = tuple(_host_port(h) for h in hostlist.split(","))
    names = [unquote(p) for p in parts.path.split("/")[1:]]
    if not names or not names[0] or len(names) > 2:
        raise ValueError(f"no master name: expected {SENTINEL_FORM}")
    db = names[1] if len(names) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"database {db!r}: expected a number, as in {SENTINEL_FORM}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {k: v for k, v in query if k in SENTINEL_PARAMS}
    rest = urlencode([(k, v) for k, v in query if k not in SENTINEL_PARAMS])
    plain = f"{base}://{userinfo}{at}localhost/{db}" + (f"?{rest}" if rest else "")
    master = redis.connection.parse_url(plain)
    for key in ("host", "port", "connection_class"):
        master.pop(key, None)
    tls = {k: v for k, v in master.items() if k.startswith("ssl_")}
    sentinel: dict[str, Any] = dict(tls)
    if base == "rediss":
        master["ssl"] = True
        sentinel["ssl"] = True
    if own.get("sentinel_username"):
        sentinel["username"] = own["sentinel_username"]
    if own.get("sentinel_password"):
        sentinel["password"] = own["sentinel_password"]
    return SentinelTarget(sentinels, names[0], master, sentinel)


def _host_port(text: str) -> tuple[str, int]:
    host, port = text, str(SENTINEL_PORT)
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"sentinel {text!r}: expected [ADDRESS]:PORT")
        if tail:
            if not tail.startswith(":"):
                raise ValueError(f"sentinel {text!r}: expected [ADDRESS]:PORT")
            port = tail[1:]
    elif ":" in text:
        host, port = text.rsplit(":", 1)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"sentinel {text!r}: expected HOST:PORT such as 192.0.2.7:26379")
    return host, int(port)


def configured(state: State) -> bool:
    """The state names a Redis (`redis.url` or `redis.sentinels`): without one, mtd uses none
    (no default address it would read from or write to)."""
    return bool(state.redis.get("url") or state.redis.get("sentinels"))


def sentinel_url(url: str, sentinels: list[str], master_name: str) -> str:
    """The `redis.sentinels` + `redis.master_name` keys as a Sentinel URL: the hosts from
    the list, the login, TLS (rediss://), database and query from `redis.url` (whose own
    host is then not used)."""
    if not master_name:
        raise MtdError("redis.sentinels: expected redis.master_name too (the monitored master)")
    parts = _split(url)
    scheme = parts.scheme if parts.scheme in SENTINEL_SCHEMES else f"{parts.scheme}+sentinel"
    if scheme not in SENTINEL_SCHEMES:
        raise MtdError(
            f"redis.url {redact(url)!r}: with redis.sentinels, expected redis:// or rediss://"
        )
    userinfo, at, _ = parts.netloc.rpartition("@")
    db = parts.path.strip("/").split("/")[-1] or "0"
    for entry in sentinels:
        try:
            _host_port(entry)
        except ValueError as exc:
            raise MtdError(f"redis.sentinels: {exc}") from None
    netloc = f"{userinfo}{at}{','.join(sentinels)}"
    return urlunsplit((scheme, netloc, f"/{quote(master_name, safe='')}/{db}", parts.query, ""))


def read_signing_key(path: str | Path) -> bytes:
    """The fleet's trigger signing key (mode 0600, at least 16 bytes).

    Surrounding whitespace is not part of the key, so `openssl rand -hex 32 > key` works the
    same on every host. Unlike the shuffle secret it is never created here: every host and
    publisher of a fleet must share the same one.
    """
    if not Path(path).exists():
        raise MtdError(
            f"{path}: no such signing key file: expected the fleet's shared key "
            f"(create it with: head -c 32 /dev/urandom > {path}; chmod 600 {path})"
        )
    return files.read_private_key(path, "signing key file", strip=True)


def signature(key: bytes, channel: str, epoch: int, published: float) -> str:
    """Bound to the channel too, so a trigger of one fleet cannot be replayed on another."""
    text = f"mtd/trigger/v1\n{channel}\n{epoch}\n{published:.6f}"
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def encode(config: BusConfig, epoch: int, published: float) -> bytes:
    msg: dict[str, Any] = {"epoch": epoch, "time": published}
    if config.signing_key is not None:
        msg["sig"] = signature(config.signing_key, config.channel, epoch, published)
    return json.dumps(msg, separators=(",", ":")).encode()


def _reject_constant(name: str) -> float:
    raise ValueError(name)


def decode(data: bytes | str, config: BusConfig) -> Trigger:
    """A trigger from a message, or `BadMessage` saying what is wrong with it."""
    return _trigger(_envelope(data, config, MESSAGE_KEYS, FORMAT), config)


def _trigger(msg: dict, config: BusConfig) -> Trigger:
    epoch = msg.get("epoch")
    if type(epoch) is not int or not 1 <= epoch <= MAX_EPOCH:
        raise BadMessage(
            f"epoch {_short(epoch)}: expected an integer from 1 to {MAX_EPOCH} (2**40)",
            "bad epoch",
        )
    published = _publish_time(msg)
    if config.signing_key is not None:
        want = signature(config.signing_key, config.channel, epoch, published)
        _check_signature(msg, want, f"epoch {epoch}: ")
    return Trigger(epoch, published, "message")


def _envelope(data: bytes | str, config: BusConfig, keys: frozenset[str], fmt: str) -> dict:
    """A message's JSON object, bounded in size and holding only `keys`, or `BadMessage`:
    what every kind of message (trigger, pull notice) must pass before its fields are read."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > config.max_message_bytes:
        raise BadMessage(
            f"{len(raw)} bytes: expected at most {config.max_message_bytes}", "too large"
        )
    try:
        msg = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadMessage(f"{_preview(raw)}: not JSON: expected {fmt}", "not JSON") from None
    if not isinstance(msg, dict):
        raise BadMessage(f"{_preview(raw)}: expected a JSON object {fmt}", "not an object")
    unknown = sorted(set(msg) - keys)
    if unknown:
        raise BadMessage(f"unknown key {unknown[0]!r:.40}: expected {fmt}", "unknown key")
    return msg


def _publish_time(msg: dict) -> float:
    published = msg.get("time")
    # One chained comparison, exact for any int (a 400-digit one overflowed isfinite, an
    # OverflowError out of the subscriber) and false for NaN.
    if type(published) not in (int, float) or not 0 <= published <= defaults.MAX_UNIX_SECONDS:
        raise BadMessage(
            f"time {_short(published)}: expected the publish time in unix seconds", "bad time"
        )
    return float(published)


def _check_signature(msg: dict, want: str, prefix: str = "") -> None:
    sig = msg.get("sig")
    if sig is None:
        raise BadMessage(f"{prefix}unsigned: expected a signature (sig)", "unsigned")
    # compare_digest refuses non-ASCII text (TypeError): such a signature is simply wrong.
    if not isinstance(sig, str) or not sig.isascii() or not hmac.compare_digest(sig, want):
        raise BadMessage(f"{prefix}bad signature: expected one made with the key", "bad signature")


PULL_KEYS = frozenset({"time", "sig"})
PULL_FORMAT = '{"time": UNIX_SECONDS[, "sig": HEX]}'


def pull_signature(key: bytes, channel: str, published: float) -> str:
    """Its own domain, so a rotation's signature is never a pull's (and the reverse)."""
    text = f"mtd/pull/v1\n{channel}\n{published:.6f}"
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def encode_pull(config: BusConfig, channel: str, published: float) -> bytes:
    msg: dict[str, Any] = {"time": published}
    if config.signing_key is not None:
        msg["sig"] = pull_signature(config.signing_key, channel, published)
    return json.dumps(msg, separators=(",", ":")).encode()


def decode_pull(
    data: bytes | str, config: BusConfig, channel: str, now: float | None = None
) -> float:
    """The publish time of a "fetch now" notice, or `BadMessage`. It carries no repository,
    branch or commit: the daemon fetches what it is configured to follow, nothing else.
    Like a watch message it must be at most `WATCH_MAX_AGE` old (or early): a notice kept
    by someone is not replayable after a restart, when the list of those seen is empty."""
    msg = _envelope(data, config, PULL_KEYS, PULL_FORMAT)
    published = _publish_time(msg)
    if config.signing_key is not None:
        _check_signature(msg, pull_signature(config.signing_key, channel, published))
    now = time.time() if now is None else now
    if abs(now - published) > WATCH_MAX_AGE:
        raise BadMessage(
            f"time {published:.0f}: published {now - published:.0f} s from now: expected "
            f"within {WATCH_MAX_AGE:g} s (replayed, or a clock is off)",
            "stale",
        )
    return published


def publish_pull(config: BusConfig, channel: str | None = None) -> int:
    """Tell every `mtd run --pull` on the pull channel to fetch now; returns the receivers."""
    channel = channel or config.pull_channel
    if not channel:
        raise MtdError("redis.pull_channel: expected a channel name")
    client = connect(config)
    try:
        return int(client.publish(channel, encode_pull(config, channel, round(time.time(), 6))))
    except redis.RedisError as exc:
        raise MtdError(f"{config.where}: cannot publish a pull notice: {_one_line(exc)}") from None
    finally:
        client.close()


WATCH_KEYS = frozenset({"watch", "source", "for", "reason", "time", "sig", "origin"})
WATCH_FORMAT = (
    '{"watch": "add"|"del", "source": ADDRESS, "for": SECONDS, "reason": TEXT, '
    '"time": UNIX_SECONDS[, "origin": "crowdsec"][, "sig": HEX]}'
)
WATCH_ORIGINS = ("crowdsec",)  # a message may name these; without one it is the fleet's
ANY_FORMAT = f"{FORMAT} or {WATCH_FORMAT}"
RECONNECT_PULL_GAP = defaults.PULL_INTERVAL  # seconds between pulls asked by reconnects
WATCH_MAX_AGE = 300.0  # seconds a watch message on the channel may be old (or early: clocks)

# Keep the fleet's live watch messages for daemons that were away, pruned of expired ones
# on every publish, bounded, and publish the message: one atomic step.
_PUBLISH_WATCH = """
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, s in ipairs(old) do redis.call('HDEL', KEYS[1], s) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if ARGV[2] == 'add' then
  if redis.call('HEXISTS', KEYS[1], ARGV[3]) == 0
     and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[7]) then
    return -1
  end
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[5])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
else
  redis.call('HDEL', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[3])
end
return redis.call('PUBLISH', ARGV[6], ARGV[5])
"""


@dataclass(frozen=True)
class WatchOrder:
    """A dynamic watch change from the fleet: add (for `seconds` from `published`) or del."""

    op: str  # add | del
    source: str  # canonical (core.watch.canonical)
    seconds: int
    reason: str
    published: float
    origin: str = "redis"  # of the entry it makes: redis (the fleet), or crowdsec

    @property
    def expires_at(self) -> float:
        return self.published + self.seconds


def watch_signature(
    key: bytes,
    channel: str,
    op: str,
    source: str,
    seconds: int,
    why: str,
    published: float,
    origin: str = "redis",
) -> str:
    """Its own domain; every field is covered (a JSON list: no separator can be forged).
    An origin other than the fleet's is one more field (earlier messages sign as before)."""
    listed: list[Any] = [channel, op, source, seconds, why, f"{published:.6f}"]
    fields = json.dumps(listed + ([origin] if origin != "redis" else []))
    return hmac.new(key, f"mtd/watch/v1\n{fields}".encode(), hashlib.sha256).hexdigest()


def encode_watch(config: BusConfig, order: WatchOrder) -> bytes:
    msg: dict[str, Any] = {"watch": order.op, "source": order.source, "time": order.published}
    if order.op == "add":
        msg |= {"for": order.seconds, "reason": order.reason}
    if order.origin != "redis":
        msg["origin"] = order.origin
    if config.signing_key is not None:
        msg["sig"] = watch_signature(
            config.signing_key,
            config.channel,
            order.op,
            order.source,
            order.seconds if order.op == "add" else 0,
            order.reason if order.op == "add" else "",
            order.published,
            order.origin,
        )
    return json.dumps(msg, separators=(",", ":")).encode()


def decode_message(data: bytes | str, config: BusConfig, now: float | None = None) -> Any:
    """A message on the rotation channel: a `Trigger`, or a `WatchOrder` (which must be
    at most `WATCH_MAX_AGE` old), or `BadMessage`. Both pass the same envelope checks."""
    msg = _envelope(data, config, MESSAGE_KEYS | WATCH_KEYS, ANY_FORMAT)
    if "watch" in msg:
        order = _watch(msg, config)
        now = time.time() if now is None else now
        if abs(now - order.published) > WATCH_MAX_AGE:
            raise BadMessage(
                f"watch {order.op} {order.source}: published {now - order.published:.0f} s "
                f"from now: expected within {WATCH_MAX_AGE:g} s (replayed, or a clock is off)",
                "stale watch",
            )
        return order
    unknown = sorted(set(msg) - MESSAGE_KEYS)
    if unknown:
        raise BadMessage(f"unknown key {unknown[0]!r:.40}: expected {FORMAT}", "unknown key")
    trigger = _trigger(msg, config)
    now = time.time() if now is None else now
    if trigger.published is not None and not plausible(trigger.published, now):
        # Still a trigger (its epoch is what counts), but its time says nothing about the
        # latency: `"time": 1` would put 57 years into the histogram.
        return Trigger(trigger.epoch, None, trigger.origin)
    return trigger


LATENCY_SKEW = 2.0  # seconds a publisher's clock may be ahead of ours for a latency


def plausible(published: float, now: float) -> bool:
    """A publish time a latency can be measured from: at most `WATCH_MAX_AGE` ago, and
    at most `LATENCY_SKEW` ahead (clocks)."""
    return -LATENCY_SKEW <= now - published <= WATCH_MAX_AGE


def decode_watch(data: bytes | str, config: BusConfig) -> WatchOrder:
    """A watch message (as kept in `watch_key`), or `BadMessage`; no age check."""
    return _watch(_envelope(data, config, WATCH_KEYS, WATCH_FORMAT), config)


def _watch(msg: dict, config: BusConfig) -> WatchOrder:
    from reconciler.core import watch

    op = msg.get("watch")
    if op not in ("add", "del"):
        raise BadMessage(f'watch {_short(op)}: expected "add" or "del"', "bad watch")
    source = msg.get("source")
    try:
        if not isinstance(source, str):
            raise watch.WatchError(f"{_short(source)}: expected an address as text")
        canonical = watch.canonical(source)
        seconds = watch.seconds(msg["for"]) if op == "add" else 0
        why = watch.reason(msg.get("reason")) if op == "add" else ""
        if op == "add" and type(msg["for"]) is not int:
            raise watch.WatchError(f"for {_short(msg['for'])}: expected whole seconds")
        if op == "del" and ("for" in msg or "reason" in msg):
            raise watch.WatchError("del: expected no for or reason")
    except KeyError:
        raise BadMessage(
            f"watch add {_short(source)}: no for: expected {WATCH_FORMAT}", "bad watch"
        ) from None
    except watch.WatchError as exc:
        raise BadMessage(f"watch {op}: {exc}", "bad watch") from None
    if canonical != source:
        raise BadMessage(
            f"watch {op} {_short(source)}: expected its canonical form {canonical}", "bad watch"
        )
    origin = msg.get("origin", "redis")
    if origin not in WATCH_ORIGINS and "origin" in msg:
        raise BadMessage(
            f"watch {op} {source}: origin {_short(origin)}: expected one of {WATCH_ORIGINS}",
            "bad watch",
        )
    published = _publish_time(msg)
    if config.signing_key is not None:
        want = watch_signature(
            config.signing_key, config.channel, op, source, seconds, why, published, origin
        )
        _check_signature(msg, want, f"watch {op} {source}: ")
    return WatchOrder(op, source, seconds, why, published, origin)


def publish_watch(config: BusConfig, order: WatchOrder) -> int:
    """Publish a watch change to the fleet and keep it (add) or drop it (del) in
    `watch_key`; returns the subscribers that received it."""
    receivers, problems = publish_watches(config, [order])
    if problems:
        raise MtdError(*problems)
    return receivers[0]


def publish_watches(config: BusConfig, orders: list[WatchOrder]) -> tuple[list[int], list[str]]:
    """`publish_watch` for many changes over one connection: (receivers of each published
    one, one line for each the full `watch_key` refused). `BusError` when Redis fails."""
    from reconciler.core import watch

    client = connect(config)
    out: list[int] = []
    problems: list[str] = []
    try:
        for order in orders:
            receivers = int(
                client.eval(
                    _PUBLISH_WATCH,
                    2,
                    config.watch_key,
                    f"{config.watch_key}:expiry",
                    f"{time.time():.6f}",
                    order.op,
                    order.source,
                    f"{order.expires_at:.6f}",
                    encode_watch(config, order),
                    config.channel,
                    watch.MAX_ENTRIES,
                )
            )
            if receivers < 0:
                problems.append(
                    f"{config.where}: {config.watch_key} holds {watch.MAX_ENTRIES} live "
                    f"entries: {order.source} not added (wait for entries to expire, or mtd "
                    "watch del some)"
                )
            else:
                out.append(receivers)
    except redis.RedisError as exc:
        raise BusError(f"{config.where}: cannot publish a watch: {_one_line(exc)}") from None
    finally:
        client.close()
    return out, problems


# One page of a hash (HSCAN from cursor ARGV[1], about ARGV[2] fields): {next cursor,
# {field, value, ...}, {field, field bytes, value bytes, ...}}: a field longer than
# ARGV[3] bytes (then only its first 40 bytes) or a value longer than ARGV[4] is only
# described, never sent. Errors for a key that is not a hash or has over ARGV[5] fields.
_READ_HASH = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then return {'0', {}, {}} end
if t ~= 'hash' then return redis.error_reply('is a ' .. t .. ', not a hash') end
local n = redis.call('HLEN', KEYS[1])
if n > tonumber(ARGV[5]) then
  return redis.error_reply('holds ' .. n .. ' fields: expected at most ' .. ARGV[5])
end
local r = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local items, good, bad = r[2], {}, {}
for i = 1, #items, 2 do
  local f, v = items[i], items[i + 1]
  if #f > tonumber(ARGV[3]) or #v > tonumber(ARGV[4]) then
    if #f > tonumber(ARGV[3]) then bad[#bad + 1] = string.sub(f, 1, 40) else bad[#bad + 1] = f end
    bad[#bad + 1] = #f
    bad[#bad + 1] = #v
  else
    good[#good + 1] = f
    good[#good + 1] = v
  end
end
return {r[1], good, bad}
"""
HASH_PAGE = 256  # fields asked for per page: what one reply holds, about
MAX_FIELD = 64  # bytes of a watch hash's field (a source)


@dataclass(frozen=True)
class Oversized:
    """A hash field left in Redis: its field (cut to 40 bytes when too long) and sizes."""

    field: str
    field_bytes: int
    value_bytes: int


def read_hash(
    client: Any,
    key: str,
    max_fields: int,
    max_value: int,
    where: str = "",
    max_field: int = MAX_FIELD,
) -> Iterator[tuple[list[tuple[str, bytes]], list[Oversized]]]:
    """A hash page by page: (field, value) pairs, each field at most `max_field` bytes and
    each value at most `max_value`, and what was too large (left in Redis, never
    downloaded). Raises `MtdError` for a key that is not a hash or holds more than
    `max_fields` fields."""
    cursor = "0"
    while True:
        try:
            reply = client.eval(_READ_HASH, 1, key, cursor, HASH_PAGE, max_field, max_value,
                                max_fields)  # fmt: skip
        except redis.ResponseError as exc:
            prefix = f"{where}: " if where else ""
            raise MtdError(f"{prefix}key {key} {_one_line(exc)}") from None
        cursor = _text(reply[0])
        items, bad = reply[1], reply[2]
        pairs = [
            (_text(items[i], 1 << 30), items[i + 1])
            for i in range(0, len(items) - 1, 2)
            if isinstance(items[i + 1], bytes)
        ]
        over = [
            Oversized(_text(bad[i], 1 << 30), int(bad[i + 1]), int(bad[i + 2]))
            for i in range(0, len(bad) - 2, 3)
        ]
        yield pairs, over
        if cursor == "0":
            return


def read_watches(client: redis.Redis, config: BusConfig) -> Iterator[tuple[list[bytes], list[str]]]:
    """The kept watch messages, page by page, each no larger than a message may be, with
    one line for each entry left unread."""
    from reconciler.core import watch

    key, limit = config.watch_key, config.max_message_bytes
    for pairs, over in read_hash(client, key, watch.MAX_ENTRIES, limit, config.where):
        lines = [
            f"{key} field {o.field[:40]!r}: {o.field_bytes} bytes, value {o.value_bytes} "
            f"bytes: expected at most {MAX_FIELD} and {limit}: left unread"
            for o in over
        ]
        yield [v for _, v in pairs], lines


def heartbeat_host_key(config: BusConfig, host: str) -> str:
    return f"{config.heartbeat_key}:{host}"


def write_heartbeat(client: redis.Redis, config: BusConfig, record: dict[str, Any]) -> None:
    """This host's record: a key that expires when the host goes silent, and its last value
    in a hash that does not, so a silent host is still listed (as silent)."""
    if not config.heartbeat_key:
        return
    data = json.dumps(record, separators=(",", ":"), sort_keys=True)
    host = str(record["host"])
    ttl_ms = max(1, int(config.heartbeat_ttl * 1000))
    with client.pipeline(transaction=False) as pipe:
        pipe.set(heartbeat_host_key(config, host), data, px=ttl_ms)
        pipe.hset(config.heartbeat_key, host, data)
        pipe.execute()


MAX_HOST = 256  # bytes of a host name in the heartbeat hash
_LIVE_BATCH = 1000  # live records read per script call


STOP_TIMEOUT = 0.3  # seconds the last record of a stopping daemon may take (it must stop fast)


def write_stopped(config: BusConfig, record: dict[str, Any]) -> None:
    """At a stop on purpose: the last record says so (`mtd fleet status` shows `stopped`,
    not `silent`) and the live key goes. Best effort: Redis away, the host turns silent."""
    if not config.heartbeat_key:
        return
    data = json.dumps(record | {"stopped": True}, separators=(",", ":"), sort_keys=True)
    host = str(record["host"])
    client = connect(replace(config, timeout=min(config.timeout, STOP_TIMEOUT)))
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.hset(config.heartbeat_key, host, data)
            pipe.delete(heartbeat_host_key(config, host))
            pipe.execute()
    except (redis.RedisError, OSError):
        pass
    finally:
        client.close()


def read_heartbeats(
    client: redis.Redis, config: BusConfig
) -> tuple[dict[str, bytes | int], dict[str, bytes | int | None]]:
    """(last record of every host ever seen, live record of each or None when expired).
    A record larger than `fleet.MAX_RECORD` is left in Redis and given as its size."""
    from reconciler.core.fleet import MAX_RECORD

    assert config.heartbeat_key
    last: dict[str, bytes | int] = {}
    try:
        for pairs, over in read_hash(
            client, config.heartbeat_key, MAX_HOSTS, MAX_RECORD, config.where, MAX_HOST
        ):
            last.update(pairs)
            last.update((o.field, o.value_bytes) for o in over)
    except MtdError as exc:
        raise MtdError(
            f"{exc.problems[0]} (written by something else than mtd run? --forget the extra ones)"
        ) from None
    hosts = sorted(last)
    live: dict[str, bytes | int | None] = {}
    for i in range(0, len(hosts), _LIVE_BATCH):
        batch = hosts[i : i + _LIVE_BATCH]
        keys = [(heartbeat_host_key(config, h), MAX_RECORD) for h in batch]
        for host, value in zip(batch, read_strings(client, keys, config.where), strict=True):
            live[host] = value.size if isinstance(value, TooLarge) else value
    return last, live


def forget_host(client: redis.Redis, config: BusConfig, host: str) -> bool:
    """Drop a decommissioned host from the fleet's records."""
    assert config.heartbeat_key
    removed = client.hdel(config.heartbeat_key, host)
    client.delete(heartbeat_host_key(config, host))
    return bool(removed)


def read_fleet_epoch(config: BusConfig, client: redis.Redis | None = None) -> int:
    """The fleet's epoch for a reader such as `mtd fleet status` (as a subscriber trusts it)."""
    own = client is None
    client = client or connect(config)
    try:
        return read_epoch(client, config)
    except BadMessage as exc:
        raise MtdError(f"{config.where}: {config.last_key}: {exc}") from None
    except redis.RedisError as exc:
        raise MtdError(f"{config.where}: cannot read the fleet epoch: {_one_line(exc)}") from None
    finally:
        if own:
            client.close()


def _preview(raw: bytes) -> str:
    return repr(raw[:32]) + ("..." if len(raw) > 32 else "")


def _short(value: object) -> str:
    """A value from a message, shown in at most ~40 characters (a nested object can be big)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


class _SentinelRedis(redis.Redis):
    """A master client that also closes the Sentinel clients it asks for the master."""

    sentinel: Sentinel | None = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.sentinel is not None:
                self.sentinel.close()


def connect(config: BusConfig) -> redis.Redis:
    """A client that fails fast (no hidden retries): the caller owns backoff and catch-up.

    The one place a client is made. For a Sentinel URL each new connection asks the
    Sentinels for the current master, so a reconnect after a failover reaches the new one.
    Nothing connects here: a bad URL fails, an unreachable server only at the first command.
    """
    common: dict[str, Any] = {
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if _split(config.url).scheme != "unix":  # keepalive is a TCP option (TypeError on unix)
        common["socket_keepalive"] = True
    try:
        if not config.sentinel:
            return redis.Redis.from_url(config.url, client_name="mtd", **common)
        target = parse_sentinel_url(config.url)
        sentinel = Sentinel(target.sentinels, sentinel_kwargs={**common, **target.sentinel_kwargs})
        # The URL's own options (?socket_timeout=...) win, as with a plain URL.
        kwargs = {**common, "client_name": "mtd", **target.master_kwargs}
        client = sentinel.master_for(target.master, redis_class=_SentinelRedis, **kwargs)
        client.sentinel = sentinel
        return client
    except (ValueError, TypeError) as exc:
        raise BusError(f"redis.url {config.where!r}: {redact(_one_line(exc))}") from None


# An epoch as Lua (`_PUT_BACK`) and Python both read it: plain decimal digits, no sign,
# space, exponent, hex or underscore (`int` and Lua's `tonumber` each take some of those).
_EPOCH_EXPECTED = f"expected an integer epoch from 0 to {MAX_EPOCH} (2**40; {RECOVER})"
EPOCH_TEXT = re.compile(rb"0|[1-9][0-9]{0,%d}" % (len(str(MAX_EPOCH)) - 1))


def _epoch_value(raw: bytes | None, config: BusConfig) -> int:
    if raw is None:
        return 0
    try:
        if EPOCH_TEXT.fullmatch(raw) is None:
            raise ValueError
        value = int(raw)
        if not 0 <= value <= MAX_EPOCH:
            raise ValueError
    except ValueError:
        raise MtdError(
            f"{config.where}: key {config.epoch_key} holds {_preview(raw)}: {_EPOCH_EXPECTED}"
        ) from None
    return value


def publish_rotation(
    config: BusConfig, client: redis.Redis | None = None, failover_wait: float | None = None
) -> Published:
    """Increment the fleet's epoch and publish it, atomically (WATCH/MULTI, retried when
    another publisher or a daemon's put-back got in between).

    With Sentinel, the publish then waits (up to REPLICA_WAIT) for a replica to hold it, so
    an acknowledged rotation survives the master's loss, and a connection error is retried
    against the new master for up to `failover_wait` seconds (default FAILOVER_WAIT). A
    retry after a lost reply may skip an epoch; it never reuses or lowers one."""
    own = client is None
    client = client or connect(config)
    wait = (FAILOVER_WAIT if config.sentinel else 0.0) if failover_wait is None else failover_wait
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                return _publish_once(config, client)
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
    except redis.RedisError as exc:
        raise BusError(f"{config.where}: cannot publish a rotation: {_one_line(exc)}") from None
    finally:
        if own:
            client.close()


def _publisher_base(client: Any, config: BusConfig) -> int:
    """The epoch a new rotation increments. With signing on, the signed last trigger's (the
    key is only trusted as far as subscribers trust it): a key someone raised or garbled by
    hand cannot stop the fleet's rotations; a bad last trigger counts as none (the daemons
    put back a signed one when the new epoch turns out to be behind theirs)."""
    raw, last = _epoch_and_last(client, config)
    if config.signing_key is None:
        return _epoch_value(_raise(raw), config)
    if last is None or isinstance(last, MtdError):
        return 0
    try:
        return decode(last, config).epoch
    except BadMessage:
        return 0


def _publish_once(config: BusConfig, client: redis.Redis) -> Published:
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(config.epoch_key, config.last_key)
                epoch = _publisher_base(pipe, config) + 1
                if epoch > MAX_EPOCH:
                    raise MtdError(
                        f"{config.where}: epoch {epoch}: past the ceiling {MAX_EPOCH} "
                        f"(2**40; {RECOVER})"
                    )
                published = round(time.time(), 6)
                msg = encode(config, epoch, published)
                pipe.multi()
                pipe.set(config.epoch_key, epoch)
                pipe.set(config.last_key, msg)
                pipe.publish(config.channel, msg)
                receivers = int(pipe.execute()[-1])
                break
            except redis.WatchError:
                continue
    replicas = _replicated(client) if config.sentinel else None
    return Published(epoch, published, receivers, replicas)


def _replicated(client: redis.Redis) -> int:
    """How many replicas hold the writes so far (WAIT), when the master has any."""
    role = client.execute_command("ROLE")
    if not role or len(role) < 3 or not role[2]:
        return 0
    return int(client.execute_command("WAIT", 1, int(REPLICA_WAIT * 1000)))


# Each of KEYS if it is a string of at most ARGV[i] bytes: {1, value}; else {0} (none),
# {2, type} or {3, length}. Checked and read in one step, so a value cannot grow between
# the check and the read, and no large value ever leaves the server.
_READ_STRINGS = """
local out = {}
for i, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k)['ok']
  if t == 'none' then
    out[i] = {0}
  elseif t ~= 'string' then
    out[i] = {2, t}
  else
    local n = redis.call('STRLEN', k)
    if n > tonumber(ARGV[i]) then out[i] = {3, n} else out[i] = {1, redis.call('GET', k)} end
  end
end
return out
"""


class TooLarge(MtdError):
    """A key left unread: larger than its bound (`size`: its bytes) or of another type."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


def read_strings(
    client: Any, keys: list[tuple[str, int]], where: str = "", expected: str = ""
) -> list[bytes | MtdError | None]:
    """The values of string keys (None: no such key), each at most its bound in bytes: a
    key that is larger or not a string comes back as the `MtdError` naming it (raised by
    the caller that needs it). Bounded before it is read, whoever wrote it."""
    if not keys:
        return []
    replies = client.eval(_READ_STRINGS, len(keys), *[k for k, _ in keys], *[n for _, n in keys])
    out: list[bytes | MtdError | None] = []
    prefix = f"{where}: " if where else ""
    for (key, bound), reply in zip(keys, replies, strict=True):
        kind = int(reply[0])
        if kind == 1:
            value = reply[1]
            out.append(value if isinstance(value, bytes) else str(value).encode())
        elif kind == 0:
            out.append(None)
        else:
            what = f"a {_text(reply[1])}" if kind == 2 else f"{int(reply[1])} bytes"
            want = expected or f"expected a string of at most {bound} bytes"
            size = int(reply[1]) if kind == 3 else -1
            out.append(TooLarge(f"{prefix}key {key} holds {what}: {want}", size=size))
    return out


def _text(value: object, limit: int = 40) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text[:limit]


def _epoch_and_last(client: Any, config: BusConfig) -> list[bytes | MtdError | None]:
    """The epoch key and the last trigger, each bounded (an epoch's digits, a message)."""
    (raw,) = read_strings(client, [(config.epoch_key, EPOCH_BYTES)], config.where, _EPOCH_EXPECTED)
    if config.signing_key is None:  # unsigned, the last trigger is not read at all
        return [raw, None]
    (last,) = read_strings(client, [(config.last_key, config.max_message_bytes)], config.where)
    return [raw, last]


EPOCH_BYTES = 64  # read of the epoch key at most: past its 13 digits, still shown as a value


def _raise(value: bytes | MtdError | None) -> bytes | None:
    if isinstance(value, MtdError):
        raise value
    return value


def read_epoch(client: redis.Redis, config: BusConfig) -> int:
    """The fleet's epoch as a subscriber may trust it: the key, or, with signing on, the
    epoch of the signed last trigger (a key anyone with Redis access could have set is not
    enough). 0 when Redis holds none. Raises `BadMessage` for a bad last trigger and
    `MtdError` for a key that is not an integer (or too large to be read)."""
    raw, last = _epoch_and_last(client, config)
    epoch = _epoch_value(_raise(raw), config)
    if config.signing_key is None:
        return epoch
    if isinstance(last, MtdError):
        raise BadMessage(str(last), "too large")
    if last is None:
        return 0
    return decode(last, config).epoch


def put_back(client: redis.Redis, config: BusConfig, epoch: int) -> bool:
    """Raise the key to `epoch` if it is lower or missing; True when it was raised."""
    msg = encode(config, epoch, round(time.time(), 6)) if epoch > 0 else b""
    try:
        done = client.eval(
            _PUT_BACK, 2, config.epoch_key, config.last_key, epoch, msg, str(MAX_EPOCH)
        )
    except redis.ResponseError as exc:
        raise BusError(f"{config.where}: key {config.epoch_key} {_one_line(exc)}") from None
    return bool(done)


def describe(exc: BaseException) -> str:
    """A Redis error as one line for the user (no password: redis-py never puts one there)."""
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, MasterNotFoundError):  # its text lists every Sentinel client's repr
        return str(exc).split(" : ", 1)[0] + ": the Sentinels know no live master"
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


class Sink(Protocol):
    """What the subscriber reports to (the daemon)."""

    def known_epoch(self) -> int:
        """The highest epoch heard of: a trigger not beyond it is stale."""
        ...

    def applied_epoch(self) -> int:
        """The epoch live on this host: triggers move at most `max_epoch_step` beyond it,
        and it is what is put back into Redis when Redis is behind."""
        ...

    def trigger(self, trigger: Trigger) -> None: ...

    def connection(self, up: bool) -> None: ...

    def ignored(self, outcome: str) -> None: ...

    def pull_now(self, reason: str) -> None:
        """A "fetch now" notice arrived (or a reconnect may have missed one)."""

    def pull_ignored(self) -> None:
        """A pull notice was rejected (garbage, unsigned, forged, replayed)."""

    def heartbeat(self) -> dict[str, Any] | None:
        """This host's record for `mtd fleet status`; None: keep none."""
        return None

    def ahead_reason(self, epoch: int) -> str | None: ...


class LogBudget:
    """Ignored triggers in the log: the first `burst` of each window in full, the rest
    counted by reason and summarised in one line when the window ends (`flush`)."""

    def __init__(
        self,
        logger: logging.Logger,
        channel: str,
        burst: int = LOG_BURST,
        window: float = LOG_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        what: str = "triggers",
    ) -> None:
        self.log, self.channel, self.what = logger, channel, what
        self.burst, self.window, self.clock = burst, window, clock
        self.started: float | None = None
        self.logged = 0
        self.counts: Counter[tuple[str, str]] = Counter()

    def note(self, outcome: str, kind: str, log: Callable[[], None]) -> None:
        """One ignored trigger: `log()` writes its own line while the budget lasts."""
        self.flush()
        if self.started is None:
            self.started = self.clock()
        if self.logged < self.burst:
            self.logged += 1
            log()
        else:
            self.counts[(outcome, kind)] += 1

    def flush(self, force: bool = False) -> None:
        """At the end of a window (or `force`): one summary line if anything was held back."""
        if self.started is None:
            return
        took = self.clock() - self.started
        if not force and took < self.window:
            return
        if self.counts:
            total = sum(self.counts.values())
            outcomes: dict[str, Counter[str]] = {}
            for (outcome, kind), n in sorted(self.counts.items()):
                outcomes.setdefault(outcome, Counter())[kind] += n
            parts = [
                f"{o} {sum(c.values())} ({', '.join(f'{k} {n}' for k, n in sorted(c.items()))})"
                for o, c in outcomes.items()
            ]
            event(
                self.log,
                logging.WARNING,
                "rejected",
                f"{total} more {self.what} on {self.channel} ignored in {took:.3g} s: "
                + "; ".join(parts),
                channel=self.channel,
                suppressed=total,
                counts={f"{o}:{k}": n for (o, k), n in sorted(self.counts.items())},
                seconds=round(took, 3),
            )
        self.started, self.logged = None, 0
        self.counts.clear()


class Subscriber:
    """Follows the fleet's epoch in a background thread, through any Redis outage."""

    POLL = 0.25  # longest wait for a message, so stop() takes effect quickly

    def __init__(self, config: BusConfig, sink: Sink, logger: logging.Logger = LOG) -> None:
        self.config = config
        self.sink = sink
        self.log = logger
        self.first_attempt = threading.Event()  # set once the first connect succeeded or failed
        self._stop = threading.Event()
        self._check_now = threading.Event()  # read the epoch key at once (check_soon)
        self._backoff = EqualJitterBackoff(cap=config.reconnect_max, base=config.reconnect_min)
        self._thread: threading.Thread | None = None
        self._reported: str | None = None  # last problem with the key, logged once
        self.budget = LogBudget(logger, config.channel, window=config.log_window)
        self.pull_budget = LogBudget(
            logger, config.pull_channel or "", window=config.log_window, what="pull notices"
        )
        self._beat_now = threading.Event()
        self._next_beat = 0.0
        self._connects = 0
        self._notices: collections.deque[float] = collections.deque(maxlen=256)
        self._watches_seen: collections.deque[tuple[str, str, float]] = collections.deque(
            maxlen=4096
        )
        self._kept_seen: set[tuple[str, float]] = set()  # handed over at the last catch-up
        self._reconnect_pulled: float | None = None  # monotonic time of the last such pull

    @property
    def pull_channel(self) -> str | None:
        """Followed only for a sink that pulls (`mtd run --pull`)."""
        wants = getattr(self.sink, "pulls", False)
        return self.config.pull_channel if wants else None

    def beat(self) -> None:
        """Write the heartbeat at the next turn of the loop (after a pass, a pull)."""
        self._beat_now.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="mtd-redis", daemon=True)
        self._thread.start()

    def check_soon(self) -> None:
        """Read (and maybe raise) the fleet's epoch now rather than at the next check."""
        self._check_now.set()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.budget.flush(force=True)  # a flood's counts are not lost at exit
            self.pull_budget.flush(force=True)

    def delay(self, failures: int) -> float:
        """Capped exponential backoff with jitter: base * 2**(n-1), at most the cap."""
        return min(self.config.reconnect_max, self._backoff.compute(failures - 1))

    def run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            up = False
            client = connect(self.config)
            pubsub = client.pubsub()
            try:
                self._subscribe(client, pubsub)
                up = True
                failures = 0
                self._listen(client, pubsub)
            except (redis.RedisError, OSError) as exc:
                problem = _one_line(exc)
            except Exception as exc:  # a bug must not end the following: log it, go on
                problem = f"internal error: {type(exc).__name__}: {_one_line(exc)}"
                self.log.debug("subscriber internal error", exc_info=True)
            else:
                return  # stopped
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
                with contextlib.suppress(Exception):
                    client.close()
            failures += 1
            delay = self.delay(failures)
            if up:
                self.sink.connection(False)
                event(
                    self.log,
                    logging.WARNING,
                    "redis",
                    f"{self.config.where}: connection lost: {problem}: keeping the last "
                    f"desired state, reconnecting in {delay:.1f} s",
                    connected=False,
                    error=problem,
                    retry_in=round(delay, 3),
                )
            else:
                event(
                    self.log,
                    logging.WARNING if failures == 1 else logging.INFO,
                    "redis",
                    f"{self.config.where}: unreachable: {problem}: attempt {failures}, "
                    f"next in {delay:.1f} s",
                    connected=False,
                    error=problem,
                    attempt=failures,
                    retry_in=round(delay, 3),
                )
            self.first_attempt.set()
            self._stop.wait(delay)

    def _subscribe(self, client: redis.Redis, pubsub: Any) -> int:
        """Subscribe first, then read the key: nothing published in between is missed."""
        channels = [self.config.channel]
        if self.pull_channel and self.pull_channel != self.config.channel:
            channels.append(self.pull_channel)
        pubsub.subscribe(*channels)
        deadline = time.monotonic() + self.config.timeout
        confirmed = 0
        while confirmed < len(channels):
            msg = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg.get("type") == "subscribe":
                confirmed += 1
            elif time.monotonic() >= deadline:
                raise redis.TimeoutError("no reply to SUBSCRIBE")
        # Connected first, then what the epoch key says (or why it cannot be read): the log
        # reads in the order things happened. The sink hears of it once caught up.
        event(
            self.log,
            logging.INFO,
            "redis",
            f"{self.config.where}: connected, subscribed to {self.config.channel}",
            connected=True,
            channel=self.config.channel,
        )
        epoch = self._catch_up(client, connecting=True)
        self._catch_up_watches(client)
        self._publish_kept()
        self._connects += 1
        if self.pull_channel and self._connects > 1 and self._reconnect_pull_due():
            self.sink.pull_now("reconnect")  # a notice may have been sent while we were away
        self._next_beat = 0.0
        self._heartbeat(client)
        self.sink.connection(True)
        self.first_attempt.set()
        return epoch

    def _reconnect_pull_due(self) -> bool:
        """At most one pull for reconnects per `RECONNECT_PULL_GAP`: anyone who can publish
        can force reconnects (one message over Redis' pub/sub output buffer), and each must
        not cost a fetch; a notice missed meanwhile waits for the pull interval at worst."""
        now = time.monotonic()
        if self._reconnect_pulled is not None and now - self._reconnect_pulled < RECONNECT_PULL_GAP:
            return False
        self._reconnect_pulled = now
        return True

    def _listen(self, client: redis.Redis, pubsub: Any) -> None:
        next_check = time.monotonic() + self.config.check_interval
        while not self._stop.is_set():
            wait = min(self.POLL, max(0.0, next_check - time.monotonic()))
            msg = pubsub.get_message(timeout=wait)
            if msg is not None and msg.get("type") == "message":
                channel = msg.get("channel")
                if isinstance(channel, bytes):
                    channel = channel.decode("utf-8", "replace")
                if channel == self.pull_channel and channel != self.config.channel:
                    self._on_pull(msg["data"])
                else:
                    self._on_message(msg["data"])
            self.budget.flush()
            self.pull_budget.flush()
            self._heartbeat(client)
            if time.monotonic() >= next_check or self._check_now.is_set():
                self._check_now.clear()
                self._catch_up(client)  # a GET with a timeout: a dead link raises here
                next_check = time.monotonic() + self.config.check_interval

    def _heartbeat(self, client: redis.Redis) -> None:
        """Refresh the record every third of its lifetime, or at once after a `beat()`."""
        now = time.monotonic()
        if not self.config.heartbeat_key or (now < self._next_beat and not self._beat_now.is_set()):
            return
        self._beat_now.clear()
        self._next_beat = now + max(0.1, self.config.heartbeat_ttl / 3)
        beat = getattr(self.sink, "heartbeat", None)
        record = beat() if beat is not None else None
        if record is None:
            return
        try:
            write_heartbeat(client, self.config, record)
        except redis.ResponseError as exc:  # an ACL without SET/HSET: say so once, go on
            key = self.config.heartbeat_key
            self._report(f"cannot write the heartbeat {key}: {_one_line(exc)}")

    def _on_pull(self, data: bytes) -> None:
        channel = self.pull_channel or ""
        try:
            published = decode_pull(data, self.config, channel)
            if published in self._notices:  # the same notice again: a replay costs nothing
                raise BadMessage(
                    f"time {published}: already received (duplicate or replayed)", "replayed"
                )
            self._notices.append(published)
        except BadMessage as exc:
            self._pull_rejected(exc, channel)
            return
        self.sink.pull_now("notice")

    def _pull_rejected(self, exc: BadMessage, channel: str) -> None:
        counted = getattr(self.sink, "pull_ignored", None)
        if counted is not None:
            counted()
        self.pull_budget.note(
            "rejected",
            exc.kind,
            lambda: event(
                self.log,
                logging.WARNING,
                "rejected",
                f"pull notice on {channel} ignored: {exc}",
                channel=channel,
                reason=str(exc),
                kind=exc.kind,
            ),
        )

    def _on_message(self, data: bytes) -> None:
        try:
            message = decode_message(data, self.config)
            if isinstance(message, WatchOrder):
                self._on_watch(message)
                return
            trigger = message
            self._check_step(trigger)
        except BadMessage as exc:
            self._rejected(exc)
            return
        known = self.sink.known_epoch()
        if trigger.epoch <= known:
            self.sink.ignored("stale")
            self.budget.note(
                "stale",
                "not newer",
                lambda: event(
                    self.log,
                    logging.WARNING,
                    "stale",
                    f"trigger on {self.config.channel} ignored: epoch {trigger.epoch} is not "
                    f"newer than epoch {known} (stale, duplicate or replayed)",
                    channel=self.config.channel,
                    epoch=trigger.epoch,
                    known=known,
                ),
            )
            return
        event(
            self.log,
            logging.INFO,
            "trigger",
            f"trigger on {self.config.channel}: epoch {trigger.epoch}",
            channel=self.config.channel,
            epoch=trigger.epoch,
            published=trigger.published,
        )
        self.sink.trigger(trigger)

    def _on_watch(self, order: WatchOrder, origin: str = "message") -> None:
        """A watch change for the sink (a daemon); the same message again (a replay within
        `WATCH_MAX_AGE`) is rejected."""
        watch = getattr(self.sink, "watch", None)
        if watch is None:
            return
        seen = (order.op, order.source, order.published)
        if origin == "message":
            if seen in self._watches_seen:
                raise BadMessage(
                    f"watch {order.op} {order.source}: already received (duplicate or replayed)",
                    "replayed",
                )
            self._watches_seen.append(seen)
        watch(order, origin)

    def _publish_kept(self) -> None:
        """What `mtd watch` applied on this host alone while Redis was down (the sink's
        `unpublished`): published to the fleet now, with the time each has left."""
        take = getattr(self.sink, "unpublished", None)
        if take is None:
            return
        from reconciler.core.watch import MAX_SECONDS

        changes = take()
        for i, c in enumerate(changes):
            now = time.time()
            left = math.ceil(c["expires_at"] - now) if c["op"] == "add" else 0
            left = min(left, MAX_SECONDS)  # a record from a clock set back
            if c["op"] == "add" and left < 1:
                continue  # expired while Redis was down
            origin = c.get("origin", "redis")  # a CrowdSec decision stays one fleet-wide
            order = WatchOrder(c["op"], c["source"], left, c["reason"], round(now, 6), origin)
            try:
                publish_watch(self.config, order)
            except MtdError as exc:
                self.sink.keep_unpublished(changes[i:])
                self._report(f"watch {c['op']} {c['source']} kept on this host: {exc}")
                return
            event(
                self.log,
                logging.INFO,
                "watch",
                f"published watch {c['op']} {c['source']}"
                + (f" for {left} s" if c["op"] == "add" else "")
                + f" on {self.config.channel}: applied on this host alone while Redis was down",
                source=c["source"],
                op=c["op"],
            )

    def _catch_up_watches(self, client: redis.Redis) -> None:
        """The fleet's live watch entries kept in Redis: what was published while this
        daemon was away (or before it started). Expired and invalid ones are skipped, and
        one already handed over at an earlier connect is not handed over again: a forced
        reconnect costs a bounded read, never a kernel transaction."""
        if getattr(self.sink, "watch", None) is None:
            return
        what = "kept watch in " + self.config.watch_key
        now = time.time()
        delivered: set[tuple[str, float]] = set()
        try:
            for values, too_large in read_watches(client, self.config):
                for line in too_large:
                    self._rejected(BadMessage(line, "too large"), what)
                for data in values:
                    order = self._kept(data, now, what)
                    if order is None:
                        continue
                    seen = (order.source, order.published)
                    delivered.add(seen)
                    if seen not in self._kept_seen:
                        self._on_watch(order, "catch-up")
        except MtdError as exc:
            self._report(str(exc))
            return
        self._kept_seen = delivered

    def _kept(self, data: bytes, now: float, what: str) -> WatchOrder | None:
        """A kept watch message worth handing over (a live add), or None (said why)."""
        try:
            order = decode_watch(data, self.config)
        except BadMessage as exc:
            self._rejected(exc, what)
            return None
        if order.published > now + WATCH_MAX_AGE:
            self._rejected(
                BadMessage(
                    f"watch {order.op} {order.source}: published in the future "
                    f"({order.published - now:.0f} s ahead: a clock is off)",
                    "stale watch",
                ),
                what,
            )
            return None
        return order if order.op == "add" and order.expires_at > now + 1 else None

    @staticmethod
    def _kind(exc: BadMessage) -> str:
        return "watch" if str(exc).startswith("watch ") else "trigger"

    def _rejected(self, exc: BadMessage, what: str = "") -> None:
        self.sink.ignored("rejected")
        self.budget.note(
            "rejected",
            exc.kind,
            lambda: event(
                self.log,
                logging.WARNING,
                "rejected",
                f"{what or self._kind(exc) + ' on ' + self.config.channel} ignored: {exc}",
                channel=self.config.channel,
                reason=str(exc),
                kind=exc.kind,
            ),
        )

    def _check_step(self, trigger: Trigger) -> None:
        """An epoch at most `max_epoch_step` ahead of the one live here. Before its first
        pass a host joins at the fleet's epoch (`known`, from the catch-up) instead."""
        base = self.sink.applied_epoch() or self.sink.known_epoch()
        step = self.config.max_epoch_step
        if trigger.epoch - base > step:
            raise BadMessage(
                f"epoch {trigger.epoch} is {trigger.epoch - base} ahead of epoch {base} on "
                f"this host: expected at most redis.max_epoch_step {step} ahead",
                "too far ahead",
            )

    def _catch_up(self, client: redis.Redis, connecting: bool = False) -> int:
        """Read the fleet's epoch: move to it if newer, put back ours if Redis is behind.
        `connecting`: also say so when the host is already at the fleet's epoch.

        A host that never applied an epoch joins at the fleet's, whatever it is (up to
        `MAX_EPOCH`); any other host follows it only `max_epoch_step` at a time (an epoch
        further ahead is reported once, with the command to follow it on purpose)."""
        try:
            epoch = read_epoch(client, self.config)
        except BadMessage as exc:  # a bad last trigger: a put-back writes a good one
            self._report(f"cannot read the fleet epoch: {exc}")
            epoch, connecting = 0, False
        except MtdError as exc:  # a key no put-back can raise either: said once, left alone
            self._report(f"cannot read the fleet epoch: {exc}")
            return self.sink.known_epoch()
        known = self.sink.known_epoch()
        if connecting and epoch == known:
            event(
                self.log,
                logging.INFO,
                "redis",
                f"fleet epoch {epoch} ({self.config.epoch_key}): this host is at it",
                epoch=epoch,
            )
        applied = self.sink.applied_epoch()
        if epoch > known and applied and epoch - applied > self.config.max_epoch_step:
            self._report(
                f"catch-up: {self.config.epoch_key} is at epoch {epoch}, {epoch - applied} "
                f"ahead of epoch {applied} on this host: expected at most redis.max_epoch_step "
                f"{self.config.max_epoch_step}: not followed (if the fleet really moved that "
                f'far, write {{"epoch": {epoch}}} to this host\'s epoch file; {RECOVER})'
            )
            return epoch
        if epoch > known:
            event(
                self.log,
                logging.INFO,
                "trigger",
                f"catch-up: {self.config.epoch_key} is at epoch {epoch}, this host at {known}",
                epoch=epoch,
                known=known,
                origin="catch-up",
            )
            self.sink.trigger(Trigger(epoch, None, "catch-up"))
            return epoch
        if epoch < applied:
            try:
                # A fresh Redis (or one that restarted without its data) holds no epoch: to
                # be filled in, not warned about as a fleet behind this host.
                absent = epoch == 0 and not client.exists(
                    self.config.epoch_key, self.config.last_key
                )
                raised = put_back(client, self.config, applied)
            except MtdError as exc:
                self._report(str(exc))
                return epoch
            why = getattr(self.sink, "ahead_reason", None)  # a sink may not know
            reason = why(applied) if why else None
            if raised:
                self._reported = None
            if raised and reason:
                event(
                    self.log,
                    logging.INFO,
                    "redis",
                    f"{self.config.epoch_key} raised from epoch {epoch} to {applied}: {reason}, "
                    "so the fleet follows",
                    epoch=applied,
                    was=epoch,
                    reason=reason,
                )
            elif raised and absent:
                event(
                    self.log,
                    logging.INFO,
                    "redis",
                    f"{self.config.epoch_key} not set (a new Redis, or one that restarted "
                    f"without its data): put back epoch {applied}, this host's",
                    epoch=applied,
                )
            elif raised:
                event(
                    self.log,
                    logging.WARNING,
                    "redis",
                    f"{self.config.epoch_key} was at epoch {epoch}, behind this host: "
                    f"put back epoch {applied}",
                    epoch=applied,
                    was=epoch,
                )
            return applied
        if epoch < known:
            return known
        self._reported = None
        return epoch

    def _report(self, problem: str) -> None:
        """A bad key is logged when it appears, not on every check."""
        if problem != self._reported:
            self._reported = problem
            event(self.log, logging.ERROR, "error", problem, error=problem)


def start_subscriber(
    config: BusConfig, sink: Sink, wait: float = 0.0, logger: logging.Logger = LOG
) -> Subscriber:
    """Start following the bus; wait up to `wait` s for the first connection attempt."""
    sub = Subscriber(config, sink, logger)
    sub.start()
    if wait > 0:
        sub.first_attempt.wait(wait)
    return sub
