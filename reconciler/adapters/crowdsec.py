"""A CrowdSec Local API client for a bouncer: `GET /v1/decisions/stream` with its key.

The Local API is another program, so its answers are input: the body is read up to
`MAX_BYTES` (a larger one is refused before it is parsed), must be JSON of the stream's
shape (`{"new": [...]|null, "deleted": [...]|null}`) and hold at most `MAX_DECISIONS`
decisions. Nothing is followed elsewhere (no redirect, no proxy from the environment), and
the key is sent in its header and nowhere else: never in a message, a log or an error.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from reconciler.adapters import files
from reconciler.adapters.credentials import redact
from reconciler.core import crowdsec
from reconciler.errors import MtdError

MAX_BYTES = 32 << 20  # a startup list of 100,000 decisions is about 25 MB
# JSON values in one answer, counted on the bytes before parsing (an upper bound): a decision
# has about 23, and 32 MB of `[],` were 11 million lists, 857 MB in Python, every pull.
MAX_VALUES = 32 * crowdsec.MAX_DECISIONS
TIMEOUT = 10.0  # seconds for one request (connect and each read)
TOTAL = 60.0  # seconds a whole answer may take (a peer dribbling bytes holds no more)
STREAM = "/v1/decisions/stream"
USER_AGENT = "mtd-bouncer"
INTERVAL = 2.0  # seconds between two pulls: a ban is watched within seconds


class LapiError(MtdError):
    """The Local API did not answer as a stream does; `str()` is the one line to show."""


@dataclass(frozen=True)
class Config:
    """`crowdsec:` of the host's configuration."""

    url: str
    key_file: str
    interval: float

    @classmethod
    def from_state(cls, state: Any) -> Config | None:
        """None when the host's configuration names no Local API."""
        doc = state.doc.get("crowdsec")
        if not doc:
            return None
        interval = float(doc.get("interval", INTERVAL))
        return cls(str(doc["url"]).rstrip("/"), str(doc["key_file"]), interval)

    @property
    def where(self) -> str:
        return redact(self.url)


def read_key(path: str) -> str:
    """The bouncer key (`cscli bouncers add NAME -o raw`): a 0600 file, one printable
    token, never echoed."""
    raw = files.read_private_key(path, "crowdsec.key_file", strip=True)
    try:
        key = raw.decode("ascii")
    except UnicodeDecodeError:
        key = ""
    if not key or not key.isprintable() or any(c.isspace() for c in key):
        raise MtdError(f"{path}: crowdsec.key_file: expected one printable key on one line")
    return key


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None  # the key goes to the configured Local API alone


class Lapi:
    """One Local API, with the bouncer's key."""

    def __init__(self, url: str, key: str, timeout: float = TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MtdError(
                f"crowdsec.url {redact(url)!r}: expected http(s)://HOST:PORT such as "
                "http://127.0.0.1:8080"
            )
        self.url, self.where, self.timeout = url.rstrip("/"), redact(url), timeout
        self._key = key
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def stream(self, startup: bool) -> tuple[list[Any], list[Any]]:
        """(new, deleted): every live decision with `startup`, else what changed since
        this bouncer's last pull."""
        url = f"{self.url}{STREAM}?startup={'true' if startup else 'false'}"
        request = urllib.request.Request(
            url, headers={"X-Api-Key": self._key, "User-Agent": USER_AGENT}
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > MAX_BYTES:
                    raise LapiError(self._too_large(int(length)))
                body = self._read(response)
        except urllib.error.HTTPError as exc:
            raise LapiError(self._status(exc.code)) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            why = getattr(exc, "reason", None) or exc
            why = getattr(why, "strerror", None) or why
            raise LapiError(f"crowdsec {self.where}: unreachable: {why}") from None
        if len(body) > MAX_BYTES:
            raise LapiError(self._too_large(len(body)))
        return parse(body, self.where)

    def _read(self, response: Any) -> bytes:
        """The body, at most `MAX_BYTES + 1` bytes and `TOTAL` seconds."""
        deadline = time.monotonic() + TOTAL
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BYTES:
            chunk = response.read1(min(1 << 16, MAX_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise LapiError(
                    f"crowdsec {self.where}: an answer still coming after {TOTAL:g} s: "
                    "expected the decision stream at once"
                )
        return b"".join(chunks)

    def _status(self, code: int) -> str:
        if code in (401, 403):
            return (
                f"crowdsec {self.where}: the bouncer key was refused (HTTP {code}): expected a "
                "key made by `cscli bouncers add NAME -o raw` in crowdsec.key_file"
            )
        return f"crowdsec {self.where}: HTTP {code} from {STREAM}: expected 200"

    def _too_large(self, size: int) -> str:
        return f"crowdsec {self.where}: an answer of {size} bytes: expected at most {MAX_BYTES}"


def parse(body: bytes, where: str = "crowdsec") -> tuple[list[Any], list[Any]]:
    """The stream's two lists, or `LapiError` in one line."""
    form = '{"new": [DECISION, ...] or null, "deleted": [DECISION, ...] or null}'
    values = sum(body.count(c) for c in (b",", b":", b"[", b"{"))
    if values > MAX_VALUES:
        raise LapiError(
            f"crowdsec {where}: an answer of about {values} JSON values: expected at most "
            f"{MAX_VALUES} ({crowdsec.MAX_DECISIONS} decisions)"
        )
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise LapiError(f"crowdsec {where}: an answer that is not JSON: expected {form}") from None
    if not isinstance(data, dict):
        raise LapiError(f"crowdsec {where}: expected {form}")
    out: list[list[Any]] = []
    for name in ("new", "deleted"):
        items = data.get(name)
        if items is None:
            items = []
        if not isinstance(items, list):
            raise LapiError(f"crowdsec {where}: {name} is not a list: expected {form}")
        if len(items) > crowdsec.MAX_DECISIONS:
            raise LapiError(
                f"crowdsec {where}: {len(items)} {name} decisions: expected at most "
                f"{crowdsec.MAX_DECISIONS}"
            )
        out.append(items)
    return out[0], out[1]
