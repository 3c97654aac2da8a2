"""The kernel's nftables change notifications, as the daemon needs them: who changed the
owned table, in which generation, and what kind of object.

Why a raw netlink socket (NETLINK_NETFILTER, group NFNLGRP_NFTABLES) and not the others:
- `nft -j monitor` decodes every element of every transaction into JSON in another process:
  at a million mappings, a rotation would cost a second process seconds of CPU, and it has no
  table filter. Here a message is skipped after reading its 20-byte header and first
  attribute (the table name), so other tables cost a comparison, and nothing is decoded.
- libnftables' `monitor` command blocks in C and hands its output back only when it ends.
- pyroute2 has no nf_tables notification parser; the few fields needed here are fixed.

Each transaction ends with a NEWGEN message naming its generation and the process that made
it (`# new generation N by process PID (NAME)` in `nft monitor`); the events before it are
that transaction's, so they are attributed then. mtd's own commits are never read: around
them the daemon leaves the group (`quiet`), and compares the generation before and after,
so a commit by anyone else inside that window is still noticed (as `lost`: compare in full).
Outside the windows every generation's NEWGEN is read, so a window also checks, when it
opens, that the last generation seen is the current one: a transaction whose events were
cut off by leaving the group is reported too. A lost netlink buffer (ENOBUFS) is reported
the same way. Idle, the reader thread sleeps in
`recv`: no timer, no CPU.

Element events (NEWSETELEM/DELSETELEM) of the owned table also keep their raw key, key end,
data and flags (`RawElement`): `core.elements` decodes them with the set's type, so a hand
change to one map element is repaired by one element transaction, not a table replacement.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP, NETLINK_DROP_MEMBERSHIP = 1, 2
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
RCVBUF = 4 << 20  # events of a few thousand foreign element changes; more: lost -> compare
# Raw elements kept per foreign transaction: beyond this, repairing them one by one is no
# cheaper than replacing the table, and the memory would be the intruder's to choose.
MAX_ELEMENTS = 10_000

# NFT_MSG_* (linux/netfilter/nf_tables.h): what each message is about.
KINDS = {
    0: ("+", "table"), 2: ("-", "table"), 3: ("+", "chain"), 5: ("-", "chain"),
    6: ("+", "rule"), 8: ("-", "rule"), 9: ("+", "set"), 11: ("-", "set"),
    12: ("+", "element"), 14: ("-", "element"), 18: ("+", "object"), 20: ("-", "object"),
    22: ("+", "flowtable"), 24: ("-", "flowtable"),
}  # fmt: skip
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
# The attribute naming the object within its table: chain name, rule's chain, set name...
_NAME_ATTR = {"chain": 3, "rule": 2, "set": 2, "element": 2, "object": 2, "flowtable": 2}
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
# NFTA_SET_ELEM_LIST_*, NFTA_SET_ELEM_*, NFTA_DATA_* (linux/netfilter/nf_tables.h)
_LIST_SET, _LIST_ELEMENTS, _LIST_ELEM = 2, 3, 1
_ELEM_KEY, _ELEM_DATA, _ELEM_FLAGS, _ELEM_KEY_END = 1, 2, 3, 10
_DATA_VALUE, _DATA_VERDICT = 1, 2
_HDR = struct.Struct("=IHHII")  # nlmsghdr
_NLA = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class RawElement:
    """One element of a NEWSETELEM (+) or DELSETELEM (-) event, as the kernel sent it: key
    and data in register layout (each part of a concatenation padded to 4 bytes)."""

    op: str
    set: str
    key: bytes
    key_end: bytes | None = None  # an interval of a concatenation (pipapo): its last key
    data: bytes | None = None  # a map's value (None in a set)
    flags: int = 0  # NFT_SET_ELEM_INTERVAL_END (1): the end of an interval (rbtree)
    verdict: bool = False  # a verdict map's data (not decoded: the table is replaced)


@dataclass
class Change:
    """One foreign transaction (generation) that touched the owned table."""

    generation: int
    pid: int
    process: str
    what: list[tuple[str, str, str]] = field(default_factory=list)  # (op, kind, name)
    elements: list[RawElement] = field(default_factory=list)  # of the element events
    undecoded: str = ""  # why `elements` is not the whole story (then replace the table)

    @property
    def kinds(self) -> set[str]:
        return {kind for _, kind, _ in self.what}

    def text(self) -> str:
        """`-rule raw_prerouting, +element tcp4 x3`: what the events said, for the log."""
        if ("-", "table", "") in self.what:
            return "-table (and all it held)"
        counts: dict[str, int] = {}
        hidden = 0
        for op, kind, name in self.what:
            if name.startswith("__"):  # an anonymous set of a rule: the rule says it
                hidden += 1
                continue
            key = f"{op}{kind} {name}".rstrip()
            counts[key] = counts.get(key, 0) + 1
        items = [f"{k} x{n}" if n > 1 else k for k, n in counts.items()]
        if len(items) > MAX_NAMED:  # a table replaced by hand: hundreds of objects
            rest = len(items) - MAX_NAMED
            items = [*items[:MAX_NAMED], f"and {rest} more object{'s' if rest > 1 else ''}"]
        if hidden and not items:
            items = [f"{hidden} anonymous set{'s' if hidden > 1 else ''}"]
        return ", ".join(items)


MAX_NAMED = 6  # objects one drift log line names


@dataclass
class Window:
    """One `quiet` window: the generation when it opened (-1 when not followed)."""

    before: int = -1


def _attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, value start, value end) of each attribute in data[start:end]."""
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < 4:
            return
        yield kind & 0x3FFF, start + 4, start + length
        start += (length + 3) & ~3


