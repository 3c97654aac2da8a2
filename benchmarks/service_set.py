"""What watched sources learn about the set of service ports from the shuffle alone.

  service_set.py [TRIALS] [--swaps]
      per_source on 0.0.0.0/0 with 16 and 64 buckets (range 1-20, five services): the
      addresses one epoch needs, and for one address the rotations, until the ports of the
      range never seen open are exactly the service ports; then until every port of the
      range has been seen open (what an attacker learns instead: the range, and the fixed
      ports, open in place in every view); and how often a service port and a free port are
      open in one address's views (median and 95th percentile over TRIALS secrets).
      --swaps: the draw of a template that writes swaps (classic; `maps` before issue 21):
      targets from the free ports only.

Pure simulation against the real shuffle and the kernel's jhash (`core.bucket`). With targets
drawn from the whole range, service ports included, a port closed in every view is no sign
of a service: the inference "never open = service" stops converging.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
import statistics
import sys

if __package__ in (None, ""):  # run as a script: import from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reconciler.core import bucket, shuffle, templates
from reconciler.core.state import parse

SERVICES = [1, 2, 3, 4, 5]
RANGE = range(1, 21)
BUDGET = 1_000  # addresses in one epoch, or rotations of one address


def state(buckets: int):  # type: ignore[no-untyped-def]
    doc = (
        "table: mtd\nsecret_file: /nonexistent\n"
        f"ports: {{range: [1, 20], services: {{tcp: {SERVICES}}}}}\n"
        f"watched: [{{source: 0.0.0.0/0, per_source: true}}]\nbuckets: {buckets}\n"
    )
    return parse([("state.yaml", doc)])


def learned(seen_open: set[int]) -> bool:
    """The attacker's inference: the ports never open are the services."""
    return {p for p in RANGE if p not in seen_open} == set(SERVICES)


def covered(seen_open: set[int]) -> bool:
    """Every port of the range has been open somewhere: nothing is left to infer from."""
    return seen_open >= set(RANGE)


def open_ports(moves: dict[int, int]) -> set[int]:
    """Where one view shows services (those that stay in place are open where they are)."""
    return {moves.get(p, p) for p in SERVICES}


def addresses(st, secret: bytes, rng: random.Random, done) -> float:  # type: ignore[no-untyped-def]
    """Random addresses in one epoch until `done` (inf: not within the budget)."""
    mapping = shuffle.compute(st, secret, 0)
    seen: set[int] = set()
    for n in range(1, BUDGET):
        addr = ipaddress.IPv4Address(rng.getrandbits(32))
        k = bucket.of(addr, mapping.seed, st.bucket_count)
        seen |= open_ports(mapping.buckets[k]["tcp"])
        if done(seen):
            return n
    return float("inf")


def rotations(st, secret: bytes, addr: str, done) -> float:  # type: ignore[no-untyped-def]
    """One address, one epoch after another, until `done` (inf: not within the budget)."""
    seen: set[int] = set()
    for epoch in range(BUDGET):
        seen |= open_ports(shuffle.compute(st, secret, epoch).bucket_of(addr)["tcp"])
        if done(seen):
            return epoch + 1
    return float("inf")


def open_rates(st, secret: bytes, addr: str, epochs: int) -> tuple[float, float]:
    """How often (fraction of epochs) a service port and a free port are open in the views
    of one address."""
    counts = dict.fromkeys(RANGE, 0)
    for epoch in range(epochs):
        for p in open_ports(shuffle.compute(st, secret, epoch).bucket_of(addr)["tcp"]):
            counts[p] += 1
    free = [p for p in RANGE if p not in SERVICES]
    service = sum(counts[p] for p in SERVICES) / len(SERVICES) / epochs
    return service, sum(counts[p] for p in free) / len(free) / epochs


def summary(values: list[float]) -> str:
    values = sorted(values)
    never = sum(v == float("inf") for v in values) / len(values)
    if never == 1:
        return f"never within {BUDGET:,} (all trials)"
    return f"median {statistics.median(values):g}, 95%: {values[int(0.95 * len(values))]:g}" + (
        f" (never within {BUDGET:,} in {never:.1%} of trials)" if never else ""
    )


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--swaps"]
    if "--swaps" in sys.argv:
        templates.TEMPLATES["maps"] = dataclasses.replace(templates.TEMPLATES["maps"], swaps=True)
    trials = int(args[0]) if args else 500
    rng = random.Random(1)
    for name, done in (("never open = services", learned), ("every port seen open", covered)):
        for buckets in (16, 64):
            st = state(buckets)
            got = [addresses(st, rng.randbytes(32), rng, done) for _ in range(trials)]
            print(f"{name}: {buckets} buckets: addresses in one epoch: {summary(got)}")
        st = state(16)
        got = [rotations(st, rng.randbytes(32), "192.0.2.3", done) for _ in range(trials)]
        print(f"{name}: one address: rotations: {summary(got)}")
    rates = [open_rates(state(16), rng.randbytes(32), "192.0.2.3", 200) for _ in range(50)]
    service = statistics.mean(r[0] for r in rates)
    free = statistics.mean(r[1] for r in rates)
    print(f"one address, 50 x 200 epochs: a service port open {service:.3f}, free {free:.3f}")


if __name__ == "__main__":
    main()
