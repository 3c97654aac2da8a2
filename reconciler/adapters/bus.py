"""The Redis bus's operations: the fleet's epoch, rotation triggers, pull notices, watch
messages and heartbeats, each one command or short script. Split by what it does:
- `core.messages`: the message formats and their HMAC signatures (pure; re-exported here);
- `adapters.redislink`: settings, plain and Sentinel URLs, `connect` (re-exported here);
- this module: the keys and channels. The epoch key (`redis.epoch_key`, an integer) and
  next to it `<epoch_key>:last`, the last trigger published, so a subscriber that was away
  can catch up (and, with signing on, check that the epoch it catches up to was signed);
  `publish_rotation` increments the epoch and publishes it in one transaction; `put_back`
  raises the key to an epoch a daemon knows (compare-and-set in Lua), so that after Redis
  lost its data the next trigger still moves every host forward;
- `adapters.subscriber`: the thread that follows them for the daemon.

Anyone who can publish on the channel (or write the keys) is untrusted: an epoch beyond
`MAX_EPOCH`, or more than `redis.max_epoch_step` ahead of the epoch this host last applied,
is rejected and never put back into Redis. Every key is read by a short script that checks
its type and length first (`read_strings`, `read_hash`): nothing larger than mtd's own
values ever leaves Redis.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import redis
import redis.connection

from reconciler.adapters.credentials import redact  # noqa: F401 (`bus.redact`: one for all URLs)
from reconciler.adapters.redislink import (  # noqa: F401 (callers know them as `bus.*`)
    LOG_WINDOW,
    MAX_EPOCH_STEP,
    SENTINEL_FORM,
    BusConfig,
    SentinelTarget,
    _one_line,
    configured,
    connect,
    describe,
    is_sentinel,
    parse_sentinel_url,
    read_signing_key,
    sentinel_url,
)
from reconciler.core import messages
from reconciler.core.messages import (  # noqa: F401 (callers know them as `bus.*`)
    ANY_FORMAT,
    FORMAT,
    LATENCY_SKEW,
    MESSAGE_KEYS,
    PULL_FORMAT,
    PULL_KEYS,
    WATCH_FORMAT,
    WATCH_KEYS,
    WATCH_MAX_AGE,
    WATCH_ORIGINS,
    BadMessage,
    Trigger,
    WatchOrder,
    _preview,
    _short,
    decode,
    decode_watch,
    encode,
    encode_pull,
    encode_watch,
    plausible,
    pull_signature,
    signature,
    watch_signature,
)
from reconciler.core.shuffle import MAX_EPOCH
from reconciler.errors import BusError, MtdError
from reconciler.logs import LOGGER

RECOVER = "see docs/fleet.md, Recovering the fleet epoch"
MAX_HOSTS = 100_000  # heartbeat records `mtd fleet status` reads at most
REPLICA_WAIT = 1.0  # seconds a sentinel publish waits for one replica to acknowledge it
FAILOVER_WAIT = 15.0  # seconds a sentinel publish keeps retrying while a failover runs
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


@dataclass(frozen=True)
class Published:
    epoch: int
    published: float
    receivers: int
    replicas: int | None = None  # Sentinel deployments: replicas that acknowledged it


def decode_pull(
    data: bytes | str, config: BusConfig, channel: str, now: float | None = None
) -> float:
    """`messages.decode_pull` at this moment (or `now`)."""
    return messages.decode_pull(data, config, channel, time.time() if now is None else now)


def decode_message(
    data: bytes | str, config: BusConfig, now: float | None = None
) -> Trigger | WatchOrder:
    """`messages.decode_message` at this moment (or `now`)."""
    return messages.decode_message(data, config, time.time() if now is None else now)


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