def _string(data: bytes, lo: int, hi: int) -> str:
    return data[lo:hi].split(b"\0", 1)[0].decode(errors="replace")


def _nested(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """`_attrs`, raising ValueError on an attribute that overruns its parent."""
    if end > len(data):
        raise ValueError("truncated message")
    for kind, lo, hi in _attrs(data, start, end):
        if hi > end:
            raise ValueError("an attribute overruns its message")
        yield kind, lo, hi


def _value(data: bytes, lo: int, hi: int) -> tuple[bytes | None, bool]:
    """The NFTA_DATA_VALUE in a nested NFTA_DATA attribute; (None, True) for a verdict."""
    for kind, a, b in _nested(data, lo, hi):
        if kind == _DATA_VALUE:
            return data[a:b], False
        if kind == _DATA_VERDICT:
            return None, True
    raise ValueError("no value in a data attribute")


def elements(op: str, data: bytes, start: int, end: int) -> tuple[str, list[RawElement]]:
    """The set name and elements of one element message's attributes (data[start:end]).
    Raises ValueError on a message it cannot read whole."""
    name, out = "", []
    for kind, lo, hi in _nested(data, start, end):
        if kind == _LIST_SET:
            name = _string(data, lo, hi)
        elif kind == _LIST_ELEMENTS:
            for k, a, b in _nested(data, lo, hi):
                if k != _LIST_ELEM:
                    continue
                key = key_end = value = None
                flags, verdict = 0, False
                for attr, x, y in _nested(data, a, b):
                    if attr == _ELEM_KEY:
                        key, _ = _value(data, x, y)
                    elif attr == _ELEM_KEY_END:
                        key_end, _ = _value(data, x, y)
                    elif attr == _ELEM_DATA:
                        value, verdict = _value(data, x, y)
                    elif attr == _ELEM_FLAGS and y - x == 4:
                        flags = struct.unpack_from("!I", data, x)[0]
                if key is None:
                    raise ValueError("an element without a key")
                out.append(RawElement(op, name, key, key_end, value, flags, verdict))
    if not name:
        raise ValueError("an element message without its set")
    return name, out


class Parser:
    """Folds a stream of nf_tables messages into `Change`s of foreign generations."""

    def __init__(self, table: str, own: Callable[[int], bool]) -> None:
        self.table = table.encode()
        self.own = own  # is this pid one of ours?
        self.pending: list[tuple[str, str, str]] = []  # events of the current transaction
        self.raw: list[RawElement] = []  # their elements, up to MAX_ELEMENTS
        self.undecoded = ""  # why `raw` is not all of them
        self.generation = -1  # the highest generation seen
        self.synced = False  # every generation up to `generation` was seen (none lost)

    def feed(self, data: bytes) -> list[Change]:
        out = []
        pos, size = 0, len(data)
        while pos + 20 <= size:
            length, mtype, _, _, _ = _HDR.unpack_from(data, pos)
            if length < 20:
                break
            end = pos + length
            if mtype >> 8 == NFNL_SUBSYS_NFTABLES:
                change = self._message(data, mtype & 0xFF, pos + 16, min(end, size))
                if change is not None:
                    out.append(change)
            pos = (end + 3) & ~3
        return out

    def forget(self) -> None:
        """Events were lost: drop what is pending and no longer vouch for the generation."""
        self.pending, self.raw, self.undecoded, self.synced = [], [], "", False

    def _message(self, data: bytes, msg: int, start: int, end: int) -> Change | None:
        if msg == NFT_MSG_NEWGEN:
            gen, pid, name = 0, 0, ""
            for kind, lo, hi in _attrs(data, start + 4, end):
                if kind == 1:
                    gen = struct.unpack_from("!I", data, lo)[0]
                elif kind == 2:
                    pid = struct.unpack_from("!I", data, lo)[0]
                elif kind == 3:
                    name = _string(data, lo, hi)
            self.generation = max(self.generation, gen)
            what, self.pending = self.pending, []
            raw, self.raw, undecoded, self.undecoded = self.raw, [], self.undecoded, ""
            if what and not self.own(pid):
                return Change(gen, pid, name, what, raw, undecoded)
            return None
        op_kind = KINDS.get(msg)
        if op_kind is None or data[start] != NFPROTO_INET:
            return None
        # The table name is the first attribute of every object message: check it before
        # anything else, so events of other tables cost this comparison and no more.
        length, kind = _NLA.unpack_from(data, start + 4)
        if kind & 0x3FFF != 1 or data[start + 8 : start + 4 + length].rstrip(b"\0") != self.table:
            return None
        op, what = op_kind
        if msg in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM):
            self._elements(op, data, start + 4, end)
            return None
        name = ""
        wanted = _NAME_ATTR.get(what)
        if wanted is not None:
            for k, lo, hi in _attrs(data, start + 4, end):
                if k == wanted:
                    name = _string(data, lo, hi)
                    break
        self.pending.append((op, what, name))
        return None

    def _elements(self, op: str, data: bytes, start: int, end: int) -> None:
        """One entry in `pending` per element (the log counts elements, not messages)."""
        try:
            name, found = elements(op, data, start, end)
        except (ValueError, struct.error) as exc:
            self.undecoded = self.undecoded or f"an element event could not be read ({exc})"
            for k, lo, hi in _attrs(data, start, end):
                if k == _LIST_SET:
                    self.pending.append((op, "element", _string(data, lo, hi)))
                    return
            self.pending.append((op, "element", ""))
            return
        self.pending += [(op, "element", name)] * max(1, len(found))
        room = MAX_ELEMENTS - len(self.raw)
        if len(found) > room:
            self.undecoded = f"more than {MAX_ELEMENTS} elements changed"
        self.raw += found[: max(0, room)]


