"""How fast watched sources learn the set of service ports from the shuffle alone.

  service_set.py [TRIALS]   print, for per_source on 0.0.0.0/0 with 16 and 64 buckets, the
                            addresses one epoch needs, and for one address the rotations,
                            until the ports of the range never seen open are exactly the
                            service ports (median and 95th percentile over TRIALS secrets)

Pure simulation against the real shuffle and the kernel's jhash (`core.bucket`): services are
never drawn as targets, so the ports of the range that no view ever shows open are exactly
the service ports once every other port has shown up somewhere.
"""

from __future__ import annotations

import ipaddress
import os
import random
import statistics
import sys

if __package__ in (None, ""):  # run as a script: import from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reconciler.core import bucket, shuffle
from reconciler.core.state import parse

SERVICES = [1, 2, 3, 4, 5]
RANGE = range(1, 21)


def state(buckets: int):  # type: ignore[no-untyped-def]
    doc = (
        "table: mtd\nsecret_file: /nonexistent\n"
        f"ports: {{range: [1, 20], services: {{tcp: {SERVICES}}}}}\n"
        f"watched: [{{source: 0.0.0.0/0, per_source: true}}]\nbuckets: {buckets}\n"
    )
    return parse([("state.yaml", doc)])


def learned(seen_open: set[int]) -> bool:
    return {p for p in RANGE if p not in seen_open} == set(SERVICES)


def addresses(st, secret: bytes, rng: random.Random) -> float:  # type: ignore[no-untyped-def]
    """Random addresses in one epoch until the never-open ports are the services (inf: not
    in this epoch, when some free port is no bucket's target)."""
    mapping = shuffle.compute(st, secret, 0)
    seen: set[int] = set()
    for n in range(1, 5_000):
        addr = ipaddress.IPv4Address(rng.getrandbits(32))
        k = bucket.of(addr, mapping.seed, st.bucket_count)
        seen |= set(mapping.buckets[k]["tcp"].values())
        if learned(seen):
            return n
    return float("inf")


def rotations(st, secret: bytes, addr: str) -> float:  # type: ignore[no-untyped-def]
    """One address, one epoch after another, until the never-open ports are the services."""
    seen: set[int] = set()
    for epoch in range(100_000):
        mapping = shuffle.compute(st, secret, epoch)
        seen |= set(mapping.bucket_of(addr)["tcp"].values())
        if learned(seen):
            return epoch + 1
    raise RuntimeError("never learned")


def summary(values: list[float]) -> str:
    values = sorted(values)
    never = sum(v == float("inf") for v in values) / len(values)
    return f"median {statistics.median(values):g}, 95%: {values[int(0.95 * len(values))]:g}" + (
        f" (never in {never:.1%} of epochs)" if never else ""
    )


def main() -> None:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    rng = random.Random(1)
    for buckets in (16, 64):
        st = state(buckets)
        got = [addresses(st, rng.randbytes(32), rng) for _ in range(trials)]
        print(f"{buckets} buckets: addresses in one epoch: {summary(got)}")
    st = state(16)
    got = [rotations(st, rng.randbytes(32), "192.0.2.3") for _ in range(trials)]
    print(f"one address: rotations: {summary(got)}")


if __name__ == "__main__":
    main()
