"""`make bench`: mtd against the proof of concept's rule shape and against the kernel's floor.

A benchmark, not a test: it asserts nothing about time. Everything runs in network
namespaces it creates (reconciler.lab) and removes; it prints a markdown report and writes
it to benchmarks/results/latest.md.

1. Reconcile cost against size: `mtd apply` (first, no change, full: a new epoch read,
   diffed and applied), `mtd rotate` (a new epoch, replaced without reading back), the
   classic template (the seed's nine rules per pair), and the floor: the same rendered
   document sent in one libnftables `json_cmd` by a minimal script (floor.py), `nft -f` of
   the same document in nft syntax, and one listing of the table. Medians of several runs,
   peak RSS, and the phases of a full reconcile (phases.py).
2. Trigger-to-applied latency through a real redis-server and `mtd run`.
3. Packet path: new TCP connections per second from a watched source to a moved service
   (connrate.py), with 1 and with many watched sources, maps against classic.
4. Fleet fan-out: N daemons, each in its own namespace, on one Redis.
5. Sentinel failover: from the master's death to a daemon applying the next rotation.
6. Drift by events: idle CPU of `mtd run` (it follows nftables events, drift timer at an
   hour), and the time from a change made by hand with `nft` to the daemon's repair: from
   starting `nft`, from `nft` exiting, and from the event's arrival (the daemon's figure).
7. Coverage: the whole internet per source (0.0.0.0/0 and ::/0 per_source, trusted, a
   tripwire) at several bucket counts: `mtd apply` and `mtd rotate`, rules and elements;
   and, in one lab and one run, connections per second from a per_source source and from an
   explicit entry, alternated.
8. Footprint: the example state's ruleset and `mtd apply`; per_source rotations in `mtd run`.
9. Timing (timing.py): SYN to RST at real service ports moved away against unused ports,
   kernel timestamps, and the SYNs per port a median classifier needs to tell them apart.

Packet rate and timing compare two rulesets in one lab, alternated: `--template FILE` (the
one under test, default the shipped maps) against `--baseline FILE` (default: the same
ruleset without issue 21's ICMP-error drops, see timing.icmp_error_drop).

Addresses: bulk sources are map keys that never send a packet (benchmarks/states.py).

    python benchmarks/bench.py [--quick] [--sizes 10,1000] [--parts cost,packets,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script (make bench): import from this checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import states, timing  # noqa: E402
from reconciler.adapters import files, kernel  # noqa: E402
from reconciler.core import bulk, diff, render, shuffle  # noqa: E402
from reconciler.lab.mtdrun import MtdRun  # noqa: E402
from reconciler.lab.netns import Lab, RedisSentinel, RedisServer, sentinel_url  # noqa: E402
from reconciler.lab.timing import gap, spread  # noqa: E402

PY = sys.executable
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.md"
SIZES = (10, 1_000, 10_000, 100_000)
PARTS = ("cost", "latency", "packets", "rules", "fleet", "failover", "events", "coverage",
         "footprint", "timing")  # fmt: skip
EXTRA_PARTS = ("rotation",)  # section 8's `mtd run` rows alone (a part of `footprint`)
CLASSIC_MAX = 1_000  # 10,000 sources are 450,000 classic rules: minutes and ~10 GB per apply
TIMEOUT = 1800  # seconds for any one process; nothing here may hang
PORT = 3  # the moved service connections go to in the packet test


@dataclass
class Run:
    seconds: float
    rss_mb: float
    out: str


def run(lab: Lab, role: str, argv: list[str], timeout: float = TIMEOUT) -> Run:
    """One process inside a namespace: wall time and peak RSS (its own or its children's)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.hosts[role].ns, *argv], stdout=out, stderr=err, cwd=ROOT
        )
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # ip execs argv: same pid
        took = time.perf_counter() - start
        killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {err.read()[-500:]}")
        return Run(took, usage.ru_maxrss / 1024, out.read())


def mtd(lab: Lab, role: str, state: Path, *args: str) -> Run:
    # Its own files, caches included, next to the state (never the host's /var/lib/mtd).
    argv = [PY, "-m", "reconciler", "-s", str(state), "--state-dir", str(state.parent)]
    return run(lab, role, [*argv, *args])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- 1. reconcile cost ------------------------------------------------------------------


@dataclass
class Cost:
    n: int
    ipv6: bool
    elements: int
    first: float
    same: float
    full: float
    rotate: float
    daemon_rotate: float
    floor_apply: float
    floor_text: float
    floor_list: float
    rss: float
    floor_rss: float
    phases: dict[str, float]
    # The interpreter starting and importing the nftables bindings, nothing of mtd: what
    # any Python mtd pays, measured in the same namespace and run as `first` and `same`.
    interpreter: float = float("nan")

    @property
    def full_ratio(self) -> float:
        return self.full / (self.floor_apply + self.floor_list)

    @property
    def rotate_ratio(self) -> float:
        return self.rotate / self.floor_apply

    @property
    def daemon_ratio(self) -> float:
        return self.daemon_rotate / self.floor_apply


def cost(work: Path, n: int, ipv6: bool, runs: int) -> Cost:
    """Every measurement of one size, in one namespace, against one state."""
    with Lab(prefix="mtdb") as lab:
        return _cost(lab, work, n, ipv6, runs)


def _cost(lab: Lab, work: Path, n: int, ipv6: bool, runs: int) -> Cost:
    role = f"c{n}{'6' if ipv6 else ''}"
    lab.add_server(role)
    path = states.write(work / role / "state.yaml", n, ipv6=ipv6)
    state = files.load_state(path)
    # Reading a whole 1M-element table back takes about a minute: once is enough there.
    slow = 1 if n >= 100_000 else runs
    say(f"cost {n}x5{' +IPv6' if ipv6 else ''}: mtd apply")

    def fresh_apply() -> Run:
        lab.sh(role, "nft delete table inet mtd 2>/dev/null || true")
        return mtd(lab, role, path, "apply")

    def full_apply() -> Run:
        next_epoch(state)  # every mapping changes: read, diff and replace all of it
        return mtd(lab, role, path, "apply")

    def in_phases() -> Run:
        epoch = next_epoch(state)
        next_epoch(state)  # phases.py rotates to epoch + 1 as well
        return run(lab, role, [PY, str(HERE / "phases.py"), str(path), str(epoch)])

    first = [fresh_apply() for _ in range(runs)]
    same = [mtd(lab, role, path, "apply") for _ in range(slow)]
    full = [full_apply() for _ in range(slow)]
    rotate = [mtd(lab, role, path, "rotate") for _ in range(runs)]
    phases = [in_phases() for _ in range(slow)]
    say(f"cost {n}x5{' +IPv6' if ipv6 else ''}: floor")
    docs, texts = _floor_documents(work / role, state)
    floor_py = [PY, str(HERE / "floor.py")]
    floor = [run(lab, role, [*floor_py, "apply", docs[i % 2]]) for i in range(runs)]
    text = [run(lab, role, ["nft", "-f", texts[i % 2]]) for i in range(runs)]
    listing = [run(lab, role, [*floor_py, "list", state.table]) for _ in range(slow)]
    bare = [run(lab, role, [PY, "-c", "import nftables"]) for _ in range(runs)]
    per_phase = [json.loads(r.out) for r in phases]
    return Cost(
        n=n,
        ipv6=ipv6,
        elements=_elements(docs[0]),
        first=median([r.seconds for r in first]),
        same=median([r.seconds for r in same]),
        full=median([r.seconds for r in full]),
        rotate=median([r.seconds for r in rotate]),
        daemon_rotate=median([p["rotation"] for p in per_phase]),
        floor_apply=median([float(r.out) for r in floor]),
        floor_text=median([r.seconds for r in text]),
        floor_list=median([float(r.out) for r in listing]),
        rss=max(r.rss_mb for r in first + same + full),
        floor_rss=max(r.rss_mb for r in floor),
        phases={k: median([p[k] for p in per_phase]) for k in PHASES},
        interpreter=median([r.seconds for r in bare]),
    )


