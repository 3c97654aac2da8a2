"""A real redis-server for tests: on a free loopback port, or inside a lab namespace.

No persistence (`--save '' --appendonly no`), in the foreground, always stopped: `stop()`
kills it, and a server inside a lab dies with the lab's namespaces anyway.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.lab import Lab

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS is None or shutil.which("redis-cli") is None,
    reason="needs redis-server and redis-cli (make deb)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """`host`/`port` where it listens; `lab`/`role`: the namespace it runs in (None: here)."""

    def __init__(
        self,
        workdir: Path,
        *,
        lab: Lab | None = None,
        role: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.lab, self.role = lab, role
        self.host = host
        self.port = port or (6379 if lab else free_port())
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/0"

    def _argv(self, argv: list[str]) -> list[str]:
        if self.lab is None:
            return argv
        assert self.role is not None
        return ["ip", "netns", "exec", self.lab.hosts[self.role].ns, *argv]

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            self._argv(argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.cli("PING", check=False) == "PONG":
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None

    def cli(self, *args: str, check: bool = True) -> str:
        """One redis-cli command (raw output, no quoting), in the server's namespace."""
        argv = ["redis-cli", "--raw", "-h", self.host, "-p", str(self.port), *args]
        proc = subprocess.run(
            self._argv(argv), capture_output=True, text=True, check=False, timeout=10
        )
        if check and (proc.returncode != 0 or proc.stdout.startswith("ERR")):
            raise RuntimeError(f"redis-cli {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout.strip()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def redis_server(workdir: Path, **kw: object) -> Iterator[RedisServer]:
    server = RedisServer(workdir, **kw)  # type: ignore[arg-type]
    try:
        yield server.start()
    finally:
        server.stop()
