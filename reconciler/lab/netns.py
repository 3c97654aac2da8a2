"""A throw-away lab of network namespaces for the demo, the tests and the benchmarks.

One server namespace holds a bridge; every client namespace hangs off it by a veth pair.
Nothing is created in the host's own namespace, and `close()` removes every namespace
(and so every interface, rule and process inside it) even after a failure.
Addresses are documentation ranges only: 192.0.2.0/24, 198.51.100.0/24, 2001:db8::/32.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVER_V4 = ("192.0.2.1/24", "198.51.100.1/24")
SERVER_V6 = ("2001:db8::1/64", "2001:db8:bad::1/64")
HUB_V6 = "2001:db8:ff::1"  # the control network several servers share (Redis), a /64
_counter = itertools.count()


@dataclass
class Host:
    ns: str
    v4: str
    v6: str


@dataclass
class Lab:
    """Namespaces named `<prefix><pid>-<role>`, unique per process, removed by `close()`."""

    prefix: str = "mtd"
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tag = f"{self.prefix}{os.getpid()}x{next(_counter)}"

    @property
    def server(self) -> Host:
        return self.hosts["srv"]

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def add_server(self, name: str = "srv") -> Host:
        ns = self.ns(name)
        _ip("netns", "add", ns)
        self.hosts[name] = Host(ns, SERVER_V4[0].split("/")[0], SERVER_V6[0].split("/")[0])
        self.sh(name, "ip link set lo up")
        self.sh(name, "ip link add br0 type bridge && ip link set br0 up")
        for addr in SERVER_V4:
            self.sh(name, f"ip addr add {addr} dev br0")
        for addr in SERVER_V6:
            self.sh(name, f"ip -6 addr add {addr} dev br0 nodad")
        return self.hosts[name]

    def add_client(self, name: str, v4: str, v6: str, server: str = "srv") -> Host:
        """A client with one address of each family, plugged into the server's bridge."""
        ns, srv = self.ns(name), self.hosts[server].ns
        _ip("netns", "add", ns)
        self.hosts[name] = Host(ns, v4, v6)
        port = f"p{len(self.hosts)}"
        _ip("-n", srv, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.sh(server, f"ip link set {port} master br0 && ip link set {port} up")
        plen4 = 24
        plen6 = 64 if v6.startswith("2001:db8::") else 48
        self.sh(name, "ip link set lo up && ip link set eth0 up")
        self.sh(name, f"ip addr add {v4}/{plen4} dev eth0")
        self.sh(name, f"ip -6 addr add {v6}/{plen6} dev eth0 nodad")
        # Every client reaches every server address, whichever subnet it is on.
        self.sh(name, "ip route add 192.0.2.0/24 dev eth0 || true")
        self.sh(name, "ip route add 198.51.100.0/24 dev eth0 || true")
        self.sh(name, "ip -6 route add 2001:db8::/32 dev eth0 metric 2048 || true")
        return self.hosts[name]

    def add_hub(self, name: str = "hub", v6: str = HUB_V6) -> Host:
        """A namespace on a control network of its own (2001:db8:ff::/64) that servers join
        with `join_hub`: where what a fleet shares (Redis) runs. IPv6 only, so it never
        overlaps the servers' own subnets."""
        ns = self.ns(name)
        _ip("netns", "add", ns)
        self.hosts[name] = Host(ns, "", v6)
        self.sh(name, "ip link set lo up && ip link add hub0 type bridge && ip link set hub0 up")
        self.sh(name, f"ip -6 addr add {v6}/64 dev hub0 nodad")
        return self.hosts[name]

    def join_hub(self, role: str, v6: str, hub: str = "hub") -> str:
        """Plug `role` into the hub's network as `ctl0` with address `v6`. Returns the
        hub-side port: `ip link set PORT down` in the hub cuts `role` off."""
        port = f"to-{role}"[:15]
        _ip(
            "-n", self.hosts[hub].ns, "link", "add", port, "type", "veth",
            "peer", "name", "ctl0", "netns", self.hosts[role].ns,
        )  # fmt: skip
        self.sh(hub, f"ip link set {port} master hub0 && ip link set {port} up")
        self.sh(role, f"ip link set ctl0 up && ip -6 addr add {v6}/64 dev ctl0 nodad")
        return port

    def run(self, role: str, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess:
        """Run argv inside a namespace; text output captured unless told otherwise."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("check", False)
        return subprocess.run(["ip", "netns", "exec", self.hosts[role].ns, *argv], **kw)  # type: ignore[call-overload]

    def sh(self, role: str, script: str) -> str:
        proc = self.run(role, ["sh", "-c", script])
        if proc.returncode != 0:
            raise RuntimeError(f"{role}: {script}: {proc.stderr.strip()}")
        return proc.stdout

    def spawn(self, role: str, argv: Sequence[str], **kw: object) -> subprocess.Popen:
        """A background process inside a namespace, stopped by `close()`."""
        proc = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.hosts[role].ns, *argv], start_new_session=True, **kw
        )
        self.procs.append(proc)
        return proc

    def serve(
        self,
        role: str,
        tcp: Sequence[int | str],
        udp: Sequence[int | str],
        family: int | None = None,
    ) -> subprocess.Popen:
        """Listeners that answer with the real port they are on: `port 3`. A port given as
        `"20=3"` listens on 20 and answers `port 3` (a twin host of the shuffled view);
        `family` 4 or 6 listens on that family only (default both)."""
        argv = [
            sys.executable,
            "-m",
            "reconciler.lab",
            "serve",
            ",".join(map(str, tcp)) or "-",
            ",".join(map(str, udp)) or "-",
            *([str(family)] if family else []),
        ]
        proc = self.spawn(role, argv, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("lab listeners did not start")
        return proc

    def probe(self, role: str, proto: str, host: str, port: int) -> str:
        """Connect from inside `role`'s namespace; see `probe()`."""
        argv = [sys.executable, "-m", "reconciler.lab", "probe", proto, host, str(port)]
        return self.run(role, argv, timeout=30).stdout.strip()

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        for host in self.hosts.values():
            _kill_netns(host.ns)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True, check=False)
        self.hosts.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def standard_lab(tcp: Sequence[int] = (1, 2, 3, 4, 5), udp: Sequence[int] = (53,)) -> Iterator[Lab]:
    """Server with listeners, an untrusted client (192.0.2.3), a trusted one (192.0.2.2) and
    a client inside the watched prefix 198.51.100.0/24 / 2001:db8:bad::/48."""
    lab = Lab()
    try:
        lab.add_server()
        lab.add_client("unt", "192.0.2.3", "2001:db8::3")
        lab.add_client("tru", "192.0.2.2", "2001:db8::2")
        lab.add_client("net", "198.51.100.7", "2001:db8:bad::7")
        lab.serve("srv", tcp, udp)
        yield lab
    finally:
        lab.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server (no persistence, foreground, always killed by `stop()`).

    `host`/`port` where it listens; `lab`/`role`: the namespace it runs in (None: here)."""

    def __init__(
        self,
        workdir: Path,
        *,
        lab: Lab | None = None,
        role: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        replica_of: RedisServer | None = None,
    ) -> None:
        self.workdir = workdir
        self.lab, self.role = lab, role
        self.host = host
        self.port = port or (6379 if lab else free_port())
        self.replica_of = replica_of
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/0"

    def _argv(self, argv: list[str]) -> list[str]:
        if self.lab is None:
            return argv
        assert self.role is not None
        return ["ip", "netns", "exec", self.lab.hosts[self.role].ns, *argv]

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--dir", str(self.workdir),
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.replica_of is not None:
            argv += ["--replicaof", self.replica_of.host, str(self.replica_of.port)]
        self._launch(argv, "redis-server", timeout)
        return self

    def _launch(self, argv: list[str], what: str, timeout: float) -> None:
        """Start the server and wait until it answers PING (stopped again if it never does)."""
        self.proc = subprocess.Popen(
            self._argv(argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.proc.returncode}")
            if self.cli("PING", check=False) == "PONG":
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{what} on port {self.port} did not start")

    def wait_synced(self, timeout: float = 20.0) -> None:
        """A replica: until its link to the master is up (the first sync is done)."""
        deadline = time.monotonic() + timeout
        while "master_link_status:up" not in self.cli("INFO", "replication", check=False):
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica on port {self.port} never synced")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None

    def cli(self, *args: str, check: bool = True) -> str:
        """One redis-cli command (raw output, no quoting), in the server's namespace."""
        argv = ["redis-cli", "--raw", "-h", self.host, "-p", str(self.port), *args]
        proc = subprocess.run(
            self._argv(argv), capture_output=True, text=True, check=False, timeout=10
        )
        if check and (proc.returncode != 0 or proc.stdout.startswith("ERR")):
            raise RuntimeError(f"redis-cli {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout.strip()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisSentinel(RedisServer):
    """A `redis-server --sentinel` watching `master` under `name`, with fast lab timers
    (down after `down_after` ms, failover timeout `failover_timeout` ms)."""

    def __init__(
        self,
        workdir: Path,
        master: RedisServer,
        *,
        name: str = "mtd",
        quorum: int = 2,
        down_after: int = 500,
        failover_timeout: int = 2000,
        **kw: object,
    ) -> None:
        super().__init__(workdir, **kw)  # type: ignore[arg-type]
        self.master, self.name, self.quorum = master, name, quorum
        self.down_after, self.failover_timeout = down_after, failover_timeout

    def start(self, timeout: float = 10.0) -> RedisSentinel:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind {self.host}\ndaemonize no\nprotected-mode no\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {self.name} {self.master.host} {self.master.port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {self.name} {self.down_after}\n"
            f"sentinel failover-timeout {self.name} {self.failover_timeout}\n"
            f"sentinel parallel-syncs {self.name} 1\n"
        )
        self._launch(["redis-server", str(conf), "--sentinel"], "redis sentinel", timeout)
        return self

    def master_address(self) -> tuple[str, int] | None:
        out = self.cli("SENTINEL", "get-master-addr-by-name", self.name, check=False).split()
        return (out[0], int(out[1])) if len(out) == 2 else None


def sentinel_url(sentinels: Sequence[RedisServer], name: str = "mtd", db: int = 0) -> str:
    """`redis+sentinel://h1:p1,h2:p2/NAME/DB` for these Sentinels."""
    hosts = ",".join(
        f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}" for s in sentinels
    )
    return f"redis+sentinel://{hosts}/{name}/{db}"


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _kill_netns(ns: str) -> None:
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    for pid in proc.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _socket(kind: int, port: int, family: int | None) -> socket.socket:
    """A wildcard socket: dual-stack, or of one family (4, 6)."""
    s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family != 4:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(family == 6))
    s.bind(("0.0.0.0" if family == 4 else "::", port))
    return s


