"""`make demo`: the whole product in a sandboxed lab of network namespaces.

Nothing on the host changes: the lab's namespaces hold every rule, sysctl and process, the
desired state and secret live in a temporary directory, and everything is removed at the end,
on Ctrl-C and on failure too.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

from reconciler.lab import Lab, nmap_open, standard_lab

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


def run_demo(workdir: Path) -> None:
    state = workdir / "state.yaml"
    state.write_text(yaml.safe_dump(STATE | {"secret_file": str(workdir / "secret")}))
    say("mtd demo: a lab of network namespaces; nothing on this host is changed.")
    say("   server    192.0.2.1 / 2001:db8::1, listening on tcp 1-5 and udp 53")
    say("   untrusted 192.0.2.3 / 2001:db8::3 (watched; tcp 1 and 2 never move for it)")
    say("   trusted   192.0.2.2 / 2001:db8::2")
    with standard_lab(SERVICES, [53]) as lab:
        step(1, "Before mtd: every client sees the real ports.")
        show_views(lab, ("-sS",))
        step(2, "mtd diff previews the change (exit 2: changes pending):")
        say(textwrap.indent(mtd(lab, state, "diff", "--stat"), "   "))
        step(3, "mtd apply replaces mtd's own table in one transaction:")
        say("   " + mtd(lab, state, "apply"))
        say("   " + mtd(lab, state, "apply") + "   <- a second apply has nothing to do")
        step(4, "The untrusted client finds the services at shuffled ports, in every scan mode;")
        say("   the trusted client still sees the real ones.")
        show_views(lab)
        moved = [int(p) for p in sorted(nmap_open(lab, "unt", "192.0.2.1", "-sS")) if p > 2]
        if moved:
            say(
                f"   untrusted connects to :{moved[0]} and is answered by: "
                f"{lab.probe('unt', 'tcp', '192.0.2.1', moved[0])!r}"
            )
        step(5, "mtd rotate starts a new epoch: a new shuffle, applied atomically.")
        say("   " + mtd(lab, state, "rotate"))
        show_views(lab)
        step(6, "Drift: someone deletes mtd's table; mtd diff sees it, mtd apply repairs it.")
        lab.sh("srv", "nft delete table inet mtd")
        say(textwrap.indent(mtd(lab, state, "diff", "--stat"), "   "))
        say("   " + mtd(lab, state, "apply"))
        say("   " + mtd(lab, state, "status"))
    say()
    say("Lab removed. Next: README.md (make test, the desired state, mtd run with Redis).")


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
