"""What each of several source addresses finds at every port of a server: run inside a lab
client (`python -m tests.views`, JSON on stdin and stdout), so one process probes every
source instead of one process per probe.

Input: {"target": ADDR, "sources": [ADDR, ...], "ports": [1, ...], "udp": [53, ...]}.
Output: {source: {"tcp": {port: real}, "udp": {port: real}}}: the ports that answered, with
the real port the lab's listener behind them names (`port 3`).
"""

from __future__ import annotations

import json
import socket
import sys


def _answer(s: socket.socket) -> int | None:
    try:
        data = s.recv(64).decode()
    except OSError:
        return None
    return int(data.split()[1]) if data.startswith("port ") else None


def tcp(source: str, target: str, port: int) -> int | None:
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        s.bind((source, 0))
        try:
            s.connect((target, port))
        except OSError:
            return None
        return _answer(s)


def udp(source: str, target: str, port: int) -> int | None:
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.bind((source, 0))
        s.connect((target, port))
        try:
            s.send(b"hello\n")
        except OSError:
            return None
        return _answer(s)


def main() -> None:
    args = json.load(sys.stdin)
    out: dict[str, dict[str, dict[int, int]]] = {}
    for source in args["sources"]:
        view: dict[str, dict[int, int]] = {"tcp": {}, "udp": {}}
        for port in args["ports"]:
            real = tcp(source, args["target"], port)
            if real is not None:
                view["tcp"][port] = real
        for port in args.get("udp", []):
            real = udp(source, args["target"], port)
            if real is not None:
                view["udp"][port] = real
        out[source] = view
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
