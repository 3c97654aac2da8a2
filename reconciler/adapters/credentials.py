"""The one place that masks credentials in text meant for people: URLs in messages, logs,
errors, `mtd status`, pull.json and the audit log.

It errs on the side of masking: the whole user-info part of a URL (a token is often the
user name), up to the LAST `@` of the URL (a password may contain `@`, `/`, `?` or `#`
unencoded), and the value of any password-like query parameter (`?password=` is a form
redis-py accepts; `&sentinel_password=` a Sentinel URL's).
"""

from __future__ import annotations

import re

MASK = "***"
# scheme://userinfo@ where userinfo runs to the last `@` before whitespace or a quote.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s'\"<>]*@")
_QUERY = re.compile(
    r"(?P<key>[?&;](?:[a-z]+_)?(?:password|passwd|pass|pwd|token|secret|auth)=)[^&;#\s'\"<>]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`redis://user:p@ss@db/0?password=x` -> `redis://***@db/0?password=***`."""
    text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    return _QUERY.sub(rf"\g<key>{MASK}", text)
