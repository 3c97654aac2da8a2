"""Synthetic desired states with many watched sources, for the benchmarks only.

Bulk sources are map keys that never send a packet: IPv4 hosts are consecutive addresses of
100.64.0.0/10 (shared address space, 4M addresses: documentation ranges are too small for
100k sources) and IPv6 sources are /48 prefixes of 2001:db8::/32 (documentation), from
2001:db8:1000::/48 on, away from the lab's 2001:db8::/64 and 2001:db8:bad::/48. The one
source that does send packets, the lab client `unt` (192.0.2.3), is always the last entry,
so in the classic template its rules are the last ones every packet walks past.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import yaml

SERVICES = [1, 2, 3, 4, 5]
PORT_RANGE = [1, 60000]
BULK_V4 = int(ipaddress.IPv4Address("100.64.0.0"))
UNDER_TEST = "192.0.2.3"
V6_SHARE = 10  # with IPv6: one source in this many is an IPv6 /48 prefix


def sources(n: int, ipv6: bool = False) -> list[str]:
    """n sources, the last one being the lab client under test."""
    out = []
    for i in range(n - 1):
        if ipv6 and i % V6_SHARE == 0:
            out.append(f"2001:db8:{0x1000 + i // V6_SHARE:x}::/48")
        else:
            out.append(str(ipaddress.IPv4Address(BULK_V4 + 1 + i)))
    return [*out, UNDER_TEST]


def document(
    n: int, *, template: str = "maps", ipv6: bool = False, redis: str | None = None, workdir: Path
) -> dict:
    doc = {
        "table": "mtd",
        "template": template,
        "secret_file": str(workdir / "secret"),
        "audit_log": str(workdir / "audit.jsonl"),
        "ports": {"range": PORT_RANGE, "services": {"tcp": SERVICES}},
        "watched": [{"source": s} for s in sources(n, ipv6)],
    }
    if redis:
        doc["redis"] = {"url": redis}
    return doc


def write(
    path: Path, n: int, *, template: str = "maps", ipv6: bool = False, redis: str | None = None
) -> Path:
    """The state file, with its secret, epoch and audit log in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = document(n, template=template, ipv6=ipv6, redis=redis, workdir=path.parent)
    path.write_text(yaml.dump(doc, Dumper=yaml.CSafeDumper, sort_keys=False))
    return path
