"""The floor: the least any tool pays to put a document into the kernel or read it back.

Run inside the namespace under test, as its own small process:
  floor.py apply DOC.json   send the document in one libnftables `json_cmd`
  floor.py list TABLE       list `inet TABLE` once, as JSON (what mtd reads)
Prints the seconds the call itself took (start-up and reading the file excluded).
"""

from __future__ import annotations

import gc
import json
import sys
import time

import nftables


def main() -> None:
    op, arg = sys.argv[1:3]
    nft = nftables.Nftables()
    if op == "apply":
        gc.disable()  # only to read a 40 MB document quickly; the timed call is C
        with open(arg, encoding="utf-8") as f:
            doc = json.load(f)
        start = time.perf_counter()
        rc, _, err = nft.json_cmd(doc)
    else:
        nft.set_json_output(True)
        start = time.perf_counter()
        rc, _, err = nft.cmd(f"list table inet {arg}")
    took = time.perf_counter() - start
    if rc != 0:
        sys.exit(f"floor {op}: {err.strip()}")
    print(f"{took:.6f}")


if __name__ == "__main__":
    main()
