"""A real redis-server for tests (reconciler.lab.RedisServer): on a free loopback port, or
inside a lab namespace. No persistence, in the foreground, always stopped.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.lab.netns import RedisServer, free_port

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS is None or shutil.which("redis-cli") is None,
    reason="needs redis-server and redis-cli (make deb)",
)


@contextlib.contextmanager
def redis_server(workdir: Path, **kw: object) -> Iterator[RedisServer]:
    server = RedisServer(workdir, **kw)  # type: ignore[arg-type]
    try:
        yield server.start()
    finally:
        server.stop()


__all__ = ["RedisServer", "free_port", "needs_redis", "redis_server"]