def _serve(
    tcp: list[tuple[int, int]], udp: list[tuple[int, int]], family: int | None = None
) -> None:
    """Listen on every (port, label) given; reply `port LABEL` to every client."""
    sel = selectors.DefaultSelector()
    for listen, port in tcp:
        s = _socket(socket.SOCK_STREAM, listen, family)
        s.listen(128)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, ("tcp", port))
    for listen, port in udp:
        s = _socket(socket.SOCK_DGRAM, listen, family)
        sel.register(s, selectors.EVENT_READ, ("udp", port))
    print("ready", flush=True)
    conns: dict[socket.socket, float] = {}
    while True:
        for key, _ in sel.select(timeout=1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            proto, port = key.data
            if proto == "tcp":
                with contextlib.suppress(OSError):
                    conn, _ = sock.accept()
                    conn.setblocking(False)
                    conn.sendall(f"port {port}\n".encode())
                    sel.register(conn, selectors.EVENT_READ, ("conn", port))
                    conns[conn] = time.monotonic()
            elif proto == "udp":
                with contextlib.suppress(OSError):
                    _, peer = sock.recvfrom(2048)
                    sock.sendto(f"port {port}\n".encode(), peer)
            else:  # an open connection: echo lines back with the port, close on EOF
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data:
                    with contextlib.suppress(OSError):
                        sock.sendall(f"port {port}: ".encode() + data)
                else:
                    sel.unregister(sock)
                    conns.pop(sock, None)
                    sock.close()


def probe(proto: str, host: str, port: int, timeout: float = 2.0) -> str:
    """What a client sees at host:port: the listener's banner, `closed` or `timeout`."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            if proto == "udp":
                s.send(b"hello\n")
            return s.recv(256).decode().strip()
        except ConnectionRefusedError:
            return "closed"
        except TimeoutError:
            return "timeout"


def nmap_open(lab: Lab, role: str, target: str, mode: str, ports: str = "1-20") -> dict[int, str]:
    """Ports nmap does not report as closed, with their state (`open`, `open|filtered`...)."""
    argv = ["nmap", "-n", "-Pn", f"-p{ports}", "--max-retries", "2", "-T4", "-oG", "-"]
    argv += mode.split() + (["-6"] if ":" in target else []) + [target]
    out = lab.run(role, argv, timeout=120).stdout
    found: dict[int, str] = {}
    for line in out.splitlines():
        if "Ports:" in line:
            for item in line.split("Ports:", 1)[1].split("\t")[0].split(","):
                port, state, *_ = item.strip().split("/")
                if state != "closed":
                    found[int(port)] = state
    return found


def _label(item: str) -> tuple[int, int]:
    """`20=3`: listen on 20, answer `port 3`; `3`: listen on 3, answer `port 3`."""
    listen, _, label = item.partition("=")
    return int(listen), int(label or listen)


def main() -> None:
    """`python -m reconciler.lab serve ...|probe ...`: helpers run inside a lab namespace."""
    if len(sys.argv) in (4, 5) and sys.argv[1] == "serve":
        tcp, udp = ([] if a == "-" else [_label(p) for p in a.split(",")] for a in sys.argv[2:4])
        _serve(tcp, udp, int(sys.argv[4]) if len(sys.argv) == 5 else None)
    elif len(sys.argv) == 5 and sys.argv[1] == "probe":
        print(probe(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    else:
        sys.exit(
            "usage: python -m reconciler.lab serve TCP,PORTS UDP,PORTS [4|6]"
            " | probe tcp|udp HOST PORT"
        )
