"""SYN to RST latency at closed ports, timed by the kernel, and what a scanner can make of it.

`python -m reconciler.lab.timing < request.json`, run inside a lab client namespace, sends
SYNs from a raw socket and times each one from the SYN leaving the client's interface to
the RST arriving on it: both instants are the kernel's timestamps of a packet socket
(SO_TIMESTAMPNS, what tcpdump records), not Python's clock around send and receive, so the
interpreter's own delays stay out of the figure. The SYNs go one at a time (the next only
after the RST or a timeout), in a fresh random order of the ports each round, and each
from a new source port (each is a new connection to conntrack, as a scanner's would be).

The rest is pure statistics on the samples: medians, a bootstrap interval for the gap
between two kinds of port, and how many SYNs per port a median classifier needs to pick
one kind out. Both use the fact that the median of k draws with replacement from n sorted
samples is the sample at rank floor(n * U), U ~ Beta((k+1)/2, (k+1)/2) for odd k: one draw
per median, so a simulation of 10,001 SYNs per port costs no more than one of 11.
"""

from __future__ import annotations

import json
import random
import select
import socket
import statistics
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # asm-generic's value
TCP_SYN, TCP_RST, TCP_SYNACK = 0x02, 0x04, 0x12


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn(v: int, src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    """A bare SYN as a whole IP packet (the kernel fills the IPv4 checksum and length)."""
    fam = socket.AF_INET if v == 4 else socket.AF_INET6
    s, d = socket.inet_pton(fam, src), socket.inet_pton(fam, dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, TCP_SYN, 1024, 0, 0)
    if v == 4:
        pseudo = s + d + struct.pack("!BBH", 0, 6, len(tcp))
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0) + s + d
    else:
        pseudo = s + d + struct.pack("!I3xB", len(tcp), 6)
        ip = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + s + d
    csum = _checksum(pseudo + tcp)
    return ip + tcp[:16] + struct.pack("!H", csum) + tcp[18:]


def _tcp(frame: bytes) -> tuple[int, int, int] | None:
    """(sport, dport, flags) of a TCP segment in an Ethernet frame, else None."""
    kind = frame[12:14]
    if kind == b"\x08\x00" and len(frame) >= 34 and frame[23] == 6:
        at = 14 + (frame[14] & 0x0F) * 4
    elif kind == b"\x86\xdd" and len(frame) >= 54 and frame[20] == 6:
        at = 54
    else:
        return None
    if len(frame) < at + 14:
        return None
    sport, dport = struct.unpack_from("!HH", frame, at)
    return sport, dport, frame[at + 13]