PHASES = ("load", "shuffle", "render", "read", "diff", "apply")


def next_epoch(state: Any) -> int:
    """Move the local epoch on (as `mtd rotate` would, without applying)."""
    epoch = files.read_epoch(state.epoch_file) + 1
    files.write_epoch(state.epoch_file, epoch)
    return epoch


def _floor_documents(work: Path, state: Any) -> tuple[list[str], list[str]]:
    """The batch mtd sends (create-if-missing, delete, the rendered document) for two
    epochs, as JSON for `json_cmd` and in nft syntax for `nft -f`. Two, so that every
    floor run replaces a table with different content, as a rotation does."""
    secret = files.load_secret(state.secret_file, create=True)
    docs, texts = [], []
    for epoch in (1_000_000, 1_000_001):
        commands = render.render(state, shuffle.compute(state, secret, epoch))
        doc, text = work / f"floor-{epoch}.json", work / f"floor-{epoch}.nft"
        doc.write_text(bulk.dumps({"nftables": kernel.replace_batch(state.table, commands)}))
        text.write_text(nft_text(state.table, commands))
        docs.append(str(doc))
        texts.append(str(text))
    return docs, texts


def nft_text(table: str, commands: list[dict[str, Any]]) -> str:
    """The same document in nft syntax: the kernel's own listing of the element-free
    skeleton (loaded in a scratch namespace), then the elements, after the same
    create-if-missing and delete that mtd puts first."""
    skeleton = {"nftables": kernel.replace_batch(table, diff.skeleton_commands(commands))}
    listed = subprocess.run(
        ["unshare", "--net", "sh", "-c", f"nft -j -f - && nft list table inet {table}"],
        input=json.dumps(skeleton),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [f"add table inet {table}", f"delete table inet {table}", listed]
    for cmd in commands:
        (kind, obj), *_ = cmd["add"].items()
        items = obj.get("elem") or [] if kind in ("set", "map") else []
        if kind == "map":
            words = [f"{diff.elem_text(k)} : {diff.elem_text(v)}" for k, v in items]
        else:
            words = [diff.elem_text(e) for e in items]
        for i in range(0, len(words), 10_000):
            chunk = ", ".join(words[i : i + 10_000])
            lines.append(f"add element inet {table} {obj['name']} {{ {chunk} }}")
    return "\n".join(lines) + "\n"


def _elements(doc: str) -> int:
    """Map elements (mappings) in a document: both directions of every moved port."""
    with open(doc, encoding="utf-8") as f:
        commands = json.load(f)["nftables"]
    maps = [c["add"]["map"] for c in commands if "map" in c.get("add", {})]
    return sum(len(m.get("elem") or []) for m in maps)


@dataclass
class Classic:
    n: int
    rules: int
    first: float
    rss: float


def classic(work: Path, n: int, runs: int) -> Classic:
    """`mtd apply` of the classic template: the seed's rule shape, through the same mtd."""
    path = states.write(work / f"k{n}" / "state.yaml", n, template="classic")
    say(f"classic {n}x5: mtd apply")
    first = []
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        for _ in range(runs):
            lab.sh("srv", "nft delete table inet mtd 2>/dev/null || true")
            first.append(mtd(lab, "srv", path, "apply"))
    state = files.load_state(path)
    commands = render.render(state, shuffle.compute(state, b"\0" * 32, 0))
    rules = sum("rule" in c["add"] for c in commands)
    return Classic(n, rules, median([r.seconds for r in first]), max(r.rss_mb for r in first))


# --- 2. and 4. latency: publish -> applied, through a real redis-server and `mtd run` -------


class Daemon(MtdRun):
    """`mtd run --log-json` in a namespace; every log line is kept with the moment it arrived
    (CLOCK_MONOTONIC, the publisher's clock too). A daemon logs a pass right after its kernel
    transaction returns, so a line's arrival is when its epoch became live, to within the
    few hundred microseconds a log line and a pipe take."""

    def __init__(self, lab: Lab, role: str, state: Path, *args: str) -> None:
        super().__init__(lab, role, state, *args, cwd=ROOT)

    def next(self, event: str, since: int, timeout: float = 600) -> tuple[float, dict[str, Any]]:
        """The first log line of `event` from line `since` on, with when it arrived."""
        end = time.monotonic() + timeout
        with self.changed:
            while True:
                for arrived, e in self.lines[since:]:
                    if e.get("event") == event:
                        return arrived, e
                if self.proc.poll() is not None or not self.changed.wait(end - time.monotonic()):
                    raise RuntimeError(f"daemon: no {event} event")

    def rss(self) -> float:
        """Resident memory of the daemon now, in MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu(self) -> float:
        """CPU seconds the daemon has used so far, all threads (ip execs argv: same pid)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def applied(self, epoch: int, timeout: float = 120) -> float:
        """When the daemon reported `epoch` applied."""
        arrived, e = self.arrival(
            lambda e: e.get("event") == "reconcile" and e.get("epoch") == epoch, timeout=timeout
        )
        if e.get("result") not in ("changed", "ok"):
            raise RuntimeError(f"daemon: {e.get('message')}")
        return arrived


def redis_server(lab: Lab, role: str, bind: str) -> None:
    """A real redis-server in the namespace (port 6379 is free in a fresh one), no disk."""
    argv = ["redis-server", "--port", "6379", "--bind", bind, "--save", "", "--appendonly", "no"]
    lab.spawn(role, [*argv, "--protected-mode", "no"], stdout=subprocess.DEVNULL)
    for _ in range(100):
        if lab.run(role, ["redis-cli", "-h", bind, "ping"]).stdout.strip() == "PONG":
            return
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def publisher(lab: Lab, role: str, state: Path) -> Callable[[], tuple[float, int]]:
    proc = lab.spawn(
        role,
        [PY, str(HERE / "publisher.py"), str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def publish() -> tuple[float, int]:
        stdin.write("\n")
        stdin.flush()
        start, epoch = stdout.readline().split()
        return float(start), int(epoch)

    return publish


@dataclass
class Latency:
    n: int
    mode: str
    samples: list[float]
    floor: float = float("nan")  # json_cmd of the same document, same namespace and run


def latency(work: Path, n: int, triggers: int, *args: str, floor: bool = False) -> Latency:
    """One daemon, one trigger at a time: publish, wait until applied, again. With `floor`,
    then the kernel's floor for the same size in the same namespace (the daemon stopped)."""
    mode = " ".join(args) or "default"
    say(f"latency {n}x5 ({mode}): {triggers} triggers")
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        redis_server(lab, "srv", "127.0.0.1")
        path = states.write(work / f"l{n}{len(args)}" / "state.yaml", n, redis=REDIS_LOCAL)
        # No drift check during the measurement: it would only queue triggers behind it.
        daemon = Daemon(lab, "srv", path, "--drift-interval", "3600", *args)
        daemon.applied(0)
        publish = publisher(lab, "srv", path)
        samples = []
        for _ in range(triggers):
            start, epoch = publish()
            samples.append(daemon.applied(epoch) - start)
        took = float("nan")
        if floor:
            daemon.proc.terminate()
            daemon.proc.wait(timeout=60)
            docs, _ = _floor_documents(path.parent, files.load_state(path))
            runs = [run(lab, "srv", [PY, str(HERE / "floor.py"), "apply", docs[i % 2]])
                    for i in range(5)]  # fmt: skip
            took = median([float(r.out) for r in runs])
        return Latency(n, mode, samples, took)


@dataclass
class Fanout:
    daemons: int
    samples: list[float]  # per trigger: publish -> the last daemon applied


def fanout(work: Path, daemons: int, triggers: int) -> Fanout:
    """N daemons, each in its own namespace, on one Redis in the server namespace."""
    say(f"fleet: {daemons} daemons")
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        redis_server(lab, "srv", lab.server.v4)
        url = f"redis://{lab.server.v4}:6379/0"
        fleet = []
        for i in range(daemons):
            lab.add_client(f"h{i}", f"192.0.2.{100 + i}", f"2001:db8::{100 + i:x}")
            path = states.write(work / f"f{daemons}" / f"h{i}" / "state.yaml", 10, redis=url)
            fleet.append(Daemon(lab, f"h{i}", path, "--drift-interval", "3600"))
        for d in fleet:
            d.applied(0)
        publish = publisher(lab, "srv", path)
        samples = []
        for _ in range(triggers):
            start, epoch = publish()
            samples.append(max(d.applied(epoch) for d in fleet) - start)
        return Fanout(daemons, samples)


REDIS_LOCAL = "redis://127.0.0.1:6379/0"


@dataclass
class Failover:
    promotion: list[float]  # master killed -> a Sentinel names the replica
    applied: list[float]  # master killed -> the daemon has the next rotation live


def failover(work: Path, rounds: int) -> Failover:
    """A master, a replica and three Sentinels (down after 500 ms, failover timeout 2 s)
    and one `mtd run` in a namespace, fresh each round: the master is killed, a rotation is
    published at once (the publisher retries until the new master takes it), and the time
    from the kill to the daemon's log line for that epoch is measured."""
    say(f"sentinel failover: {rounds} rounds")
    out = Failover([], [])
    for i in range(rounds):
        with Lab(prefix="mtdb") as lab:
            lab.add_server()
            promoted, applied = _failover_round(lab, work / f"failover{i}")
            out.promotion.append(promoted)
            out.applied.append(applied)
    return out


def _failover_round(lab: Lab, here: Path) -> tuple[float, float]:
    master = RedisServer(here / "m", lab=lab, role="srv", port=6379)
    replica = RedisServer(here / "r", lab=lab, role="srv", port=6380, replica_of=master)
    sentinels = [
        RedisSentinel(here / f"s{k}", master, lab=lab, role="srv", port=26379 + k) for k in range(3)
    ]
    try:
        master.start()
        replica.start().wait_synced()
        for s in sentinels:
            s.start()
        path = states.write(here / "state.yaml", 10, redis=sentinel_url(sentinels))
        daemon = Daemon(lab, "srv", path, "--drift-interval", "3600",
                        "--reconnect-min", "0.05", "--reconnect-max", "0.2")  # fmt: skip
        daemon.applied(0)
        publish = publisher(lab, "srv", path)
        daemon.applied(publish()[1])
        published: list[tuple[float, int]] = []
        thread = threading.Thread(target=lambda: published.append(publish()), daemon=True)
        killed = time.monotonic()
        master.stop()
        thread.start()  # blocks in its retries until the replica is promoted
        promoted = float("nan")
        while time.monotonic() - killed < 60:
            if sentinels[0].master_address() == (replica.host, replica.port):
                promoted = time.monotonic() - killed
                break
            time.sleep(0.01)
        thread.join(60)
        if not published:
            raise RuntimeError("failover: the rotation after the kill was never published")
        return promoted, daemon.applied(published[0][1]) - killed
    finally:
        for p in (master, replica, *sentinels):
            p.stop()


# --- 6. drift by events --------------------------------------------------------------------


@dataclass
class Events:
    n: int
    mappings: int
    idle_seconds: float
    idle_cpu: float  # share of one core while idle
    repairs: dict[str, list[float]]  # hand change -> seconds from starting `nft` to repaired
    inner: dict[str, list[float]]  # the daemon's own figure: from the event to repaired
    after_nft: dict[str, list[float]]  # from `nft` exiting to repaired (0: repaired before)
    how: dict[str, set[str]]  # the drift line's `repair`: events (one small transaction) or table
    rss: tuple[float, float] = (0.0, 0.0)  # the daemon's RSS in MB: idle, after the repairs


HAND = {  # what an operator might do by hand, and what mtd does about it
    "rule deleted": "flush chain inet mtd raw_output",
    "chain policy": "add chain inet mtd nat_prerouting {{ policy drop ; }}",
    "element deleted": "delete element inet mtd tcp4 {{ {source} . 3 }}",
}


def events(work: Path, n: int, idle: float, repeats: int, kinds: tuple[str, ...]) -> Events:
    """One `mtd run` at n sources: its CPU over `idle` seconds with nothing happening, then
    hand changes with `nft`, each timed from the moment `nft` started to the daemon's log
    line for the repair (written right after the repairing transaction returned)."""
    say(f"events {n}x5: idle {idle:g} s, repairs {', '.join(kinds)}")
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        redis_server(lab, "srv", "127.0.0.1")
        path = states.write(work / f"e{n}" / "state.yaml", n, redis=REDIS_LOCAL)
        daemon = Daemon(lab, "srv", path, "--drift-interval", "3600")
        daemon.applied(0, timeout=TIMEOUT)
        time.sleep(2)  # let the start pass's garbage settle before measuring idle
        cpu0, t0 = daemon.cpu(), time.monotonic()
        time.sleep(idle)
        used, took = daemon.cpu() - cpu0, time.monotonic() - t0
        idle_rss = daemon.rss()
        repairs: dict[str, list[float]] = {}
        inner: dict[str, list[float]] = {}
        after: dict[str, list[float]] = {}
        how: dict[str, set[str]] = {}
        for kind in kinds:
            script = HAND[kind].format(source=states.UNDER_TEST)
            for _ in range(repeats):
                mark = len(daemon.lines)
                start = time.monotonic()  # the daemon may repair before `nft` has exited
                lab.sh("srv", f"nft '{script}'")
                ended = time.monotonic()
                arrived, ev = daemon.next("drift", mark, timeout=600 if n >= 100_000 else 120)
                repairs.setdefault(kind, []).append(arrived - start)
                after.setdefault(kind, []).append(max(0.0, arrived - ended))
                inner.setdefault(kind, []).append(float(ev.get("repair_seconds", "nan")))
                how.setdefault(kind, set()).add(str(ev.get("repair", "?")))
        mappings = n * len(states.SERVICES) * 2
        rss = (idle_rss, daemon.rss())
        return Events(
            n, mappings, took if idle else 0.0, used / took, repairs, inner, after, how, rss
        )


def percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


# --- 3. packet path ---------------------------------------------------------------------


@dataclass
class Rate:
    sources: int
    template: str
    per_second: float
    load: float


def packets(work: Path, sources: int, template: str, seconds: float, repeats: int) -> Rate:
    """Connections per second from the watched client (the last source) to its shuffled port.

    classic at many sources is loaded with one `json_cmd` of mtd's own rendering (mtd apply of
    450,000 rules would take minutes); maps with `mtd apply`.
    """
    say(f"packets: {template} with {sources} watched sources")
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        client = lab.add_client("unt", states.UNDER_TEST, "2001:db8::3")
        lab.serve("srv", states.SERVICES, [])
        dirname = work / f"p{template}{sources}"
        path = states.write(dirname / "state.yaml", sources, template=template)
        state = files.load_state(path)
        secret = files.load_secret(state.secret_file, create=True)
        mapping = shuffle.compute(state, secret, 0)
        start = time.perf_counter()
        if template == "maps" or sources <= CLASSIC_MAX:
            mtd(lab, "srv", path, "apply")
        else:
            doc = dirname / "doc.json"
            # The shipped template, not a repository's: classic at 10,000 sources writes
            # about 135 MB, past the bound on what a rendering may write (128 MiB).
            bound, render.MAX_RENDERED_CHARS = render.MAX_RENDERED_CHARS, 1 << 31
            try:
                commands = render.render(state, mapping)
            finally:
                render.MAX_RENDERED_CHARS = bound
            doc.write_text(bulk.dumps({"nftables": kernel.replace_batch(state.table, commands)}))
            run(lab, "srv", [PY, str(HERE / "floor.py"), "apply", str(doc)])
        load = time.perf_counter() - start
        port = mapping.moves[(client.v4, "tcp")][PORT]
        argv = [PY, str(HERE / "connrate.py"), lab.server.v4, str(port), str(seconds)]
        rates = [float(run(lab, "unt", argv).out) for _ in range(repeats)]
        return Rate(sources, template, median(rates), load)


@dataclass
class Alternated:
    sources: int
    labels: tuple[str, str]
    rules: tuple[int, int]
    rates: tuple[list[float], list[float]]  # run i of each is a pair, measured back to back
    handshake: tuple[list[float], list[float]]  # SYN to SYN-ACK, microseconds

    @property
    def ratios(self) -> list[float]:
        return sorted(a / b for a, b in zip(*self.rates, strict=True))

    @property
    def ratio(self) -> float:
        """The median of the pairs' ratios: load that changes from pair to pair cancels."""
        return median(self.ratios)

    def interval(self, reps: int = 4000) -> tuple[float, float]:
        """A 95% bootstrap interval of that median."""
        rng = random.Random(1)
        got = sorted(median(rng.choices(self.ratios, k=len(self.ratios))) for _ in range(reps))
        return got[int(0.025 * reps)], got[int(0.975 * reps) - 1]


def alternated(
    work: Path, sources: int, template: Path, baseline: Path | None, seconds: float, pairs: int
) -> Alternated:
    """Connections per second from the watched client to its shuffled port with two rulesets
    in one lab: `template` and `baseline` (None: `template` without issue 21's ICMP-error
    drops), each loaded with one `json_cmd` before each of its runs. The runs go in pairs,
    one of each back to back, in the order ABBA...: on a shared machine the load changes
    from minute to minute by more than the difference sought, and within a pair both meet
    about the same."""
    say(f"rules: {template} against {baseline or 'it without the ICMP-error drops'}, "
        f"{sources} watched sources")  # fmt: skip
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        client = lab.add_client("unt", states.UNDER_TEST, "2001:db8::3")
        lab.serve("srv", states.SERVICES, [])
        here = work / f"alt{sources}"
        state = files.load_state(states.write(here / "state.yaml", sources))
        mapping = shuffle.compute(state, files.load_secret(state.secret_file, create=True), 0)
        docs = [timing.ruleset(state, mapping, template, here / "under.json"),
                timing.ruleset(state, mapping, baseline or template, here / "base.json",
                               strip_icmp=baseline is None)]  # fmt: skip
        port = mapping.moves[(client.v4, "tcp")][PORT]
        argv = [PY, str(HERE / "connrate.py"), lab.server.v4, str(port), str(seconds)]
        rates: tuple[list[float], list[float]] = ([], [])
        for i in range(pairs):
            for k in (0, 1) if i % 2 == 0 else (1, 0):
                run(lab, "srv", [PY, str(HERE / "floor.py"), "apply", str(docs[k][0])])
                rates[k].append(float(run(lab, "unt", argv).out))
        # The same question asked of one packet: SYN to SYN-ACK at the shuffled port, timed
        # by the kernel (timing.py), far less sensitive to the machine's load than a rate.
        handshake: tuple[list[float], list[float]] = ([], [])
        for i in range(20):
            for k in (0, 1) if i % 2 == 0 else (1, 0):  # ABBA, as above
                run(lab, "srv", [PY, str(HERE / "floor.py"), "apply", str(docs[k][0])])
                for s in timing.syns(lab, "unt", 4, lab.server.v4, [port], 100).values():
                    handshake[k].extend(x / 1000 for x in s)
    base = timing.label(baseline) if baseline else "the same without ICMP-error drops"
    labels = (timing.label(template), base)
    return Alternated(sources, labels, (docs[0][1], docs[1][1]), rates, handshake)


# --- 7. coverage: the whole internet per source ------------------------------------------


@dataclass
class Internet:
    buckets: int
    rules: int
    elements: int
    apply: float
    rotate: float


PER_SOURCE = [{"source": "0.0.0.0/0", "per_source": True}, {"source": "::/0", "per_source": True}]


def internet_doc(workdir: Path, buckets: int, extra: tuple[dict[str, Any], ...] = ()) -> dict:
    return {
        "table": "mtd",
        "secret_file": str(workdir / "secret"),
        "audit_log": str(workdir / "audit.jsonl"),
        "ports": {"range": states.PORT_RANGE, "services": {"tcp": states.SERVICES}},
        "trusted": ["203.0.113.0/24", "2001:db8:2::/64"],
        "watched": [*extra, *PER_SOURCE],
        "buckets": buckets,
        "tripwire": {"tcp": [23, 2323, 3389], "for": 3600},
    }


def internet(work: Path, buckets: int, runs: int) -> Internet:
    """`mtd apply` (fresh) and `mtd rotate` of a whole-internet state with `buckets`."""
    say(f"coverage: the whole internet, {buckets} buckets")
    path = work / f"i{buckets}" / "state.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(internet_doc(path.parent, buckets)))
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        first = []
        for _ in range(runs):
            lab.sh("srv", "nft delete table inet mtd 2>/dev/null || true")
            first.append(mtd(lab, "srv", path, "apply"))
        rotate = [mtd(lab, "srv", path, "rotate") for _ in range(runs)]
        state = files.load_state(path)
        commands = render.render(state, shuffle.compute(state, b"\0" * 32, 0))
        rules = sum("rule" in c["add"] for c in commands)
        elements = sum(len(next(iter(c["add"].values())).get("elem") or []) for c in commands
                       if "set" in c["add"] or "map" in c["add"])  # fmt: skip
    return Internet(buckets, rules, elements, median([r.seconds for r in first]),
                    median([r.seconds for r in rotate]))  # fmt: skip


# --- 8. footprint: the example state's ruleset and apply; per_source rotations in `mtd run` --


EXAMPLE = ROOT / "desired_state" / "mtd.yaml"


def shape(state: Any) -> dict[str, int]:
    """Rules, chains, sets and maps the state renders (epoch 0, a zero secret)."""
    commands = render.render(state, shuffle.compute(state, b"\0" * 32, 0))
    kinds = [next(iter(c["add"])) for c in commands]
    return {k: kinds.count(k) for k in ("rule", "chain", "set", "map")}


@dataclass
class Example:
    shape: dict[str, int]
    first: float  # `mtd apply` with no table: renders, lists nothing, applies
    same: float  # `mtd apply` again: in sync
    interpreter: float  # `python -c "import nftables"`, alternated with the two above

    @property
    def ratio(self) -> float:
        return self.first / self.interpreter


def example(work: Path, runs: int) -> Example:
    """The shipped example state (desired_state/mtd.yaml), its files in a work directory:
    whole `mtd apply` processes, alternated with the bare interpreter and bindings."""
    say("footprint: the example state")
    here = work / "example"
    here.mkdir(parents=True, exist_ok=True)
    doc = {**yaml.safe_load(EXAMPLE.read_text()), "secret_file": str(here / "secret"),
           "audit_log": str(here / "audit.jsonl")}  # fmt: skip
    path = here / "state.yaml"
    path.write_text(json.dumps(doc))
    first, same, bare = [], [], []
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        mtd(lab, "srv", path, "apply")  # the secret, and the caches warm (as on a host)
        for _ in range(runs):
            lab.sh("srv", "nft delete table inet mtd")
            first.append(mtd(lab, "srv", path, "apply").seconds)
            same.append(mtd(lab, "srv", path, "apply").seconds)
            bare.append(run(lab, "srv", [PY, "-c", "import nftables"]).seconds)
    return Example(shape(files.load_state(path)), median(first), median(same), median(bare))


@dataclass
class Rotation:
    buckets: int
    shape: dict[str, int]
    samples: list[float]  # publish -> applied, one trigger at a time


def rotation(work: Path, buckets: int, triggers: int) -> Rotation:
    """`mtd run` with the whole-internet per_source state (section 7's): trigger to applied."""
    say(f"footprint: mtd run, the whole internet, {buckets} buckets: {triggers} triggers")
    here = work / f"r{buckets}"
    here.mkdir(parents=True, exist_ok=True)
    path = here / "state.yaml"
    path.write_text(json.dumps(internet_doc(here, buckets) | {"redis": {"url": REDIS_LOCAL}}))
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        redis_server(lab, "srv", "127.0.0.1")
        daemon = Daemon(lab, "srv", path, "--drift-interval", "3600")
        daemon.applied(0)
        publish = publisher(lab, "srv", path)
        samples = []
        for _ in range(triggers):
            start, epoch = publish()
            samples.append(daemon.applied(epoch) - start)
    return Rotation(buckets, shape(files.load_state(path)), samples)


@dataclass
class ClassRate:
    kind: str
    per_second: float


def class_rates(work: Path, seconds: float, repeats: int) -> list[ClassRate]:
    """Connections per second to the shuffled port of service PORT from an explicit entry
    (192.0.2.3) and from a per_source source (192.0.2.4, inside 0.0.0.0/0), in one lab and
    one ruleset, the two alternated so load on the machine falls on both alike."""
    say("coverage: packet rate, per_source against explicit")
    path = work / "rates" / "state.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(internet_doc(path.parent, 64, ({"source": states.UNDER_TEST},))))
    with Lab(prefix="mtdb") as lab:
        lab.add_server()
        lab.add_client("unt", states.UNDER_TEST, "2001:db8::3")
        lab.add_client("ps", "192.0.2.4", "2001:db8::4")
        lab.serve("srv", states.SERVICES, [])
        mtd(lab, "srv", path, "apply")
        state = files.load_state(path)
        mapping = shuffle.compute(state, files.load_secret(state.secret_file), 0)
        ports = {"unt": mapping.moves[(states.UNDER_TEST, "tcp")][PORT],
                 "ps": mapping.bucket_of("192.0.2.4")["tcp"][PORT]}  # fmt: skip
        got: dict[str, list[float]] = {"unt": [], "ps": []}
        for _ in range(repeats):
            for role in ("unt", "ps"):
                argv = [PY, str(HERE / "connrate.py"), lab.server.v4, str(ports[role]),
                        str(seconds)]  # fmt: skip
                got[role].append(float(run(lab, role, argv).out))
    return [ClassRate("explicit", median(got["unt"])), ClassRate("per_source", median(got["ps"]))]


# --- report -----------------------------------------------------------------------------


def secs(x: float) -> str:
    if x != x:  # NaN: not measured
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else secs(x)


def size(n: int, ipv6: bool = False) -> str:
    return f"{n:,}x5" + (" +v6" if ipv6 else "")


def report(results: dict[str, Any], args: argparse.Namespace, took: float) -> str:
    out = [
        "# mtd benchmarks",
        "",
        f"`{' '.join(['python benchmarks/bench.py', *sys.argv[1:]])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC: {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}, {_nft_version()}, Python {platform.python_version()}; "
        f"{took / 60:.1f} min. Medians of {args.runs or 'several'} runs (see bench.py); "
        "whole processes unless said otherwise, mtd's bytecode compiled first as pip does "
        "on install. Sources: IPv4 hosts; `+v6`: one source in "
        f"{states.V6_SHARE} is an IPv6 /48 prefix. Mappings (map elements) count both "
        "directions of every moved port.",
        "",
    ]
    costs: list[Cost] = results.get("cost", [])
    if costs:
        out += [
            "## 1. Reconcile cost",
            "",
            "Whole `mtd` processes: `first` is `mtd apply` with no table; `no change`, "
            "`mtd apply` again (reads and diffs the whole table); `full`, `mtd apply` at a "
            "new epoch (YAML to applied: read, diff, replace); `rotate`, `mtd rotate` (a new "
            "epoch, replaced without reading back). `daemon rotation`: the same pass in a "
            "process that has the state loaded, as `mtd run` runs it on a trigger "
            "(phases.py). RSS: the highest peak of the `mtd apply` runs.",
            "",
            "| size | mappings | first | no change | full | rotate | daemon rotation | RSS apply |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for c in costs:
            out.append(
                f"| {size(c.n, c.ipv6)} | {c.elements:,} | {secs(c.first)} | {secs(c.same)} | "
                f"{secs(c.full)} | {secs(c.rotate)} | {secs(c.daemon_rotate)} | "
                f"{c.rss:.0f} MB |"
            )
        out += [
            "",
            "The floor, in the same namespace: `json_cmd` is one libnftables `json_cmd` of "
            "the batch mtd sends (create-if-missing, delete, the rendered document) replacing "
            "the table of another epoch, the call alone (floor.py); `nft -f`, the whole `nft` "
            "process loading the same batch written in nft syntax; `list`, one JSON listing of "
            "the table, the call alone. RSS: peak of the `json_cmd` process.",
            "",
            "| size | json_cmd | nft -f | list | full / (json_cmd + list) | "
            "rotate / json_cmd | daemon rotation / json_cmd | RSS json_cmd |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for c in costs:
            out.append(
                f"| {size(c.n, c.ipv6)} | {secs(c.floor_apply)} | {secs(c.floor_text)} | "
                f"{secs(c.floor_list)} | {c.full_ratio:.2f} | {c.rotate_ratio:.2f} | "
                f"{c.daemon_ratio:.2f} | {c.floor_rss:.0f} MB |"
            )
        out += [
            "",
            "Phases of a full reconcile, in-process (phases.py): load = YAML and validation; "
            "read = the kernel's canonical skeleton (cached in a daemon) and the listing; "
            "diff = keyed compare.",
            "",
            "| size | " + " | ".join(PHASES) + " | total |",
            "|---|" + "--:|" * (len(PHASES) + 1),
        ]
        for c in costs:
            cells = " | ".join(secs(c.phases.get(k, float("nan"))) for k in PHASES)
            out.append(f"| {size(c.n, c.ipv6)} | {cells} | {secs(sum(c.phases.values()))} |")
        out.append("")
    classics: list[Classic] = results.get("classic", [])
    if classics:
        maps = {c.n: c for c in costs if not c.ipv6}
        out += [
            "### Classic (the seed's rule shape) against maps",
            "",
            f"`mtd apply` with no table, template `classic` against `maps`. Capped at "
            f"{CLASSIC_MAX:,} sources: at 10,000 sources classic is 450,000 rules, one "
            "`json_cmd` of them alone takes about 40 s and 8 GB.",
            "",
            "| size | classic rules | classic first | maps first | classic / maps | classic RSS |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for k in classics:
            m = maps.get(k.n)
            ratio = f"{k.first / m.first:.0f}x" if m else "-"
            out.append(
                f"| {size(k.n)} | {k.rules:,} | {secs(k.first)} | "
                f"{secs(m.first) if m else '-'} | {ratio} | {k.rss:.0f} MB |"
            )
        out.append("")
    lats: list[Latency] = results.get("latency", [])
    if lats:
        out += [
            "## 2. Trigger to applied",
            "",
            "One `mtd run` and a real redis-server in one namespace; one rotation published "
            "at a time (publisher.py: `mtd rotate --publish` without its start-up), measured "
            "from just before the publish to the daemon's log line for the new epoch, written "
            "as soon as its kernel transaction returns. Drift checks off during the run.",
            "",
            "| size | daemon options | triggers | p50 | p99 | max | json_cmd floor |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for lat in lats:
            out.append(
                f"| {size(lat.n)} | {lat.mode} | {len(lat.samples)} | "
                f"{ms(median(lat.samples))} | {ms(percentile(lat.samples, 99))} | "
                f"{ms(max(lat.samples))} | {ms(lat.floor) if lat.floor == lat.floor else '-'} |"
            )
        out.append("")
    rates: list[Rate] = results.get("packets", [])
    if rates:
        out += [
            "## 3. Packet path",
            "",
            "New TCP connections per second (connect, read the banner, close) from the last "
            f"watched source to its shuffled port of service {PORT}; median of "
            f"{args.repeats} runs of {args.seconds:g} s, one client process.",
            "",
            "| template | watched sources | connections/s | vs 1 source | load time |",
            "|---|--:|--:|--:|--:|",
        ]
        base = {r.template: r.per_second for r in rates if r.sources == 1}
        for r in rates:
            rel = f"{r.per_second / base[r.template]:.0%}" if r.template in base else "-"
            out.append(
                f"| {r.template} | {r.sources:,} | {r.per_second:,.0f} | {rel} | {secs(r.load)} |"
            )
        out.append("")
    alts: list[Alternated] = results.get("alternated", [])
    if alts:
        out += [
            "Issue 21's rules against a ruleset without them: connections per second from the "
            "last watched source to its shuffled port, one lab, the two rulesets loaded in "
            "turn (one `json_cmd` each) before each run; runs of "
            f"{args.seconds:g} s in pairs, one of each back to back (order ABBA...). Ratio: "
            "the median of the pairs' ratios, with a 95% bootstrap interval.",
            "",
            "| watched sources | ruleset | rules | pairs | connections/s: median (min-max) "
            "| ratio (95%) |",
            "|--:|---|--:|--:|--:|--:|",
        ]
        for a in alts:
            low, high = a.interval()
            for i in (0, 1):
                ratio = f"{a.ratio:.1%} ({low:.1%}-{high:.1%})" if i == 0 else "1"
                out.append(f"| {a.sources:,} | {a.labels[i]} | {a.rules[i]} | {len(a.rates[i])} "
                           f"| {median(a.rates[i]):,.0f} ({min(a.rates[i]):,.0f}-"
                           f"{max(a.rates[i]):,.0f}) | {ratio} |")  # fmt: skip
        out += [
            "",
            "The same rulesets, one packet: SYN to SYN-ACK at the shuffled port, timed by the "
            "kernel in the client's namespace (timing.py), 2,000 SYNs each in 20 rounds of 100, "
            "ABBA; each round loads its ruleset afresh (where the kernel puts it in memory "
            "moves the figure by a few hundredths of a µs):",
            "",
            "| watched sources | ruleset | median (IQR) | difference (95%) |",
            "|--:|---|--:|--:|",
        ]
        for a in alts:
            g, low, high = gap(a.handshake[1], a.handshake[0])
            for i in (0, 1):
                diff = f"{g:+.2f} µs ({low:+.2f} to {high:+.2f})" if i == 0 else "-"
                out.append(f"| {a.sources:,} | {a.labels[i]} | {median(a.handshake[i]):.2f} µs "
                           f"({spread(a.handshake[i]):.2f} µs) | {diff} |")  # fmt: skip
        out.append("")
    nets: list[Internet] = results.get("internet", [])
    if nets:
        out += [
            "## 7. Coverage: the whole internet per source",
            "",
            "0.0.0.0/0 and ::/0 per_source, two trusted prefixes, a tripwire of three ports, "
            "services 1-5 in 1-60000: median `mtd apply` into an empty namespace and `mtd "
            "rotate`. Rules and elements grow with buckets; the number of sources does not "
            "enter.",
            "",
            "| buckets | rules | elements | mtd apply | mtd rotate |",
            "|--:|--:|--:|--:|--:|",
        ]
        out += [f"| {i.buckets} | {i.rules:,} | {i.elements:,} | {secs(i.apply)} | "
                f"{secs(i.rotate)} |" for i in nets]  # fmt: skip
        out.append("")
    crates: list[ClassRate] = results.get("class_rates", [])
    if crates:
        base = crates[0].per_second
        out += [
            "Connections per second to a moved service, same lab, same ruleset (64 buckets), "
            f"alternated, median of {args.repeats} runs of {args.seconds:g} s:",
            "",
            "| source | connections/s | vs explicit |",
            "|---|--:|--:|",
        ]
        out += [f"| {c.kind} | {c.per_second:,.0f} | {c.per_second / base:.0%} |"
                for c in crates]  # fmt: skip
        out.append("")
    ex: Example | None = results.get("example")
    if ex is not None:
        out += [
            "## 8. Footprint: pay for what you use",
            "",
            "The example state (desired_state/mtd.yaml: two watched sources, five TCP services, "
            "one UDP, no per_source entry) renders this ruleset; median whole `mtd apply` "
            "processes (with no table, then in sync) alternated with the bare interpreter "
            "importing the nftables bindings, same namespace:",
            "",
            "| rules | chains | sets | maps | mtd apply, no table | in sync | interpreter + "
            "nftables | no table / interpreter |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|",
            f"| {ex.shape['rule']} | {ex.shape['chain']} | {ex.shape['set']} | {ex.shape['map']} "
            f"| {ms(ex.first)} | {ms(ex.same)} | {ms(ex.interpreter)} | {ex.ratio:.1f}x |",
            "",
        ]
    rots: list[Rotation] = results.get("rotation", [])
    if rots:
        if ex is None:
            out += ["## 8. Footprint: pay for what you use", ""]
        out += [
            "Trigger to applied in `mtd run` (default options, no drift check meanwhile), the "
            "whole internet per_source (section 7's state), one trigger at a time through a real "
            "redis-server:",
            "",
            "| buckets | rules | chains | triggers | p50 | p99 | max |",
            "|--:|--:|--:|--:|--:|--:|--:|",
        ]
        out += [f"| {r.buckets} | {r.shape['rule']:,} | {r.shape['chain']:,} | {len(r.samples)} "
                f"| {ms(percentile(r.samples, 50))} | {ms(percentile(r.samples, 99))} "
                f"| {ms(max(r.samples))} |" for r in rots]  # fmt: skip
        out.append("")
    fans: list[Fanout] = results.get("fleet", [])
    if fans:
        out += [
            "## 4. Fleet fan-out",
            "",
            "N daemons (10x5 each), each in its own namespace, on one redis-server in the "
            "server namespace: from one publish until the last daemon has the new epoch live.",
            "",
            "| daemons | triggers | median | max |",
            "|--:|--:|--:|--:|",
        ]
        for f in fans:
            out.append(
                f"| {f.daemons} | {len(f.samples)} | {ms(median(f.samples))} | "
                f"{ms(max(f.samples))} |"
            )
        out.append("")
    fail: Failover | None = results.get("failover")
    if fail is not None:
        out += [
            "## 5. Sentinel failover",
            "",
            "A master, a replica and three Sentinels (`down-after-milliseconds 500`, "
            "`failover-timeout 2000`) and one `mtd run` (10x5, `--reconnect-max 0.2`) in a "
            "namespace, fresh each round. The master is killed and a rotation published at "
            "once (the publisher retries until the new master takes it): from the kill until a "
            "Sentinel names the replica master, and until the daemon has that rotation live.",
            "",
            "| rounds | promotion median | failover to first applied trigger: median | max |",
            "|--:|--:|--:|--:|",
            f"| {len(fail.applied)} | {ms(median(fail.promotion))} | "
            f"{ms(median(fail.applied))} | {ms(max(fail.applied))} |",
            "",
        ]
    evs: list[Events] = results.get("events", [])
    if evs:
        kinds = list(dict.fromkeys(k for e in evs for k in e.repairs))
        out += [
            "## 6. Drift by events",
            "",
            "One `mtd run` (drift timer at an hour) and a real redis-server in one namespace. "
            "Idle: CPU of the whole daemon (all threads) while nothing happens. Repair: from "
            "starting `nft` for a hand change to the daemon's `drift` log line (written "
            "when the repairing transaction returned), which includes `nft` itself (at 1M "
            "mappings it fetches the whole set before it deletes one element); from `nft` "
            "exiting to that line (0 when the repair came first); and the daemon's own "
            "figure, from the kernel's event arriving to the repair; medians (and the "
            "slowest of the daemon's: the first element repair indexes the rendered rows). "
            "How: the "
            "drift line's `repair`: `events` is one small transaction built from the events "
            "(chains, rules, single elements), `table` a replacement of the table.",
            "",
            "| size | mappings | idle CPU | RSS idle / after repairs | " + " | ".join(kinds) + " |",
            "|---|--:|--:|--:|" + "--:|" * len(kinds),
        ]
        for e in evs:
            cells = [
                f"{ms(median(e.repairs[k]))}; after nft {ms(median(e.after_nft[k]))}; "
                f"event to repair {ms(median(e.inner[k]))}, max {ms(max(e.inner[k]))} "
                f"({'/'.join(sorted(e.how[k]))})"
                if k in e.repairs
                else "-"
                for k in kinds
            ]
            idle = f"{e.idle_cpu:.2%} of a core over {e.idle_seconds:.0f} s"
            idle = idle if e.idle_seconds else "-"
            rss = f"{e.rss[0]:.0f} / {e.rss[1]:.0f} MB"
            out.append(
                f"| {size(e.n)} | {e.mappings:,} | {idle} | {rss} | " + " | ".join(cells) + " |"
            )
        out.append("")
    rows: list[timing.Row] = results.get("timing", [])
    if rows:
        out += [
            "## 9. Timing: real service ports against unused ones",
            "",
            "timing.py: SYNs from a watched source to every port of the range it finds closed "
            "(services 1-5 moved away; range 1-20, 16 buckets), one at a time, each from a "
            "new source port; SYN to RST timed by the kernel in the client's namespace "
            "(SO_TIMESTAMPNS on a packet socket), rulesets alternated round by round. "
            f"{args.timing_syns:,} SYNs per closed port in {args.timing_rounds} rounds. "
            f"Closed ports per view (real; unused): {timing.ports_text(rows)}. "
            + timing.CLASSIFIER,
            "",
            *timing.table(rows),
            "",
        ]
    out += targets(results)
    return "\n".join(out) + "\n"


def targets(results: dict[str, Any]) -> list[str]:
    """Where we stand against the issue's targets, from this run's numbers."""
    rows = []
    costs = {(c.n, c.ipv6): c for c in results.get("cost", [])}
    classics = {k.n: k for k in results.get("classic", [])}
    if (c := costs.get((10, False))) is not None:
        # A whole process: interpreter, imports, state, render (the caches in cache/ warm
        # after the first apply: canonical form, schema verdict, rendered text), the listing
        # and the apply; against the interpreter and `import nftables` alone, same run.
        slowest = max(c.first, c.same)
        what = "10x5: a whole `mtd apply` process < 100 ms (changed / in sync)"
        value = f"{ms(c.first)} / {ms(c.same)} (interpreter + nftables: {ms(c.interpreter)})"
        rows.append((what, value, slowest < 0.100))
    if (1_000, False) in costs and 1_000 in classics:
        maps, classic_first = costs[(1_000, False)].first, classics[1_000].first
        ratio = classic_first / maps
        value = f"{ratio:.0f}x ({ms(maps)} against {secs(classic_first)})"
        rows.append(("1,000x5: mtd apply >= 50x faster than classic", value, ratio >= 50))
    for ipv6 in (False, True):
        if (c := costs.get((10_000, ipv6))) is not None:
            what = f"10,000x5{' +v6' if ipv6 else ''}: full reconcile <= 2x floor"
            rows.append((what, f"{c.full_ratio:.2f}x", c.full_ratio <= 2))
    for ipv6 in (False, True):
        if (c := costs.get((100_000, ipv6))) is not None:
            v6 = " +v6" if ipv6 else ""
            what = f"100,000x5{v6}: rotation <= 1.3x floor apply: `mtd rotate`"
            rows.append((what, f"{c.rotate_ratio:.2f}x", c.rotate_ratio <= 1.3))
            what = f"100,000x5{v6}: rotation <= 1.3x floor apply: daemon pass"
            rows.append((what, f"{c.daemon_ratio:.2f}x", c.daemon_ratio <= 1.3))
    if (c := costs.get((10_000, False))) is not None:
        rows.append(("10,000x5: peak RSS of mtd apply < 300 MB", f"{c.rss:.0f} MB", c.rss < 300))
    for lat in results.get("latency", []):
        if lat.n == 10 and lat.mode == "default":
            p99 = percentile(lat.samples, 99)
            rows.append(("10x5: trigger to applied p99 < 20 ms", ms(p99), p99 < 0.020))
        if lat.floor == lat.floor and lat.mode == "default":  # measured (not NaN)
            ratio = median(lat.samples) / lat.floor
            what = f"{size(lat.n)}: trigger to applied (default daemon) <= 1.3x json_cmd"
            value = f"{ratio:.2f}x ({ms(median(lat.samples))} against {ms(lat.floor)})"
            rows.append((what, value, ratio <= 1.3))
    for e in results.get("events", []):
        if e.idle_seconds:
            what = f"{size(e.n)}: idle CPU of mtd run < 1% of a core"
            rows.append((what, f"{e.idle_cpu:.2%}", e.idle_cpu < 0.01))
        for kind, values in e.repairs.items():
            what = f"{size(e.n)}: hand change ({kind}) to repair < 1 s, from starting nft"
            rows.append((what, ms(median(values)), median(values) < 1))
            done = median(e.after_nft[kind])
            what = f"{size(e.n)}: hand change ({kind}) to repair < 1 s, from nft exiting"
            rows.append((what, ms(done), done < 1))
            inner = median(e.inner[kind])
            what = f"{size(e.n)}: event of a hand change ({kind}) to repair < 1 s"
            rows.append((what, f"{ms(inner)} ({'/'.join(sorted(e.how[kind]))})", inner < 1))
    if (ex := results.get("example")) is not None:
        what = "example state: at most 130 rules; `mtd apply` (no table) <= 6x interpreter"
        value = f"{ex.shape['rule']} rules; {ex.ratio:.1f}x ({ms(ex.first)} against "
        value += f"{ms(ex.interpreter)})"
        rows.append((what, value, ex.shape["rule"] <= 130 and ex.ratio <= 6))
    for r in results.get("rotation", []):
        if r.buckets == 64:
            p99 = percentile(r.samples, 99)
            what = "per_source, whole internet, 64 buckets: trigger to applied p99 < 20 ms"
            rows.append((what, ms(p99), p99 < 0.020))
    rates = {(r.template, r.sources): r.per_second for r in results.get("packets", [])}
    many = max((s for t, s in rates if t == "maps"), default=1)
    if ("maps", 1) in rates and many > 1:
        rel = rates[("maps", many)] / rates[("maps", 1)]
        what = f"maps: connection rate at {many:,} sources within 10% of 1 source"
        rows.append((what, f"{rel:.0%}", rel >= 0.9))
    for a in results.get("alternated", []):
        what = f"issue 21's rules cost <= 10% of connections/s at {a.sources:,} sources"
        low, high = a.interval()
        value = f"{a.ratio:.1%} of without (95%: {low:.1%}-{high:.1%})"
        rows.append((what, value, a.ratio >= 0.9))
    if not rows:
        return []
    out = ["## Targets", "", "| target | this run | met |", "|---|--:|---|"]
    out += [f"| {what} | {value} | {'yes' if ok else 'NO'} |" for what, value, ok in rows]
    return [*out, ""]


def _nft_version() -> str:
    proc = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.split(" (")[0].strip() or "nft ?"


# --- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs")
    parser.add_argument("--sizes", help="comma-separated source counts (default 10,...,100000)")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"of {','.join(PARTS + EXTRA_PARTS)}"
    )
    parser.add_argument(
        "--events-sizes", help="source counts of the events part (default 100,10000,100000)"
    )
    parser.add_argument("--runs", type=int, help="runs per measurement (default by size)")
    parser.add_argument("--no-ipv6", action="store_true", help="skip the +v6 variants")
    parser.add_argument("--out", type=Path, default=RESULTS, help="report file")
    parser.add_argument(
        "--template",
        type=Path,
        default=timing.SHIPPED,
        help="the ruleset under test for packets and timing (NAME.json.j2)",
    )
    parser.add_argument("--baseline", type=Path,
                        help="the ruleset it is compared with (default: it without issue 21's "
                        "ICMP-error drops)")  # fmt: skip
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    if args.quick:
        sizes = sizes or [10, 1_000]
        args.runs = args.runs or 3
    args.sizes = sizes or list(SIZES)
    args.seconds, args.repeats = (1.0, 2) if args.quick else (3.0, 3)
    parts = args.parts.split(",")
    args.timing_syns, args.timing_rounds = (400, 4) if args.quick else (4000, 20)
    for t in (args.template, args.baseline):
        if t is not None and (not t.name.endswith(".json.j2") or not t.is_file()):
            sys.exit(f"bench: {t}: expected a template file NAME.json.j2")
    if os.geteuid() != 0:
        sys.exit("bench: needs root (it creates network namespaces)")
    # Compiled as pip compiles an installed mtd: under PYTHONDONTWRITEBYTECODE (set in some
    # CI and sandboxes) every `mtd` process of a checkout would compile each module first.
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "reconciler")], check=True)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mtd-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("MTD_STATE_DIR", str(work))  # every other mtd process's files
        if "cost" in parts:
            results["cost"], results["classic"] = [], []
            for n in args.sizes:
                runs = args.runs or (7 if n <= 1_000 else 5 if n <= 10_000 else 3)
                for ipv6 in (False,) if args.no_ipv6 else (False, True):
                    results["cost"].append(cost(work, n, ipv6, runs))
                if n <= CLASSIC_MAX:
                    results["classic"].append(classic(work, n, min(runs, 3)))
        if "latency" in parts:
            # --full-compare reads the whole table back on every trigger: at 10,000
            # sources that is 2-3 s a trigger, so fewer of them (see the table).
            triggers, big = (50, 1_000) if args.quick else (200, 10_000)
            results["latency"] = [
                latency(work, 10, triggers),
                latency(work, big, triggers, floor=True),
                latency(work, big, triggers // 4, "--full-compare"),
            ]
        if "events" in parts:
            # Idle over a minute (10 s quick); repairs at 1k, 100k and 1M mappings.
            idle, repeats = (10.0, 3) if args.quick else (60.0, 5)
            sizes = (100, 10_000) if args.quick else (100, 10_000, 100_000)
            if args.events_sizes:
                sizes = tuple(int(x) for x in args.events_sizes.split(","))
            results["events"] = [
                events(work, n, idle if n >= 10_000 else 0.0, repeats if n < 100_000 else 2,
                       tuple(HAND))
                for n in sizes
            ]  # fmt: skip
        if "fleet" in parts:
            results["fleet"] = [
                fanout(work, n, 3 if args.quick else 10)
                for n in ((1, 5) if args.quick else (1, 10, 50))
            ]
        if "failover" in parts:
            results["failover"] = failover(work, 2 if args.quick else 5)
        if "packets" in parts:
            many = 1_000 if args.quick else 10_000
            results["packets"] = [
                packets(work, n, template, args.seconds, args.repeats)
                for template in ("maps", "classic")
                for n in (1, many)
            ]
        if "coverage" in parts:
            counts = (16, 64) if args.quick else (16, 64, 256, 1024)
            results["internet"] = [internet(work, b, args.runs or 3) for b in counts]
            results["class_rates"] = class_rates(work, args.seconds, args.repeats)
        if "footprint" in parts:
            results["example"] = example(work, args.runs or 11)
        if "footprint" in parts or "rotation" in parts:
            triggers = 30 if args.quick else 200
            results["rotation"] = [rotation(work, b, triggers) for b in (16, 64, 256)]
        if "rules" in parts:
            many = 1_000 if args.quick else 10_000
            results["alternated"] = [alternated(work, many, args.template, args.baseline,
                                                args.seconds, 6 if args.quick else 20)]  # fmt: skip
        if "timing" in parts:
            compared = [args.template, *([args.baseline] if args.baseline else [])]
            families = (4,) if args.no_ipv6 else (4, 6)
            results["timing"] = timing.measure(compared, args.timing_syns, args.timing_rounds,
                                               families)  # fmt: skip
    text = report(results, args, time.perf_counter() - start)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    say(f"written to {args.out}")


if __name__ == "__main__":
    main()
