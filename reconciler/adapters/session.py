"""Which SSH session a command runs in: `SSH_CONNECTION`, from the environment or from the
closest process above that has it (`sudo` resets the environment, but its own process
still holds the one it was started with)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

VARIABLE = "SSH_CONNECTION"
_MAX_DEPTH = 64  # a loop in /proc (it cannot happen, but a walk must end)


def ssh_connection(environ: Mapping[str, str] | None = None, proc: str = "/proc") -> str | None:
    """`SSH_CONNECTION` of this command's session; None when there is none. Set in the
    environment (even empty: "not an SSH session") it is taken as is; absent, the parent
    processes are asked, nearest first."""
    env = os.environ if environ is None else environ
    if VARIABLE in env:
        return env[VARIABLE].strip() or None
    pid = os.getppid()
    for _ in range(_MAX_DEPTH):
        if pid <= 1:
            return None
        found = _from_environ(Path(proc, str(pid), "environ"))
        if found is not None:
            return found.strip() or None
        pid = _parent(Path(proc, str(pid), "stat"))
    return None


def _from_environ(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None  # gone, or another user's: ask its parent
    prefix = VARIABLE.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode("utf-8", "replace")
    return None


def _parent(path: Path) -> int:
    """The parent pid from /proc/PID/stat (the command name may hold spaces and parens:
    the fields start after its last ')')."""
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return 0
