"""One full reconcile, in-process, timed phase by phase (run inside the namespace under test).

phases.py STATE EPOCH   load and validate STATE, reconcile it at EPOCH (reading the live
                        table and diffing it), print the phase times as JSON
"""

from __future__ import annotations

import json
import sys
import time

from reconciler.adapters import files
from reconciler.adapters.kernel import Nft
from reconciler.services.reconcile import reconcile


def main() -> None:
    path, epoch = sys.argv[1], int(sys.argv[2])
    start = time.perf_counter()
    state = files.load_state(path)
    load = time.perf_counter() - start
    secret = files.load_secret(state.secret_file, create=True)
    full = reconcile(state, epoch, Nft(), secret=secret)
    start = time.perf_counter()
    reconcile(state, epoch + 1, Nft(), secret=secret, read_live=False)
    rotation = time.perf_counter() - start
    print(json.dumps({"load": load, **full.phases, "rotation": rotation}))


if __name__ == "__main__":
    main()
