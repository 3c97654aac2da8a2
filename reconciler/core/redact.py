"""One way to hide credentials in text that reaches a terminal, a log or pull.json.

Pure. Used for Redis URLs (bus) and git URLs and error messages (git) alike, so a
credential is masked the same way wherever it shows up.
"""

from __future__ import annotations

import re

# scheme://userinfo@ : the userinfo runs to the LAST @ of the token, so a password that
# contains a raw @ (or a /) is masked whole rather than cut at its first @.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s'\"<>]*@")
# ?password=... and friends (redis-py reads the password from the query string too).
_QUERY = re.compile(r"(?P<key>[?&](?:password|passwd|pass|pwd|token|secret)=)[^&#\s'\"<>]*", re.I)


def redact(text: str) -> str:
    """`https://bob:s3cret@host/x` -> `https://***@host/x`; `?password=x` -> `?password=***`."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _QUERY.sub(r"\g<key>***", text)
