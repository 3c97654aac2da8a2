"""Whether this process may use nftables at all: CAP_NET_ADMIN in its effective set.

Checked before the first libnftables call of a command, so that a user without it reads one
line saying what to do, instead of libnftables' own line on stderr ("Operation not permitted
(you must be root)") followed by a refusal that names whatever command came first (`down`
said "refused rendered command 0").
"""

from __future__ import annotations

from pathlib import Path

from reconciler.errors import KernelError

CAP_NET_ADMIN = 12


def has_net_admin(status: str | None = None) -> bool:
    """From /proc/self/status (`CapEff:`); True when it cannot be read (let the kernel say)."""
    try:
        text = status if status is not None else Path("/proc/self/status").read_text()
    except OSError:
        return True
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
            except (IndexError, ValueError):
                return True
    return True


def message(command: str, uid: int) -> str:
    """The one line for a command that needs nftables without the capability."""
    if uid != 0:
        return f"{command}: not root: nftables needs CAP_NET_ADMIN: run it as root (sudo {command})"
    return (
        f"{command}: root without CAP_NET_ADMIN (a container, or a unit that drops it): "
        "nftables needs it: grant it (AmbientCapabilities=CAP_NET_ADMIN, or --cap-add "
        "NET_ADMIN)"
    )


def require(command: str) -> None:
    """`KernelError` (one line) when nftables cannot be used by this process."""
    import os

    if not has_net_admin():
        raise KernelError(message(command, os.geteuid()))
