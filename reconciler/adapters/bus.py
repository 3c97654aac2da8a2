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
  exponential backoff. It only reports; what to do is the daemon's business.

A replay is a message whose epoch is not newer than the one the daemon knows, or whose
signature does not match: the signature covers the epoch, and epochs only move forward.

Anyone who can publish on the channel (or write the keys) is untrusted: an epoch beyond
`MAX_EPOCH`, or more than `redis.max_epoch_step` ahead of the epoch this host last applied,
is rejected and never put back into Redis; rejections are logged a few at a time, then as
one summary line per `LOG_WINDOW` with counts by reason, so a flood cannot flood the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.retry import Retry

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
MESSAGE_KEYS = frozenset({"epoch", "time", "sig"})
FORMAT = '{"epoch": N, "time": UNIX_SECONDS[, "sig": HEX]}'
LOG = logging.getLogger(f"{LOGGER}.bus")

# Raise the epoch key to ARGV[1] unless it is already there or beyond; store the matching
# trigger message (ARGV[2]) with it. Atomic, so concurrent daemons and publishers never
# lower the epoch.
_PUT_BACK = """
local raw = redis.call('GET', KEYS[1])
local current = 0
if raw then
  current = tonumber(raw)
  if current == nil then
    return redis.error_reply('holds ' .. string.sub(raw, 1, 40) .. ': expected an integer')
  end
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
    reconnect_min: float = defaults.RECONNECT_MIN  # first backoff step, seconds
    reconnect_max: float = defaults.RECONNECT_MAX  # backoff cap, seconds
    check_interval: float = defaults.REDIS_CHECK  # between epoch key reads while connected
    timeout: float = defaults.REDIS_TIMEOUT  # connect and command timeout, seconds

    @property
    def last_key(self) -> str:
        return f"{self.epoch_key}:last"

    @property
    def where(self) -> str:
        """The URL without its password: what messages and logs show."""
        return redact(self.url)

    @classmethod
    def from_state(cls, state: State, **timers: float) -> BusConfig:
        r = state.redis
        key_file = r.get("signing_key_file")
        return cls(
            url=r["url"],
            channel=r["channel"],
            epoch_key=r["epoch_key"],
            signing_key=read_signing_key(key_file) if key_file else None,
            max_message_bytes=int(r["max_message_bytes"]),
            max_epoch_step=int(r.get("max_epoch_step", MAX_EPOCH_STEP)),
            **timers,
        )

    @property
    def local(self) -> bool:
        """A unix socket or a loopback address: only this host's users can publish."""
        parts = urlsplit(self.url)
        host = (parts.hostname or "localhost").lower()
        if parts.scheme == "unix" or host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


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
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > config.max_message_bytes:
        raise BadMessage(
            f"{len(raw)} bytes: expected at most {config.max_message_bytes}", "too large"
        )
    try:
        msg = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadMessage(f"{_preview(raw)}: not JSON: expected {FORMAT}", "not JSON") from None
    if not isinstance(msg, dict):
        raise BadMessage(f"{_preview(raw)}: expected a JSON object {FORMAT}", "not an object")
    unknown = sorted(set(msg) - MESSAGE_KEYS)
    if unknown:
        raise BadMessage(f"unknown key {unknown[0]!r:.40}: expected {FORMAT}", "unknown key")
    epoch, published = msg.get("epoch"), msg.get("time")
    if type(epoch) is not int or not 1 <= epoch <= MAX_EPOCH:
        raise BadMessage(
            f"epoch {_short(epoch)}: expected an integer from 1 to {MAX_EPOCH} (2**40)",
            "bad epoch",
        )
    if type(published) not in (int, float) or not math.isfinite(published) or published < 0:
        raise BadMessage(
            f"time {_short(published)}: expected the publish time in unix seconds", "bad time"
        )
    if config.signing_key is not None:
        sig = msg.get("sig")
        if sig is None:
            raise BadMessage(f"epoch {epoch}: unsigned: expected a signature (sig)", "unsigned")
        want = signature(config.signing_key, config.channel, epoch, float(published))
        if not isinstance(sig, str) or not hmac.compare_digest(sig, want):
            raise BadMessage(
                f"epoch {epoch}: bad signature: expected one made with the key", "bad signature"
            )
    return Trigger(epoch, float(published), "message")


def _preview(raw: bytes) -> str:
    return repr(raw[:32]) + ("..." if len(raw) > 32 else "")


