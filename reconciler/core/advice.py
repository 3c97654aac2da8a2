"""What a valid state declares that cannot work, in one line each: nothing is refused, but
the operator should know (`mtd validate`, every command once a process, the daemon)."""

from __future__ import annotations

import ipaddress

from reconciler.core.state import PROTOCOLS, State

_WHOLE = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}


def warnings(state: State) -> list[str]:
    """What the state declares that cannot work, one line each (it is valid: nothing is
    refused, but the operator should know): a tripwire no source can reach, a state that
    hides nothing."""
    out = []
    moved = {p: [s for s in state.services[p] if s not in state.fixed[p]] for p in PROTOCOLS}
    if not any(state.services.values()):
        out.append("ports.services: no service port: this state hides nothing")
    elif not any(moved.values()):
        out.append(
            "ports.fixed: every service port is fixed: this state hides nothing "
            "(expected some services left to move)"
        )
    elif not state.watched and state.tripwire is None:
        out.append(
            "watched: no source and no tripwire: this state hides nothing until `mtd watch "
            "add` names a source"
        )
    if state.tripwire is not None:
        if not any(state.tripwire.ports.values()):
            out.append("tripwire: no port listed: it can never fire")
        else:
            covered = [v for v in (4, 6) if _all_listed(state, v)]
            if covered == [4, 6]:
                out.append(
                    "tripwire: every IPv4 and IPv6 source is watched or trusted already "
                    "(it catches only unlisted sources): it can never fire"
                )
            elif covered:
                out.append(
                    f"tripwire: every IPv{covered[0]} source is watched or trusted already "
                    f"(it catches only unlisted sources): it can fire for IPv"
                    f"{10 - covered[0]} sources only"
                )
    return out


def _all_listed(state: State, version: int) -> bool:
    """Whether the watched and trusted prefixes of one family cover its whole space."""
    nets = [w.source for w in state.watched if w.source.version == version]
    nets += [t for t in state.trusted if t.version == version]
    if not nets:
        return False
    if any(n.prefixlen == 0 for n in nets):
        return True
    return list(ipaddress.collapse_addresses(nets)) == [_WHOLE[version]]  # type: ignore[misc]
