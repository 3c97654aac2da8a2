"""Addresses as the state writes them: parsed fast, printed as an operator writes them, and
IPv4-mapped ones named by their IPv4 form. Pure, and below `state` (which re-exports them)."""

from __future__ import annotations

import ipaddress
import socket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """`ipaddress.ip_network(text, strict=True)`, faster for a plain IPv4 address (there may
    be 100k of them): the C parser accepts only the canonical dotted quad."""
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return ipaddress.ip_network(text, strict=True)
    return ipaddress.IPv4Network((int.from_bytes(packed, "big"), 32))


_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def ipv4_mapped(net: Network) -> ipaddress.IPv4Network | None:
    """The IPv4 network an IPv4-mapped one (`::ffff:192.0.2.0/120`) stands for, else None.
    How a dual-stack socket names an IPv4 peer; no packet ever comes from such a source."""
    if net.version != 6 or not net.subnet_of(_V4_MAPPED):  # type: ignore[arg-type]
        return None
    return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))


def plain(net: Network) -> str:
    """A host as an address, a prefix in CIDR: as an operator writes them."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