def _socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


def generation() -> int:
    """The ruleset's current generation (NFT_MSG_GETGEN), on a socket of its own."""
    with _socket() as s:
        s.bind((0, 0))
        msg = _HDR.pack(20, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST, 1, 0)
        s.send(msg + bytes(4))
        data = s.recv(65536)
        length, mtype, _, _, _ = _HDR.unpack_from(data, 0)
        if mtype == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, 16)[0]
            raise OSError(code, f"nf_tables generation: {os.strerror(code)}")
        for kind, lo, _ in _attrs(data, 20, length):
            if kind == 1:
                return int(struct.unpack_from("!I", data, lo)[0])
    raise OSError(errno.EPROTO, "nf_tables generation: no NFTA_GEN_ID in the reply")


NFT_MSG_GETOBJ, NFT_MSG_NEWOBJ = 19, 18
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
_OBJ_TABLE, _OBJ_NAME, _OBJ_TYPE, _OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
_COUNTER_PACKETS = 2
MAX_OBJECTS = 4096  # counters read from one table (mtd's templates name 8)


def counters(table: str, timeout: float = 2.0) -> dict[str, int] | None:
    """Packets of each named counter of `inet table` (None: no counter, or no table), by a
    netlink dump of counter objects alone (NFT_MSG_GETOBJ filtered by table and type).

    Why not libnftables: any `list` there first caches the whole ruleset (every chain and
    rule: 16 ms of CPU at 64 buckets), and a Prometheus scrape reads these every few
    seconds. This costs a fraction of a millisecond at any table size. `OSError` when the
    kernel refuses (no CAP_NET_ADMIN, say)."""
    name = table.encode() + b"\0"
    attrs = _NLA.pack(4 + len(name), _OBJ_TABLE) + name + bytes(-len(name) % 4)
    attrs += _NLA.pack(8, _OBJ_TYPE) + struct.pack("!I", NFT_OBJECT_COUNTER)
    body = struct.pack("=BBH", NFPROTO_INET, 0, 0) + attrs
    mtype = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ
    out: dict[str, int] = {}
    with _socket() as s:
        s.settimeout(timeout)
        s.bind((0, 0))
        s.send(_HDR.pack(16 + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        while True:
            data = s.recv(1 << 16)
            at = 0
            while at + 16 <= len(data):
                length, kind, _, _, _ = _HDR.unpack_from(data, at)
                if length < 16 or at + length > len(data):
                    raise OSError(errno.EPROTO, "nf_tables objects: a truncated message")
                if kind == NLMSG_DONE:
                    return out or None
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, at + 16)[0]
                    if code in (0, errno.ENOENT):
                        return out or None
                    raise OSError(code, f"nf_tables objects: {os.strerror(code)}")
                if kind & 0xFF == NFT_MSG_NEWOBJ and len(out) < MAX_OBJECTS:
                    _counter(data, at + 20, at + length, table, out)
                at += (length + 3) & ~3


def _counter(data: bytes, start: int, end: int, table: str, out: dict[str, int]) -> None:
    name, packets, own = None, None, False
    for kind, lo, hi in _nested(data, start, end):
        if kind == _OBJ_TABLE:
            own = _string(data, lo, hi) == table
        elif kind == _OBJ_NAME:
            name = _string(data, lo, hi)
        elif kind == _OBJ_DATA:
            for k, a, b in _nested(data, lo, hi):
                if k == _COUNTER_PACKETS and b - a == 8:
                    packets = struct.unpack_from("!Q", data, a)[0]
    if own and name is not None and packets is not None:
        out[name] = int(packets)


class Monitor:
    """Follows nf_tables notifications in a thread and reports, through callbacks:
    `changed(Change)` for a foreign transaction that touched the owned table, and
    `lost(reason)` when events may have been missed (the caller then compares in full).
    """

    def __init__(self, table: str = "") -> None:
        self.table = table
        self.events = 0  # nf_tables messages read (own commits are not read at all)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._changed: Callable[[Change], None] = lambda c: None
        self._lost: Callable[[str], None] = lambda r: None
        self._own_tids: set[int] = {os.getpid()}
        self._parser = Parser(table, self._own_tids.__contains__)
        # Held while the parser is fed or the membership changes: the reader thread and a
        # `quiet` window never feed it at the same time, so events keep their order.
        self._feeding = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()  # `stop` wakes the reader with a byte

    def start(self, changed: Callable[[Change], None], lost: Callable[[str], None]) -> None:
        """Subscribe and start reading. Raises OSError when notifications cannot be had."""
        self._changed, self._lost = changed, lost
        self._open()
        self._thread = threading.Thread(target=self._read, name="mtd-monitor", daemon=True)
        self._thread.start()

    def set_table(self, table: str) -> None:
        self.table = table
        self._parser.table = table.encode()

    def _open(self) -> None:
        sock = _socket()
        try:
            with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN; the default is smaller
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            now = generation()  # subscribed first: from here on, every NEWGEN is read
        except OSError:
            sock.close()
            raise
        with self._feeding:
            self._parser.forget()
            self._parser.generation, self._parser.synced = now, True
        self._sock = sock

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=1)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    @contextlib.contextmanager
    def quiet(self, commits: Callable[[], int]) -> Iterator[Window]:
        """Around mtd's own commits: their events (a million at a million mappings) are not
        delivered at all. `commits()` counts the transactions this process has committed;
        if the generation moved by more than that, someone else committed meanwhile.

        On opening, after leaving the group, what the socket still holds is read here (in
        order, the reader waits) and the generation then is compared with the last NEWGEN
        read: a foreign transaction whose NEWGEN (or some of its events) came after the
        group was left is reported as lost, never silently attributed to a later one or
        dropped. On closing, the group is joined before the generation is read, so a commit
        by someone else at that edge is delivered, or counted, or both."""
        self._own_tids.add(threading.get_native_id())
        sock = self._sock
        if sock is None:
            yield Window()
            return
        first = commits()
        problems = []
        with self._feeding:
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, NFNLGRP_NFTABLES)
            problems += self._drain(sock)
            try:
                before: int | None = generation()
            except OSError:
                before = None
            p = self._parser
            if p.pending:
                problems.append("a transaction by another process was cut off by mtd's own")
            elif p.synced and before is not None and p.generation != before:
                problems.append(
                    f"generation {before} by another process was not seen whole before mtd's "
                    f"own (last seen: {p.generation})"
                )
            p.forget()
            if before is not None:
                p.generation, p.synced = before, True
        for problem in problems:
            self._lost(problem)
        try:
            yield Window(-1 if before is None else before)
        finally:
            with self._feeding, contextlib.suppress(OSError):
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            try:
                if before is None:
                    raise OSError(errno.EPROTO, "no generation before mtd's own commit")
                after = generation()
                others = after - before - (commits() - first)
            except OSError as exc:
                with self._feeding:
                    self._parser.synced = False
                self._lost(f"cannot read the generation: {exc.strerror or exc}")
            else:
                with self._feeding:
                    self._parser.generation = max(self._parser.generation, after)
                if others > 0:
                    self._lost(f"{others} transaction(s) by other processes during mtd's own")

    def _drain(self, sock: socket.socket) -> list[str]:
        """Read and parse what the socket holds, without waiting (the caller holds
        `_feeding`); the problems met, if any."""
        while True:
            try:
                data = sock.recv(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return []
            except OSError as exc:
                self._parser.forget()
                if exc.errno == errno.ENOBUFS:
                    return ["netlink buffer overrun (ENOBUFS): events were lost"]
                return [f"notifications failed: {exc.strerror or exc}"]
            if not data:
                return []
            self.events += 1
            for change in self._parser.feed(data):
                self._changed(change)

    def _read(self) -> None:
        while not self._stop.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                select.select([sock, self._wake_r], [], [])
                if self._stop.is_set():
                    return
                with self._feeding:  # changes are handed on in the order of their events
                    data = sock.recv(1 << 17, socket.MSG_DONTWAIT)
                    if data:
                        self.events += 1
                        for change in self._parser.feed(data):
                            self._changed(change)
            except BlockingIOError:
                continue  # a `quiet` window read it first
            except OSError as exc:
                if self._stop.is_set():
                    return
                if exc.errno == errno.ENOBUFS:  # the kernel dropped events: the socket is fine
                    with self._feeding:
                        self._parser.forget()
                    self._lost("netlink buffer overrun (ENOBUFS): events were lost")
                    continue
                self._lost(f"notifications stopped: {exc.strerror or exc}")
                self._reopen()
                continue

    def _reopen(self) -> None:
        """After a socket error: a new socket, retried until it works or we stop."""
        old, self._sock = self._sock, None
        if old is not None:
            old.close()
        while not self._stop.wait(0.5):
            try:
                self._open()
                return
            except OSError:
                continue
