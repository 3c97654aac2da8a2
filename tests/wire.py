"""Hand-made probes with scapy, sent from inside a lab namespace, and the answers they get.

`python -m tests.wire IFACE < probes.json` (run inside a client namespace by `send()`) reads
a list of probe sequences and prints, for each probe, the normalised answers the client saw:
what any two hosts would differ on (sequence numbers, IP IDs, TTLs, flow labels, timestamps,
checksums) is left out, everything else is kept. Each probe is followed by an ICMP echo to
the same address; its reply closes the probe's answers (the host answers a probe before the
echo that follows it), so nothing waits a fixed time except a UDP probe that met silence,
whose answer (from a user-space service) may follow the echo.

A probe is a dict: v (4/6), src, dst, proto (tcp/udp), sport, dport, and optionally flags
("S", "F", "SF", "SA", "", ...), seq, ack, payload (text), opt ("rr-bad": a record-route
option of length 1; "rr": a valid one; "dst-param": an IPv6 destination-options header with
an unknown option that asks for a parameter problem; "dst-skip": one that asks to be
skipped; "hbh-param": the same in a hop-by-hop header; "rt0": a routing header type 0),
frag (bytes per fragment, 0: none), barrier (where the echo goes; default dst).
`"complete": true` makes a TCP probe the ACK that completes the handshake of the last SYN-ACK
the client port got (the service's banner is awaited, then the connection is reset; with
`"keep": true` the banner is acknowledged and the connection stays open until the end of
the sequence, for later probes from that port: `"est": true` gives one the connection's
next sequence and acknowledgement numbers).
A probe with proto "icmp" is an ICMP error from the client about a packet the server "sent"
from port `quote` (qproto tcp/udp) to the client's port `sport`: code "unreach" (IPv4 host
unreachable, ICMPv6 administratively prohibited: fatal to a half-open connection, quoting
the last SYN-ACK's sequence number) or "pmtu" (fragmentation needed / packet too big).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from typing import Any

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def build(p: dict[str, Any], echo_id: int = 0) -> list[bytes]:
    """The probe as raw IP packets (several when fragmented)."""
    from scapy.layers.inet import IP, TCP, UDP, IPOption_RR, fragment
    from scapy.layers.inet6 import (
        HBHOptUnknown,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
        fragment6,
    )
    from scapy.packet import Raw

    if p["proto"] == "icmp":
        return [icmp_error(p)]
    payload = p.get("payload", "").encode()
    if p["proto"] == "tcp":
        l4 = TCP(
            sport=p["sport"],
            dport=p["dport"],
            flags=p.get("flags", "S"),
            seq=p.get("seq", 1000),
            ack=p.get("ack", 0),
            window=1024,
        )
    else:
        l4 = UDP(sport=p["sport"], dport=p["dport"])
    l4 = l4 / Raw(payload) if payload else l4
    opt = p.get("opt", "")
    frag = p.get("frag", 0)
    if p["v"] == 4:
        options: list[Any] = []
        if opt == "rr":
            options = [IPOption_RR(routers=["0.0.0.0"])]
        elif opt == "rr-bad":
            options = [IPOption_RR(length=1)]
        pkt = IP(src=p["src"], dst=p["dst"], options=options) / l4
        if frag:
            return [bytes(f) for f in fragment(pkt, fragsize=frag)]
        return [bytes(pkt)]
    ip6 = IPv6(src=p["src"], dst=p["dst"])
    ext: Any = None
    if opt == "dst-param":
        ext = IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x80 | 0x3F, optdata=b"\0" * 4)])
    elif opt == "dst-skip":
        ext = IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x1E, optdata=b"\0" * 4)])
    elif opt == "hbh-param":
        ext = IPv6ExtHdrHopByHop(options=[HBHOptUnknown(otype=0x80 | 0x3F, optdata=b"\0" * 4)])
    elif opt == "rt0":
        ext = IPv6ExtHdrRouting(type=0, addresses=[p["dst"]], segleft=0)
    pkt = ip6 / ext / l4 if ext is not None else ip6 / l4
    if frag:
        pkt = ip6 / IPv6ExtHdrFragment() / (ext / l4 if ext is not None else l4)
        return [bytes(f) for f in fragment6(pkt, frag + 48)]
    return [bytes(pkt)]


def icmp_error(p: dict[str, Any]) -> bytes:
    """An ICMP error about a packet from the server's port `quote` to the client's `sport`;
    from `outer` (a forged source) if given; `inner_opt`: the quoted header carries IPv4
    options or an IPv6 destination-options header."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
    from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrDestOpt

    ipl = IP if p["v"] == 4 else IPv6
    if p["qproto"] == "tcp":
        inner: Any = TCP(sport=p["quote"], dport=p["sport"], flags="SA", seq=p.get("seq", 0))
    else:
        inner = UDP(sport=p["quote"], dport=p["sport"]) / (b"x" * 600)
    pmtu = p.get("code") == "pmtu"
    if p["v"] == 4:
        icmp: Any = ICMP(type=3, code=4, nexthopmtu=1000) if pmtu else ICMP(type=3, code=1)
    else:
        icmp = ICMPv6PacketTooBig(mtu=1280) if pmtu else ICMPv6DestUnreach(code=1)
    quoted: Any = ipl(src=p["dst"], dst=p["src"])
    if p.get("inner_opt"):
        quoted = (
            IP(src=p["dst"], dst=p["src"], options=[IPOption_NOP()] * 4)
            if p["v"] == 4
            else quoted / IPv6ExtHdrDestOpt()
        )
    outer = ipl(src=p.get("outer") or p["src"], dst=p["dst"])
    return bytes(outer / icmp / quoted / inner)


