"""`make demo`: the whole product in a sandboxed lab of network namespaces.

A server with services, an untrusted and a trusted client, a private redis-server and
`mtd run` on the server: what each client's nmap sees, a rotation published on Redis,
what they see after it, drift repaired, the diff that says the host is in sync, then one
view per source address (per_source buckets), a trusted source and a tripwire.

Nothing on the host changes: the lab's namespaces hold every rule, sysctl and process, the
desired state and secret live in a temporary directory, and everything is removed at the end,
on Ctrl-C and on failure too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

from reconciler.adapters import files
from reconciler.lab.mtdrun import MtdRun
from reconciler.lab.netns import Lab, RedisServer, free_port, nmap_open, standard_lab

SERVICES = [1, 2, 3, 4, 5]
STATE = {
    "table": "mtd",
    "template": "maps",
    "ports": {"range": [1, 20], "services": {"tcp": SERVICES, "udp": [53]}},
    "watched": [
        {"source": "192.0.2.3", "ignore": {"tcp": [1, 2]}},
        {"source": "2001:db8::3", "ignore": {"tcp": [1, 2]}},
        {"source": "198.51.100.0/24"},
    ],
}
VIEWS = [  # (label, client role, server address)
    ("untrusted 192.0.2.3  ", "unt", "192.0.2.1"),
    ("untrusted 2001:db8::3", "unt", "2001:db8::1"),
    ("trusted   192.0.2.2  ", "tru", "192.0.2.1"),
]


def say(text: str = "") -> None:
    print(text, flush=True)


def mtd(lab: Lab, state: Path, *args: str) -> str:
    proc = lab.run("srv", [sys.executable, "-m", "reconciler", "-s", str(state), *args])
    if proc.returncode not in (0, 2):
        raise SystemExit(f"mtd {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def show_views(lab: Lab, modes: tuple[str, ...] = ("-sS", "-sF")) -> None:
    """What nmap finds open from each client (-sF: a stateless scan the seed could not fool
    beyond three flag values; mtd fools them all)."""
    say(f"   {'client':24} " + "  ".join(f"nmap {m:8}" for m in modes) + "  (open ports of 1-20)")
    for label, role, target in VIEWS:
        cols = []
        for mode in modes:
            ports = sorted(nmap_open(lab, role, target, mode))
            cols.append(",".join(map(str, ports)).ljust(13))
        say(f"   {label:24} " + "  ".join(cols))


def step(n: int, text: str) -> None:
    say()
    say(f"{n}. {text}")


# More addresses of the untrusted client, inside the per_source 192.0.2.0/24.
EXTRA = ["192.0.2.50", "192.0.2.51", "192.0.2.52", "192.0.2.53"]


def whole_internet(lab: Lab, state: Path, daemon: MtdRun, url: str, workdir: Path) -> None:
    """Coverage: each address its own (bucket) view, a trusted source, and a tripwire that
    watches whoever touches it, decided in the kernel."""
    step(8, "One view per source: every address of 192.0.2.0/24 and every IPv6 /64 gets one")
    say("   of 16 bucket mappings, chosen by a keyed hash in the packet path (0.0.0.0/0 would")
    say("   cost the very same table); 192.0.2.2 is trusted; tcp 23 is a tripwire. mtd run")
    say("   takes the new state on reload (SIGHUP).")
    doc = STATE | {
        "secret_file": str(workdir / "secret"),
        "redis": {"url": url},
        "watched": [
            STATE["watched"][0],
            {"source": "192.0.2.0/24", "per_source": True},
            {"source": "::/0", "per_source": True},
        ],
        "trusted": ["192.0.2.2"],
        "tripwire": {"tcp": [23], "for": 600},
    }
    state.write_text(yaml.safe_dump(doc))
    daemon.proc.send_signal(signal.SIGHUP)
    say("   mtd run: " + daemon.wait_for("reconcile", origin="manual")["message"])
    for addr in EXTRA:
        lab.sh("unt", f"ip addr add {addr}/24 dev eth0")
    say(f"   {'source':24} {'nmap -sS':14} mtd mapping --source: where each service is for it")
    for addr in EXTRA:
        seen = sorted(nmap_open(lab, "unt", "192.0.2.1", f"-sS -S {addr} -e eth0"))
        told = mtd(lab, state, "mapping", "--source", addr).splitlines()[1:]
        moves = " ".join(
            f"{w[1]}->{w[3]}" for w in (line.split() for line in told) if w[0] == "tcp"
        )
        say(f"   untrusted {addr:14} {','.join(map(str, seen)):14} {moves}")
    seen = sorted(nmap_open(lab, "tru", "192.0.2.1", "-sS"))
    say(f"   trusted   {'192.0.2.2':14} {','.join(map(str, seen))}")
    step(9, "The unlisted 198.51.100.9 sees the real ports until it touches the tripwire:")
    say("   the kernel itself watches it from the next packet on, for 10 minutes.")
    lab.sh("unt", "ip addr add 198.51.100.9/24 dev eth0")
    before = sorted(nmap_open(lab, "unt", "192.0.2.1", "-sS -S 198.51.100.9 -e eth0"))
    lab.run("unt", ["nmap", "-n", "-Pn", "-sS", "-p23", "-S", "198.51.100.9", "-e", "eth0",
                    "192.0.2.1"], timeout=60)  # fmt: skip
    after = sorted(nmap_open(lab, "unt", "192.0.2.1", "-sS -S 198.51.100.9 -e eth0"))
    say(f"   before the trip: {','.join(map(str, before))}   after: {','.join(map(str, after))}")
    say(textwrap.indent(mtd(lab, state, "watch", "list"), "   "))


def run_demo(workdir: Path) -> None:
    state = workdir / "state.yaml"
    os.environ["MTD_STATE_DIR"] = str(workdir)  # mtd's files and caches: never this host's
    say("mtd demo: a lab of network namespaces; nothing on this host is changed.")
    say("   server    192.0.2.1 / 2001:db8::1, listening on tcp 1-5 and udp 53")
    say("   untrusted 192.0.2.3 / 2001:db8::3 (watched; tcp 1 and 2 never move for it)")
    say("   trusted   192.0.2.2 / 2001:db8::2")
    with standard_lab(SERVICES, [53]) as lab:
        redis = RedisServer(workdir / "redis", lab=lab, role="srv", port=free_port()).start()
        say(f"   a private redis-server in the server's namespace ({redis.url})")
        state.write_text(
            yaml.safe_dump(
                STATE | {"secret_file": str(workdir / "secret"), "redis": {"url": redis.url}}
            )
        )
        # The shuffle secret, as an operator provisions it (`mtd apply` and `mtd run` create
        # one when missing; read-only commands such as `mtd diff` never do).
        files.load_secret(workdir / "secret", create=True)
        step(1, "Before mtd: every client sees the real ports.")
        show_views(lab, ("-sS",))
        step(2, "mtd diff previews what mtd would do (exit 2: changes pending):")
        say(textwrap.indent(mtd(lab, state, "diff", "--stat"), "   "))
        step(3, "mtd run starts on the server: it applies the desired state in one transaction,")
        say("   then follows Redis triggers and repairs drift.")
        daemon = MtdRun(lab, "srv", state, "--redis-check", "0.5", log=workdir / "mtd-run.log")
        say("   mtd run: " + daemon.wait_for("reconcile", origin="start")["message"])
        step(4, "The untrusted client finds the services at shuffled ports, in every scan mode;")
        say("   the trusted client still sees the real ones.")
        show_views(lab)
        moved = [p for p in sorted(nmap_open(lab, "unt", "192.0.2.1", "-sS")) if p > 2]
        if moved:
            say(f"   untrusted connects to :{moved[0]} and is answered by: "
                f"{lab.probe('unt', 'tcp', '192.0.2.1', moved[0])!r}")  # fmt: skip
        step(5, "A rotation is published on Redis (mtd rotate --publish): a new epoch, a new")
        say("   shuffle for the untrusted client; the trusted view does not change.")
        say("   " + mtd(lab, state, "rotate", "--publish"))
        ev = daemon.wait_for("reconcile", origin="redis")
        took = f" ({ev['latency'] * 1000:.0f} ms after the publish)" if "latency" in ev else ""
        say(f"   mtd run: {ev['message']}{took}")
        show_views(lab)
        step(6, "Drift: someone deletes mtd's table by hand; mtd run, which follows the kernel's")
        say("   nftables events, restores it at once and names who did it.")
        lab.sh("srv", "nft delete table inet mtd")
        say("   mtd run: " + daemon.wait_for("drift")["message"])
        step(7, "mtd diff and mtd status agree that the host is in sync:")
        say(textwrap.indent(mtd(lab, state, "diff", "--stat"), "   "))
        say("   " + mtd(lab, state, "status"))
        whole_internet(lab, state, daemon, redis.url, workdir)
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(timeout=10)
        redis.stop()
    say()
    say("Lab removed (namespaces, rules, redis-server, mtd run). Next: README.md and docs/.")


def main() -> None:
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the lab is always torn down.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="mtd-demo-") as tmp:
            run_demo(Path(tmp))
    except KeyboardInterrupt:
        say("\ninterrupted: lab removed")
        sys.exit(130)
    except (subprocess.SubprocessError, RuntimeError) as exc:
        sys.exit(f"demo failed: {exc} (lab removed)")
    say(f"({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