def _stamp(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack_from("@qq", data)
            return sec * 1_000_000_000 + nsec
    return None


def sample(
    iface: str,
    v: int,
    src: str,
    dst: str,
    ports: Sequence[int],
    syns: int,
    sport: int = 20000,
    timeout: float = 1.0,
) -> dict[int, list[int]]:
    """SYN-to-answer latencies in nanoseconds per port, `syns` SYNs to each port: the
    answer is the RST of a closed port or the SYN-ACK of an open one (which the client's
    kernel then resets: no socket of its own sent the SYN). A SYN met with silence (or
    answered otherwise) within `timeout` counts nothing; the caller sees the shortfall in
    the number of samples."""
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    rx.bind((iface, 0))
    tx = socket.socket(socket.AF_INET if v == 4 else socket.AF_INET6, socket.SOCK_RAW,
                       socket.IPPROTO_RAW)  # fmt: skip
    out: dict[int, list[int]] = {p: [] for p in ports}
    order = list(ports)
    n = 0
    try:
        for _ in range(syns):
            random.shuffle(order)
            for port in order:
                mine = sport + n % 30000  # each SYN a new connection to conntrack
                n += 1
                tx.sendto(syn(v, src, dst, mine, port, random.getrandbits(32)), (dst, 0))
                sent: int | None = None
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    if not select.select([rx], [], [], left)[0]:
                        break
                    frame, ancillary, _, addr = rx.recvmsg(256, 64)
                    seg = _tcp(frame)
                    if seg is None:
                        continue
                    if addr[2] == PACKET_OUTGOING:
                        if seg[:2] == (mine, port) and seg[2] & TCP_SYN:
                            sent = _stamp(ancillary)
                    elif seg[:2] == (port, mine):
                        got = _stamp(ancillary)
                        answer = seg[2] & TCP_RST or seg[2] & TCP_SYNACK == TCP_SYNACK
                        if answer and sent is not None and got is not None:
                            out[port].append(got - sent)
                        break
    finally:
        rx.close()
        tx.close()
    return out


# --- statistics (pure) --------------------------------------------------------------------


def _median_of_draws(ranked: Sequence[float], k: int, rng: random.Random) -> float:
    """The median of k draws with replacement from `ranked` (sorted), k odd: one draw."""
    a = (k + 1) / 2
    return ranked[min(len(ranked) - 1, int(rng.betavariate(a, a) * len(ranked)))]


def gap(
    first: Sequence[float], second: Sequence[float], reps: int = 4000, seed: int = 1
) -> tuple[float, float, float]:
    """median(second) - median(first), with a 95% bootstrap interval (percentile method)."""
    a, b = sorted(first), sorted(second)
    rng = random.Random(seed)
    ka, kb = len(a) | 1, len(b) | 1  # odd: the draw above is exact for odd k
    diffs = sorted(_median_of_draws(b, kb, rng) - _median_of_draws(a, ka, rng) for _ in range(reps))
    return (statistics.median(b) - statistics.median(a), diffs[int(0.025 * reps)],
            diffs[int(0.975 * reps) - 1])  # fmt: skip


def picks_exactly(
    kinds: Mapping[int, bool],
    samples: Mapping[int, Sequence[float]],
    k: int,
    trials: int,
    rng: random.Random,
) -> float:
    """Share of trials in which a scanner with k SYNs per port, taking the ports with the
    lowest medians (as many as `kinds` marks True; the side found by the full samples),
    names exactly the marked ports."""
    ranked = {p: sorted(s) for p, s in samples.items()}
    marked = {p for p, real in kinds.items() if real}
    pooled = [statistics.median(ranked[p]) for p in marked]
    rest = [statistics.median(ranked[p]) for p in ranked if p not in marked]
    sign = 1 if statistics.median(pooled) <= statistics.median(rest) else -1
    hits = 0
    ports = list(ranked)
    for _ in range(trials):
        rng.shuffle(ports)  # ties (the clock's steps) fall either way, never by port order
        medians = sorted(ports, key=lambda p: sign * _median_of_draws(ranked[p], k, rng))
        hits += set(medians[: len(marked)]) == marked
    return hits / trials


def syns_needed(
    kinds: Mapping[int, bool],
    samples: Mapping[int, Sequence[float]],
    accuracy: float = 0.99,
    trials: int = 400,
    most: int = 100_001,
    seed: int = 1,
) -> int | None:
    """The fewest SYNs per port (odd, on a doubling grid refined by bisection) with which
    the median classifier picks exactly the marked ports in `accuracy` of trials; None when
    even `most` do not."""
    rng = random.Random(seed)
    if picks_exactly(kinds, samples, most, trials, rng) < accuracy:
        return None
    low, high = 0, 1  # low fails (0 SYNs), high to be found
    while picks_exactly(kinds, samples, high, trials, rng) < accuracy:
        low, high = high, min(most, high * 2 + 1)
    while high - low > max(2, high // 10):  # within 10%: enough for a table
        mid = ((low + high) // 2) | 1
        if mid >= high:
            break
        if picks_exactly(kinds, samples, mid, trials, rng) >= accuracy:
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class Comparison:
    """Two kinds of closed port: the real service ports (moved away) and unused ones."""

    real: list[float]  # microseconds, pooled over the ports of the kind
    unused: list[float]
    gap: tuple[float, float, float]  # median(unused) - median(real) and its 95% interval
    syns: int | None  # SYNs per port for 99% exact picks (None: more than were measured)
    lost: int  # SYNs that met no RST
    measured: int  # the fewest samples of one port: the most SYNs the simulation tries

    @staticmethod
    def of(
        real: Sequence[int],
        by_port: Mapping[int, Sequence[int]],
        syns_sent: int,
        classify: bool = True,
    ) -> Comparison:
        us = {p: [x / 1000 for x in s] for p, s in by_port.items() if s}
        kinds = {p: p in real for p in us}
        pooled = {k: [x for p in us if kinds[p] == k for x in us[p]] for k in (True, False)}
        # No more SYNs than were measured per port: past that, the simulated medians only
        # read the samples' own, and the answer says more about the samples than the path.
        most = min(len(s) for s in us.values()) | 1 if us else 1
        needed = syns_needed(kinds, us, most=most) if classify and all(pooled.values()) else None
        lost = syns_sent * len(by_port) - sum(len(s) for s in by_port.values())
        return Comparison(pooled[True], pooled[False], gap(pooled[True], pooled[False]),
                          needed, lost, most)  # fmt: skip


def spread(values: Sequence[float]) -> float:
    """The interquartile range."""
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def main() -> None:
    """One JSON request on stdin ({"iface", "v", "src", "dst", "ports", "syns", "sport"}),
    the latencies per port on stdout ({"port": [ns, ...]})."""
    request: dict[str, Any] = json.load(sys.stdin)
    got = sample(**request)
    json.dump({str(p): s for p, s in got.items()}, sys.stdout)


if __name__ == "__main__":
    main()
