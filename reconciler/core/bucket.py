"""Buckets: which of the shared mappings a per_source or dynamic source gets.

Pure. The ruleset picks the bucket in the packet path with nftables' `jhash` (the kernel's
`jhash()` of the source's bytes, scaled into `buckets` classes); this module computes the same
number, so `mtd mapping --source`, `history --mapping-at` and the SSH-session check answer
what the kernel does (tests/test_buckets.py checks it against a real kernel). The unit is what
one attacker holds: an IPv4 address, or an IPv6 /64 (its first 64 bits), so every address of
one /64 sees one view.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

MIN_BUCKETS = 1
MAX_BUCKETS = 1024  # rules grow with buckets (about 20 per bucket): bounded like any input
DEFAULT_BUCKETS = 16
_M = 0xFFFFFFFF
_INITVAL = 0xDEADBEEF  # JHASH_INITVAL, include/linux/jhash.h


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _M
    a ^= _rol(c, 4)
    c = (c + b) & _M
    b = (b - a) & _M
    b ^= _rol(a, 6)
    a = (a + c) & _M
    c = (c - b) & _M
    c ^= _rol(b, 8)
    b = (b + a) & _M
    a = (a - c) & _M
    a ^= _rol(c, 16)
    c = (c + b) & _M
    b = (b - a) & _M
    b ^= _rol(a, 19)
    a = (a + c) & _M
    c = (c - b) & _M
    c ^= _rol(b, 4)
    b = (b + a) & _M
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b
    c = (c - _rol(b, 14)) & _M
    a ^= c
    a = (a - _rol(c, 11)) & _M
    b ^= a
    b = (b - _rol(a, 25)) & _M
    c ^= b
    c = (c - _rol(b, 16)) & _M
    a ^= c
    a = (a - _rol(c, 4)) & _M
    b ^= a
    b = (b - _rol(a, 14)) & _M
    c ^= b
    c = (c - _rol(b, 24)) & _M
    return c


def jhash(data: bytes, seed: int) -> int:
    """Linux's `jhash(key, length, initval)` (Bob Jenkins' lookup3), byte for byte: full
    12-byte blocks read as little-endian words, the tail added bytewise, no final mix for
    an empty tail."""
    a = b = c = (_INITVAL + len(data) + seed) & _M
    k, n = data, len(data)
    while n > 12:
        a = (a + int.from_bytes(k[0:4], "little")) & _M
        b = (b + int.from_bytes(k[4:8], "little")) & _M
        c = (c + int.from_bytes(k[8:12], "little")) & _M
        a, b, c = _mix(a, b, c)
        k, n = k[12:], n - 12
    if n == 0:
        return c
    tail = k.ljust(12, b"\0")
    a = (a + int.from_bytes(tail[0:4], "little")) & _M
    b = (b + int.from_bytes(tail[4:8], "little")) & _M
    c = (c + int.from_bytes(tail[8:12], "little")) & _M
    return _final(a, b, c)


def scale(h: int, n: int) -> int:
    """The kernel's `reciprocal_scale(h, n)`: h into [0, n) by a multiply, not a modulo."""
    return (h * n) >> 32


def unit(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The bytes the ruleset hashes: an IPv4 address, or an IPv6 address's first 64 bits."""
    ip = ipaddress.ip_address(addr)
    return ip.packed if ip.version == 4 else ip.packed[:8]


def of(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address, seed: int, n: int) -> int:
    """The bucket the kernel puts `addr` in (`jhash ... mod n seed seed`)."""
    return scale(jhash(unit(addr), seed), n)


def seed(epoch_key: bytes) -> int:
    """The jhash seed of an epoch (32 bits of HMAC of the epoch key, never 0, which nft
    would not list): a rotation moves every source to an unpredictable bucket."""
    value = int.from_bytes(hmac.digest(epoch_key, b"mtd/bucket-seed", hashlib.sha256)[:4], "big")
    return value or 1
