"""New TCP connections per second to one address and port, for a fixed time.

  connrate.py HOST PORT SECONDS   connect, read the banner, close; again until SECONDS
                                  have passed; print connections per second

Closing with an RST (SO_LINGER 0) leaves no TIME_WAIT behind, so the client never runs out
of source ports however many connections it makes.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

LINGER_RST = struct.pack("ii", 1, 0)


def main() -> None:
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        with socket.create_connection((host, port), timeout=5) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            if not s.recv(64).startswith(b"port "):
                sys.exit(f"{host}:{port}: unexpected banner")
        done += 1
    print(f"{done / (time.perf_counter() - start):.1f}")


if __name__ == "__main__":
    main()
