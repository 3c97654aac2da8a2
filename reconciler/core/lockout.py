"""No lockouts: would a change move the port of the SSH session it is run from?

The session itself is an established connection and survives any change (the ruleset leaves
established flows alone); the risk is the operator's NEXT connection. So the question is
narrow: the server port of the session (`SSH_CONNECTION`'s fourth field, the port sshd sees,
which is always the real one) as its client address finds it now, and after the change. The
other services may move as the state says: the operator can still log in and fix it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reconciler.errors import MtdError

FIX = "add it to trusted, or pass --force"


@dataclass(frozen=True)
class Session:
    """The client address (canonical, the form the packets carry) and the server port."""

    source: str
    port: int

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.source).version


def parse(text: str) -> Session:
    """`SSH_CONNECTION`: `CLIENT_ADDR CLIENT_PORT SERVER_ADDR SERVER_PORT`. An IPv4 client of
    a dual-stack sshd shows as `::ffff:192.0.2.3`: its packets are IPv4, so is the result; a
    link-local client keeps no zone (`fe80::1%eth0`), which addresses never carry."""
    fields = text.split()
    expected = (
        "expected 'CLIENT_ADDR CLIENT_PORT SERVER_ADDR SERVER_PORT' (or --force to skip "
        "the session check)"
    )
    if len(fields) != 4:
        raise MtdError(f"SSH_CONNECTION {text[:120]!r}: {expected}")
    client, _, _, port = fields
    if not (port.isascii() and port.isdigit()):
        raise MtdError(f"SSH_CONNECTION {text[:120]!r}: {expected}")
    try:
        addr = ipaddress.ip_address(client.split("%", 1)[0])
        number = int(port, 10)
    except ValueError:
        raise MtdError(f"SSH_CONNECTION {text[:120]!r}: {expected}") from None
    if not 0 < number < 65536:
        raise MtdError(f"SSH_CONNECTION {text[:120]!r}: {expected}")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return Session(str(addr), number)


def seen_at(moves: Mapping[str, Mapping[int, int]], port: int) -> int:
    """Where a source finds TCP `port`, given its moves (`audit.SourceView.moves`)."""
    return moves.get("tcp", {}).get(port, port)


def trusted(source: str, prefixes: Iterable[object]) -> bool:
    """Whether `source` is inside one of the state's `trusted` prefixes."""
    addr = ipaddress.ip_address(source)
    for prefix in prefixes:
        net = ipaddress.ip_network(str(prefix), strict=False)
        if net.version == addr.version and addr in net:
            return True
    return False


def refusal(session: Session, now: int, after: int, *, is_trusted: bool) -> str | None:
    """One line saying why the change is refused, or None when the next connection still
    reaches sshd where the client finds it now."""
    if now == after or is_trusted:
        return None
    return (
        f"this SSH session comes from {session.source} to tcp port {session.port}, and this "
        f"change moves that port for {session.source}: its next connection would be locked "
        f"out (the session itself survives): {FIX.replace('it', session.source, 1)}"
    )