def _short(value: object) -> str:
    """A value from a message, shown in at most ~40 characters (a nested object can be big)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def connect(config: BusConfig) -> redis.Redis:
    """A client that fails fast (no hidden retries): the caller owns backoff and catch-up."""
    tcp: dict[str, Any] = {}
    if urlsplit(config.url).scheme != "unix":  # keepalive is a TCP option (TypeError on unix)
        tcp["socket_keepalive"] = True
    try:
        return redis.Redis.from_url(
            config.url,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            retry=Retry(NoBackoff(), 0),
            client_name="mtd",
            **tcp,
        )
    except (ValueError, TypeError) as exc:
        raise BusError(f"redis.url {config.where!r}: {redact(_one_line(exc))}") from None


def _epoch_value(raw: bytes | None, config: BusConfig) -> int:
    if raw is None:
        return 0
    try:
        value = int(raw)
        if not 0 <= value <= MAX_EPOCH:
            raise ValueError
    except ValueError:
        raise MtdError(
            f"{config.where}: key {config.epoch_key} holds {_preview(raw)}: expected an "
            f"integer epoch from 0 to {MAX_EPOCH} (2**40; {RECOVER})"
        ) from None
    return value


def publish_rotation(config: BusConfig, client: redis.Redis | None = None) -> Published:
    """Increment the fleet's epoch and publish it, atomically (WATCH/MULTI, retried when
    another publisher or a daemon's put-back got in between)."""
    own = client is None
    client = client or connect(config)
    try:
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
                    receivers = pipe.execute()[-1]
                    return Published(epoch, published, int(receivers))
                except redis.WatchError:
                    continue
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
    raw, last = client.mget([config.epoch_key, config.last_key])
    if config.signing_key is None:
        return _epoch_value(raw, config)
    if last is None:
        return 0
    try:
        return decode(last, config).epoch
    except BadMessage:
        return 0


def read_epoch(client: redis.Redis, config: BusConfig) -> int:
    """The fleet's epoch as a subscriber may trust it: the key, or, with signing on, the
    epoch of the signed last trigger (a key anyone with Redis access could have set is not
    enough). 0 when Redis holds none. Raises `BadMessage` for a bad last trigger and
    `MtdError` for a key that is not an integer."""
    raw, last = client.mget([config.epoch_key, config.last_key])
    epoch = _epoch_value(raw, config)
    if config.signing_key is None:
        return epoch
    if last is None:
        return 0
    return decode(last, config).epoch


def put_back(client: redis.Redis, config: BusConfig, epoch: int) -> bool:
    """Raise the key to `epoch` if it is lower or missing; True when it was raised."""
    msg = encode(config, epoch, round(time.time(), 6)) if epoch > 0 else b""
    try:
        done = client.eval(_PUT_BACK, 2, config.epoch_key, config.last_key, epoch, msg)
    except redis.ResponseError as exc:
        raise BusError(f"{config.where}: key {config.epoch_key} {_one_line(exc)}") from None
    return bool(done)


def _one_line(exc: BaseException) -> str:
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
    ) -> None:
        self.log, self.channel = logger, channel
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
                f"{total} more triggers on {self.channel} ignored in {took:.3g} s: "
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
        self._backoff = EqualJitterBackoff(cap=config.reconnect_max, base=config.reconnect_min)
        self._thread: threading.Thread | None = None
        self._reported: str | None = None  # last problem with the key, logged once
        self.budget = LogBudget(logger, config.channel, window=config.log_window)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="mtd-redis", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.budget.flush(force=True)  # a flood's counts are not lost at exit

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

    def _subscribe(self, client: redis.Redis, pubsub: Any) -> None:
        """Subscribe first, then read the key: nothing published in between is missed."""
        pubsub.subscribe(self.config.channel)
        deadline = time.monotonic() + self.config.timeout
        while True:
            msg = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg.get("type") == "subscribe":
                break
            if time.monotonic() >= deadline:
                raise redis.TimeoutError("no reply to SUBSCRIBE")
        epoch = self._catch_up(client)
        self.sink.connection(True)
        event(
            self.log,
            logging.INFO,
            "redis",
            f"{self.config.where}: connected, subscribed to {self.config.channel}, "
            f"fleet epoch {epoch}",
            connected=True,
            channel=self.config.channel,
            epoch=epoch,
        )
        self.first_attempt.set()

    def _listen(self, client: redis.Redis, pubsub: Any) -> None:
        next_check = time.monotonic() + self.config.check_interval
        while not self._stop.is_set():
            wait = min(self.POLL, max(0.0, next_check - time.monotonic()))
            msg = pubsub.get_message(timeout=wait)
            if msg is not None and msg.get("type") == "message":
                self._on_message(msg["data"])
            self.budget.flush()
            if time.monotonic() >= next_check:
                self._catch_up(client)  # a GET with a timeout: a dead link raises here
                next_check = time.monotonic() + self.config.check_interval

    def _on_message(self, data: bytes) -> None:
        try:
            trigger = decode(data, self.config)
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

    def _rejected(self, exc: BadMessage) -> None:
        self.sink.ignored("rejected")
        self.budget.note(
            "rejected",
            exc.kind,
            lambda: event(
                self.log,
                logging.WARNING,
                "rejected",
                f"trigger on {self.config.channel} ignored: {exc}",
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

    def _catch_up(self, client: redis.Redis) -> int:
        """Read the fleet's epoch: move to it if newer, put back ours if Redis is behind.

        A host that never applied an epoch joins at the fleet's, whatever it is (up to
        `MAX_EPOCH`); any other host follows it only `max_epoch_step` at a time (an epoch
        further ahead is reported once, with the command to follow it on purpose)."""
        try:
            epoch = read_epoch(client, self.config)
        except (MtdError, BadMessage) as exc:
            self._report(f"cannot read the fleet epoch: {exc}")
            epoch = 0
        known = self.sink.known_epoch()
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
                raised = put_back(client, self.config, applied)
            except MtdError as exc:
                self._report(str(exc))
                return epoch
            if raised:
                self._reported = None
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
