"""The port shuffle: which port each moved service hides behind, per source and epoch.

Pure and deterministic: HMAC-SHA256 keyed with the secret, in counter mode, drives a partial
Fisher-Yates shuffle of the ports a source's services may be shown at. Same secret, epoch and
state give the same mapping (so a restart changes nothing); without the secret the mapping
cannot be predicted.

Targets come from the whole range minus the ports that stay in place for the source (its
`ignore` list, `ports.fixed`): service ports included. Were they left out, the ports of the
range never open in any view would be exactly the service ports (issue 21, finding 4). A
move is then a permutation, not a swap: `inbound` and `outbound` complete it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from reconciler.core import bucket
from reconciler.core.state import PROTOCOLS, State

# The hard ceiling of epochs, everywhere (local file, Redis, messages): 2**40 rotations last
# 34,000 years at one a second, and stay far below every integer limit on the way (Lua's
# and JSON's 2**53, int64), so no epoch mtd accepts can ever make the next one unusable.
MAX_EPOCH = 2**40
_WORDS = struct.Struct(">8I")  # one SHA-256 block gives eight 32-bit draws
_SPAN = 1 << 32


@dataclass(frozen=True)
class PortMap:
    """`moves[(source label, proto)]` maps each moved real port to the port it is shown at
    (explicit entries; a service may be shown at another's port, or at its own);
    `buckets[k][proto]` the same for bucket k (per_source entries and dynamic sources),
    which the kernel picks with `jhash` seeded with `seed`."""

    epoch: int
    moves: Mapping[tuple[str, str], Mapping[int, int]]
    buckets: tuple[Mapping[str, Mapping[int, int]], ...] = ()
    seed: int = 0

    def fingerprint(self, secret: bytes) -> str:
        """A keyed hash of the mapping: proves which mapping was live without revealing it."""
        h = hmac.new(secret, b"mtd/fingerprint", hashlib.sha256)
        for (source, proto), moves in sorted(self.moves.items()):
            h.update(f"{source}|{proto}|{sorted(moves.items())}\n".encode())
        if self.buckets:  # a state without buckets keeps the fingerprint it always had
            h.update(f"seed|{self.seed}\n".encode())
            for k, by_proto in enumerate(self.buckets):
                for proto, moves in sorted(by_proto.items()):
                    h.update(f"#{k}|{proto}|{sorted(moves.items())}\n".encode())
        return h.hexdigest()[:32]

    def bucket_of(self, addr: str) -> Mapping[str, Mapping[int, int]]:
        """The moves of the bucket the kernel puts `addr` in (among the buckets held: the
        state's `buckets`, or the one shared bucket of a state without per_source entries)."""
        return self.buckets[bucket.of(addr, self.seed, len(self.buckets))] if self.buckets else {}


def epoch_key(secret: bytes, epoch: int) -> bytes:
    """Per-epoch key, so the secret itself is used once per epoch, not per source."""
    return hmac.digest(secret, b"mtd/epoch/%d" % epoch, "sha256")


def _words(key: bytes, label: bytes) -> Iterator[int]:
    counter = 0
    while True:
        yield from _WORDS.unpack(hmac.digest(key, label + counter.to_bytes(4, "big"), "sha256"))
        counter += 1


def draw(key: bytes, label: bytes, pool: Sequence[int], k: int) -> list[int]:
    """k distinct items of `pool`, uniformly: the first k steps of a Fisher-Yates shuffle.

    Only touched positions are stored, so the cost is O(k), not O(len(pool)). Step i takes
    a position uniform in [i, n) by rejection sampling (no modulo bias). Written out in one
    loop: it runs for every source, 100k times in a big rotation.
    """
    n = len(pool)
    if k > n:
        raise ValueError(f"cannot draw {k} distinct ports from {n}")
    words = _words(key, label)
    swapped: dict[int, int] = {}
    out = []
    for i in range(k):
        span = n - i
        limit = _SPAN - _SPAN % span
        x = next(words)
        while x >= limit:
            x = next(words)
        j = i + x % span
        at_i, at_j = swapped.get(i, i), swapped.get(j, j)
        swapped[j] = at_i
        out.append(pool[at_j])
    return out


def inbound(moves: Mapping[int, int]) -> dict[int, int]:
    """The port a packet to each port is moved to (shown -> real): a permutation of the
    moved services and their targets. A moved service that is no target goes to a target
    that is no service (nothing listens there: its real port looks closed, as before);
    sorted pairing, since what a closed port hides is never seen. A service shown at its
    own port stays out (nothing to move, and its answers leave from the port asked)."""
    out = {shown: real for real, shown in moves.items() if shown != real}
    hidden = sorted(real for real in moves if real not in out and moves[real] != real)
    free = sorted(shown for shown in out if shown not in moves)
    out.update(zip(hidden, free, strict=True))
    return out


def size(moves: Mapping[int, int]) -> int:
    """The number of ports `inbound(moves)` maps, without building it."""
    return sum(1 for real, shown in moves.items() if shown != real) + sum(
        1 for real, shown in moves.items() if shown != real and shown not in moves
    )


def outbound(moves: Mapping[int, int]) -> dict[int, int]:
    """The inverse of `inbound` (real -> shown): what the host's answers leave from."""
    return {real: shown for shown, real in inbound(moves).items()}


def compute(state: State, secret: bytes, epoch: int) -> PortMap:
    """The whole mapping of one epoch: one independent permutation per (source, protocol).

    A template that writes each move as a swap of two ports (`Support.swaps`, classic) gets
    targets from the free ports only, so the swaps never overlap."""
    from reconciler.core.templates import support

    key = epoch_key(secret, epoch)
    swaps = support(state.template).swaps
    pools: dict[tuple[str, frozenset[int]], Sequence[int]] = {}

    def pool(proto: str, ignore: frozenset[int]) -> Sequence[int]:
        found = pools.get((proto, ignore))
        if found is None:
            found = pools[(proto, ignore)] = (
                state.free_ports(proto) if swaps else state.target_ports(proto, ignore)
            )
        return found

    moves: dict[tuple[str, str], dict[int, int]] = {}
    moved: dict[tuple[str, frozenset[int]], list[int]] = {}  # by ignore list: few distinct
    for w in state.watched:
        if w.per_source:
            continue  # drawn from the buckets below
        for proto in PROTOCOLS:
            ports = moved.get((proto, w.ignore[proto]))
            if ports is None:
                ports = moved[(proto, w.ignore[proto])] = state.moved_ports(w, proto)
            if ports:
                targets = draw(
                    key, f"{w.label}|{proto}".encode(), pool(proto, w.ignore[proto]), len(ports)
                )
                moves[(w.label, proto)] = dict(zip(ports, targets, strict=True))
    if not state.has_buckets:
        return PortMap(epoch=epoch, moves=moves)
    buckets = []
    bucket_pool = {proto: pool(proto, state.bucket_ignore[proto]) for proto in PROTOCOLS}
    for k in range(state.bucket_count):
        by_proto: dict[str, dict[int, int]] = {}
        for proto in PROTOCOLS:
            ports = state.bucket_ports(proto)
            if ports:
                targets = draw(key, f"#bucket{k}|{proto}".encode(), bucket_pool[proto], len(ports))
                by_proto[proto] = dict(zip(ports, targets, strict=True))
        buckets.append(by_proto)
    return PortMap(epoch=epoch, moves=moves, buckets=tuple(buckets), seed=bucket.seed(key))
