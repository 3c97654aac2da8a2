"""The fleet's messages on Redis, as data: the rotation trigger, the "fetch now" notice and the
watch order, their JSON form and their HMAC-SHA256 signatures. Pure (no Redis, no clock: the
caller says what time it is), so every decoder can be fuzzed alone.

A message is data from whoever can publish: it is bounded in size before it is parsed, may
hold only its own keys, and anything else is a `BadMessage` in one line, never acted on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from reconciler import defaults
from reconciler.core import watch
from reconciler.core.shuffle import MAX_EPOCH


class Keys(Protocol):
    """What a codec needs of the bus's settings (`adapters.bus.BusConfig`)."""

    @property
    def channel(self) -> str: ...

    @property
    def signing_key(self) -> bytes | None: ...

    @property
    def max_message_bytes(self) -> int: ...


MESSAGE_KEYS = frozenset({"epoch", "time", "sig"})


FORMAT = '{"epoch": N, "time": UNIX_SECONDS[, "sig": HEX]}'


class BadMessage(Exception):
    """A message that is not a valid trigger; `str()` is the one line to log, `kind` the
    reason it is counted under in a flood's summary."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


# Received on the channel, or read from the epoch key (a catch-up after a reconnect).
TriggerOrigin = Literal["message", "catch-up"]
WatchOp = Literal["add", "del"]


@dataclass(frozen=True)
class Trigger:
    """An epoch to converge to. `published` (unix time) is known for messages only."""

    epoch: int
    published: float | None
    origin: TriggerOrigin


def signature(key: bytes, channel: str, epoch: int, published: float) -> str:
    """Bound to the channel too, so a trigger of one fleet cannot be replayed on another."""
    text = f"mtd/trigger/v1\n{channel}\n{epoch}\n{published:.6f}"
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def encode(config: Keys, epoch: int, published: float) -> bytes:
    msg: dict[str, Any] = {"epoch": epoch, "time": published}
    if config.signing_key is not None:
        msg["sig"] = signature(config.signing_key, config.channel, epoch, published)
    return json.dumps(msg, separators=(",", ":")).encode()


def _reject_constant(name: str) -> float:
    raise ValueError(name)


def decode(data: bytes | str, config: Keys) -> Trigger:
    """A trigger from a message, or `BadMessage` saying what is wrong with it."""
    return _trigger(_envelope(data, config, MESSAGE_KEYS, FORMAT), config)


def _trigger(msg: dict, config: Keys) -> Trigger:
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


def _envelope(data: bytes | str, config: Keys, keys: frozenset[str], fmt: str) -> dict:
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


def encode_pull(config: Keys, channel: str, published: float) -> bytes:
    msg: dict[str, Any] = {"time": published}
    if config.signing_key is not None:
        msg["sig"] = pull_signature(config.signing_key, channel, published)
    return json.dumps(msg, separators=(",", ":")).encode()


def decode_pull(data: bytes | str, config: Keys, channel: str, now: float) -> float:
    """The publish time of a "fetch now" notice, or `BadMessage`. It carries no repository,
    branch or commit: the daemon fetches what it is configured to follow, nothing else.
    Like a watch message it must be at most `WATCH_MAX_AGE` old (or early): a notice kept
    by someone is not replayable after a restart, when the list of those seen is empty."""
    msg = _envelope(data, config, PULL_KEYS, PULL_FORMAT)
    published = _publish_time(msg)
    if config.signing_key is not None:
        _check_signature(msg, pull_signature(config.signing_key, channel, published))
    if abs(now - published) > WATCH_MAX_AGE:
        raise BadMessage(
            f"time {published:.0f}: published {now - published:.0f} s from now: expected "
            f"within {WATCH_MAX_AGE:g} s (replayed, or a clock is off)",
            "stale",
        )
    return published


WATCH_KEYS = frozenset({"watch", "source", "for", "reason", "time", "sig", "origin"})


WATCH_FORMAT = (
    '{"watch": "add"|"del", "source": ADDRESS, "for": SECONDS, "reason": TEXT, '
    '"time": UNIX_SECONDS[, "origin": "crowdsec"][, "sig": HEX]}'
)


WATCH_ORIGINS = ("crowdsec",)  # a message may name these; without one it is the fleet's


ANY_FORMAT = f"{FORMAT} or {WATCH_FORMAT}"


WATCH_MAX_AGE = 300.0  # seconds a watch message on the channel may be old (or early: clocks)


@dataclass(frozen=True)
class WatchOrder:
    """A dynamic watch change from the fleet: add (for `seconds` from `published`) or del."""

    op: WatchOp
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


def encode_watch(config: Keys, order: WatchOrder) -> bytes:
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


def decode_message(data: bytes | str, config: Keys, now: float) -> Trigger | WatchOrder:
    """A message on the rotation channel: a `Trigger`, or a `WatchOrder` (which must be
    at most `WATCH_MAX_AGE` old), or `BadMessage`. Both pass the same envelope checks."""
    msg = _envelope(data, config, MESSAGE_KEYS | WATCH_KEYS, ANY_FORMAT)
    if "watch" in msg:
        order = _watch(msg, config)
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


def decode_watch(data: bytes | str, config: Keys) -> WatchOrder:
    """A watch message (as kept in `watch_key`), or `BadMessage`; no age check."""
    return _watch(_envelope(data, config, WATCH_KEYS, WATCH_FORMAT), config)


def _watch(msg: dict, config: Keys) -> WatchOrder:
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


def _preview(raw: bytes) -> str:
    return repr(raw[:32]) + ("..." if len(raw) > 32 else "")


def _short(value: object) -> str:
    """A value from a message, shown in at most ~40 characters (a nested object can be big)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."