def echo(v: int, src: str, dst: str, ident: int, seq: int) -> bytes:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

    if v == 4:
        return bytes(IP(src=src, dst=dst) / ICMP(id=ident, seq=seq))
    return bytes(IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=ident, seq=seq))


def normalise(frame: bytes, probe: dict[str, Any]) -> dict[str, Any] | None:
    """One answer in a form two hosts agree on; None for what is not an answer to us."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
    from scapy.layers.inet6 import IPerror6, IPv6, _ICMPv6
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    ip = pkt.getlayer(IPv6 if probe["v"] == 6 else IP)
    if ip is None or ip.dst != probe["src"]:
        return None
    if any(layer.__name__.startswith(("ICMPv6ND", "ICMPv6Echo")) for layer in pkt.layers()):
        return None  # neighbour discovery, echo replies (barriers): never answers
    out: dict[str, Any] = {"from": ip.src}
    if TCP in pkt and not pkt.haslayer(TCPerror):
        t = pkt[TCP]
        out.update(kind="tcp", sport=t.sport, dport=t.dport, flags=str(t.flags), win=t.window)
        if t.flags.A:
            out["ack"] = (t.ack - probe.get("seq", 1000)) % 2**32
        out["opts"] = [o[0] if o[0] == "Timestamp" else list(o) for o in t.options]
        out["data"] = bytes(t.payload).decode(errors="replace")
        return out
    if UDP in pkt and not pkt.haslayer(UDPerror):
        u = pkt[UDP]
        out.update(kind="udp", sport=u.sport, dport=u.dport, data=bytes(u.payload).decode())
        return out
    if probe["v"] == 4:
        icmp = pkt.getlayer(ICMP)
    else:  # the ICMPv6 classes share a base that getlayer does not match
        kinds = [layer for layer in pkt.layers() if issubclass(layer, _ICMPv6)]
        icmp = pkt.getlayer(kinds[0]) if kinds else None
    if icmp is None:
        return {**out, "kind": "other", "summary": pkt.summary()}
    if icmp.type in (0, 129) or 133 <= icmp.type <= 137:  # echo replies (barriers), ND
        return None
    out.update(kind="icmp", type=icmp.type, code=icmp.code)
    inner = pkt.getlayer(IPerror if probe["v"] == 4 else IPerror6)
    if inner is not None:
        out["quote_dst"] = inner.dst
        l4 = inner.getlayer(TCPerror) or inner.getlayer(UDPerror)
        if l4 is not None:
            out["quote"] = [l4.sport, l4.dport]
    return out


class Wire:
    """Raw sockets in the caller's namespace: IP-level send, link-level receive."""

    def __init__(self, iface: str) -> None:
        self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.rx.bind((iface, 0))
        self.tx = {
            4: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
            6: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW),
        }
        self.tx[4].setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        for tx in self.tx.values():
            tx.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        self.ident = os.getpid() & 0xFFFF
        self.count = 0
        self.isn: dict[int, int] = {}  # the last SYN-ACK's sequence number, by client port
        self.una: dict[int, int] = {}  # what the client acknowledged last, by client port
        self.kept: dict[int, dict[str, Any]] = {}  # open connections, by client port

    def send(self, v: int, dst: str, data: bytes) -> None:
        self.tx[v].sendto(data, (dst, 0))

    def ask(self, probe: dict[str, Any], timeout: float = 5.0) -> list[dict[str, Any]]:
        """Send one probe, then an echo; the answers that come before the echo's reply."""
        from scapy.layers.inet import ICMP, IP, TCP
        from scapy.layers.inet6 import ICMPv6EchoReply, IPv6
        from scapy.layers.l2 import Ether

        self.count += 1
        v, dst, sport = probe["v"], probe["dst"], probe["sport"]
        complete = probe.get("complete", False)
        if complete:
            isn = self.isn.get(sport, 0)
            probe = {**probe, "flags": "A", "seq": 1001, "ack": isn + 1, "payload": ""}
            probe.update(opt="", frag=0)
        elif probe["proto"] == "icmp":
            probe = {**probe, "seq": self.isn.get(sport, 0)}
        elif probe.get("est") and sport in self.una:
            probe = {**probe, "seq": 1001, "ack": self.una[sport], "opt": "", "frag": 0}
        for data in build(probe):
            self.send(v, dst, data)
        # The echo goes to a unicast address: nobody answers one sent to a broadcast address.
        barrier = probe.get("barrier", dst)
        self.send(v, barrier, echo(v, probe["src"], barrier, self.ident, self.count))
        answers: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        barrier = False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.rx], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            frame, addr = self.rx.recvfrom(65535)
            if addr[2] == PACKET_OUTGOING:
                continue
            pkt = Ether(frame)
            reply = pkt.getlayer(ICMP) if v == 4 else pkt.getlayer(ICMPv6EchoReply)
            ip = pkt.getlayer(IP if v == 4 else IPv6)
            if (
                reply is not None
                and ip is not None
                and ip.dst == probe["src"]
                and (v == 6 or reply.type == 0)
                and reply.id == self.ident
                and reply.seq == self.count
            ):
                barrier = True
                if answers or (probe["proto"] != "udp" and not complete):
                    break
                # A user-space service answers after the kernel's echo reply.
                deadline = min(deadline, time.monotonic() + 1.0)
                continue
            answer = normalise(frame, probe)
            if answer is not None:
                if answer.get("kind") == "tcp" and answer["flags"] == "SA":
                    self.isn[answer["dport"]] = pkt[TCP].seq
                if complete and answer.get("data"):
                    self.una[sport] = pkt[TCP].seq + len(pkt[TCP].payload)
                answers.append(answer)
                if barrier:
                    break
        if not barrier:
            answers.append({"kind": "no-echo"})
        rst = {**probe, "flags": "R", "ack": 0, "proto": "tcp"}
        if complete and probe.get("keep") and sport in self.una:
            ack = {**probe, "ack": self.una[sport]}  # the banner: no retransmission of it
            for data in build(ack):
                self.send(v, dst, data)
            self.kept[sport] = rst
        elif complete:  # reset what the ACK opened: nothing of it outlives the probe
            for data in build(rst):
                self.send(v, dst, data)
        return answers

    def sequence(self, probes: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The answers to each probe; connections kept open are reset at the end."""
        try:
            return [self.ask(p) for p in probes]
        finally:
            for rst in self.kept.values():
                for data in build(rst):
                    self.send(rst["v"], rst["dst"], data)
            self.kept.clear()
            self.una.clear()


MARK = 0x77  # on every packet scapy sends: the client's own RSTs (without it) are dropped


def desync(wire: Wire, v: int, src: str, dst: str, sport: int, dport: int) -> list[dict]:
    """Issue 12, finding 4: open a connection by hand, half-close it, let the server close
    too, then send one RST with a wrong sequence number (conntrack takes it and moves to
    CLOSE; the socket ignores it and stays in LAST_ACK). Returns every TCP segment the server
    sent after that RST until its fourth FIN retransmission."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    for tx in wire.tx.values():
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    ipl = IP if v == 4 else IPv6

    def send(flags: str, seq: int, ack: int = 0) -> None:
        pkt = ipl(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
        wire.send(v, dst, bytes(pkt))

    def until(pred: Any, timeout: float = 10.0) -> list[Any]:
        seen: list[Any] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([wire.rx], [], [], left)[0]:
                break
            frame, addr = wire.rx.recvfrom(65535)
            pkt = Ether(frame)
            if addr[2] == PACKET_OUTGOING or TCP not in pkt or pkt[TCP].dport != sport:
                continue
            seen.append(pkt[TCP])
            if pred(pkt[TCP]):
                return seen
        raise TimeoutError(f"no awaited segment; saw {[(t.sport, str(t.flags)) for t in seen]}")

    send("S", 1000)
    synack = until(lambda t: t.flags.S and t.flags.A)[-1]
    y = synack.seq + 1
    send("A", 1001, y)
    data = until(lambda t: len(t.payload) > 0)[-1]
    y += len(data.payload)
    send("FA", 1001, y)
    until(lambda t: t.flags.F)
    send("R", 1002 + 100, 0)  # in the window, not the expected number
    fins = 0

    def fourth_fin(t: Any) -> bool:  # the RTO doubles: the gap before the fourth is > 1 s
        nonlocal fins
        fins += bool(t.flags.F)
        return fins == 4

    segments = until(fourth_fin, timeout=30)
    return [{"sport": t.sport, "flags": str(t.flags)} for t in segments]


def quoting(
    wire: Wire,
    v: int,
    src: str,
    dst: str,
    sport: int,
    kind: str,
    quote: int,
    port: int = 0,
    exchange: int = 0,
    mss_port: int = 0,
    outer: str = "",
    inner_opt: bool = False,
) -> dict[str, Any]:
    """Issue 21, finding 1: an ICMP error from the client quoting a packet the server "sent"
    from port `quote`. kind "abort": a SYN to `port` first, then a fatal error (IPv4 host
    unreachable, ICMPv6 administratively prohibited) quoting that SYN-ACK's sequence number,
    then the handshake's ACK: {"after_ack": flags the server sent}. kind "pmtu": a UDP
    datagram to `exchange` first (unless 0), then "fragmentation needed" / "packet too big"
    quoting a UDP datagram, then a SYN to `mss_port`: {"mss": the SYN-ACK's MSS}. `outer`:
    the error's forged source address (default: the client's own); `inner_opt`: the quoted
    header carries IPv4 options or an IPv6 destination-options header."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoReply, IPv6
    from scapy.layers.l2 import Ether

    ipl = IP if v == 4 else IPv6
    error = {"v": v, "src": src, "dst": dst, "proto": "icmp", "sport": sport, "quote": quote,
             "outer": outer, "inner_opt": inner_opt}  # fmt: skip

    def barrier() -> None:  # the host handles a packet before the echo that follows it
        wire.count += 1
        wire.send(v, dst, echo(v, src, dst, wire.ident, wire.count))
        if v == 4:
            until(lambda pkt: ICMP in pkt and pkt[ICMP].type == 0 and pkt[ICMP].seq == wire.count)
        else:
            until(lambda pkt: ICMPv6EchoReply in pkt and pkt[ICMPv6EchoReply].seq == wire.count)

    def until(pred: Any, timeout: float = 5.0) -> list[Any]:
        seen: list[Any] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([wire.rx], [], [], left)[0]:
                break
            frame, addr = wire.rx.recvfrom(65535)
            pkt = Ether(frame)
            ip = pkt.getlayer(ipl)
            if addr[2] == PACKET_OUTGOING or ip is None or ip.dst != src:
                continue
            seen.append(pkt)
            if pred(pkt):
                return seen
        raise TimeoutError(f"no awaited packet; saw {[p.summary() for p in seen]}")

    def syn(to: int, sp: int) -> Any:
        wire.send(v, dst, bytes(ipl(src=src, dst=dst) / TCP(sport=sp, dport=to, flags="S")))
        return until(lambda pkt: TCP in pkt and pkt[TCP].sport == to and pkt[TCP].dport == sp)[-1]

    def reset(to: int, sp: int, seq: int) -> None:  # nothing outlives the probe
        wire.send(
            v, dst, bytes(ipl(src=src, dst=dst) / TCP(sport=sp, dport=to, flags="R", seq=seq))
        )

    if kind == "abort":
        synack = syn(port, sport)[TCP]
        wire.send(v, dst, icmp_error({**error, "qproto": "tcp", "seq": synack.seq}))
        barrier()
        ack = TCP(sport=sport, dport=port, flags="A", seq=synack.ack, ack=synack.seq + 1)
        wire.send(v, dst, bytes(ipl(src=src, dst=dst) / ack))
        got = until(lambda pkt: TCP in pkt and pkt[TCP].sport == port)[-1][TCP]
        reset(port, sport, synack.ack)
        return {"after_ack": str(got.flags)}
    if exchange:
        wire.send(v, dst, bytes(ipl(src=src, dst=dst) / UDP(sport=sport, dport=exchange) / b"hi"))
        until(lambda pkt: UDP in pkt and pkt[UDP].sport == exchange)
    wire.send(v, dst, icmp_error({**error, "qproto": "udp", "code": "pmtu"}))
    barrier()
    synack = syn(mss_port, sport + 1)[TCP]
    reset(mss_port, sport + 1, synack.ack)
    return {"mss": dict(o for o in synack.options if o[0] == "MSS").get("MSS")}


def main() -> None:
    """`IFACE`: one JSON list of sequences in, their answers out. `IFACE --lines`: the same
    once per input line, until end of input (a long-lived prober: scapy loads once)."""
    wire = Wire(sys.argv[1] if len(sys.argv) > 1 else "eth0")
    if "--desync" in sys.argv:
        json.dump(desync(wire, **json.load(sys.stdin)), sys.stdout)
        return
    if "--quoting" in sys.argv:
        json.dump(quoting(wire, **json.load(sys.stdin)), sys.stdout)
        return
    if "--lines" in sys.argv:
        print("ready", flush=True)
        for line in sys.stdin:
            sequences = json.loads(line)
            print(json.dumps([wire.sequence(seq) for seq in sequences]), flush=True)
        return
    sequences = json.load(sys.stdin)
    json.dump([wire.sequence(seq) for seq in sequences], sys.stdout)


class Prober:
    """A long-lived `tests.wire --lines` inside a lab namespace (stopped with the lab)."""

    def __init__(self, lab: Any, role: str) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.lab = lab
        self.proc = lab.spawn(
            role,
            [sys.executable, "-m", "tests.wire", "eth0", "--lines"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("tests.wire did not start")

    def send(self, sequences: list[list[dict[str, Any]]]) -> list[list[list[dict]]]:
        self.proc.stdin.write(json.dumps(sequences) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("tests.wire stopped")
        return json.loads(line)


def send(lab: Any, role: str, sequences: list[list[dict[str, Any]]]) -> list[list[list[dict]]]:
    """Run the probes from `role`'s namespace; the answers, per sequence and probe."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = lab.run(
        role,
        [sys.executable, "-m", "tests.wire", "eth0"],
        input=json.dumps(sequences),
        cwd=root,
        timeout=60 + 10 * sum(len(s) for s in sequences),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tests.wire: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    main()
