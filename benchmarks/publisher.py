"""Fleet rotations on demand, for the latency benchmarks (run where Redis is reachable).

  publisher.py STATE   for every line read on stdin, publish one rotation with the state's
                       Redis settings (what `mtd rotate --publish` does, without its start-up)
                       and print `MONOTONIC_SECONDS EPOCH`, the clock read just before it

CLOCK_MONOTONIC is one clock for every process of the machine, namespaces included, so the
benchmark can subtract it from the moment a daemon reports the new epoch applied.
"""

from __future__ import annotations

import sys
import time

from reconciler.adapters import bus, files


def main() -> None:
    config = bus.BusConfig.from_state(files.load_state(sys.argv[1]))
    client = bus.connect(config)
    for _ in sys.stdin:
        start = time.monotonic()
        published = bus.publish_rotation(config, client)
        print(f"{start:.6f} {published.epoch}", flush=True)


if __name__ == "__main__":
    main()
