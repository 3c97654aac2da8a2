"""Reaching the fleet's Redis: its settings from the state (`BusConfig`), plain and Sentinel
URLs (`redis+sentinel://`), the signing key, and `connect`, the one place a client is made,
so every caller follows a failover by reconnecting. The bus's operations are `bus`'s.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.connection
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from reconciler import defaults
from reconciler.adapters import files
from reconciler.adapters.credentials import redact
from reconciler.core.state import REDIS_DEFAULTS, State
from reconciler.errors import BusError, MtdError

MAX_EPOCH_STEP = int(REDIS_DEFAULTS["max_epoch_step"])


LOG_WINDOW = 60.0  # seconds between summary lines of a flood


SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}


SENTINEL_PORT = 26379


SENTINEL_FORM = "redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]"


SENTINEL_PARAMS = ("sentinel_username", "sentinel_password")  # query: the Sentinels' own login


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


def describe(exc: BaseException) -> str:
    """A Redis error as one line for the user (no password: redis-py never puts one there)."""
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, MasterNotFoundError):  # its text lists every Sentinel client's repr
        return str(exc).split(" : ", 1)[0] + ": the Sentinels know no live master"
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__
