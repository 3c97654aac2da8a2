"""Timing as an oracle: does a SYN to a real service port (moved away, closed-looking) get
its RST sooner or later than a SYN to an unused port of the range?

    timing.py [--template PATH]... [--syns 4000] [--rounds 20] [--no-ipv6] [--out FILE]

One lab: the server (services 1-5 listening, range 1-20, 16 buckets), an explicit watched
client (192.0.2.3, 2001:db8::3) and a per_source one (192.0.2.4, 2001:db8::4, in 0.0.0.0/0
and ::/0). Each template given (default: the shipped `maps`) is rendered in-process from
its file and loaded with one `json_cmd` (floor.py), the templates alternated round by round
so load on the machine falls on all alike. Each round sends SYNS/ROUNDS SYNs to every
closed port of each source's view, timed by the kernel in the client's namespace
(reconciler/lab/timing.py). Printed: per template, source and family, the median and
interquartile range of each kind, the gap of the medians with a 95% bootstrap interval, and
the SYNs per port a median classifier needs to name exactly the real ports in 99% of
simulated trials (drawn from the measured samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: import from this checkout
    sys.path.insert(0, str(ROOT))

from reconciler.adapters import files, kernel  # noqa: E402
from reconciler.core import bulk, render, shuffle  # noqa: E402
from reconciler.core.values import template_dirs  # noqa: E402
from reconciler.lab.netns import Lab  # noqa: E402
from reconciler.lab.timing import Comparison, spread  # noqa: E402

PY = sys.executable
HERE = Path(__file__).resolve().parent
SERVICES = [1, 2, 3, 4, 5]
RANGE = [1, 20]
CLIENTS = {"explicit": ("192.0.2.3", "2001:db8::3"), "per_source": ("192.0.2.4", "2001:db8::4")}
SHIPPED = ROOT / "templates" / "maps.json.j2"


def state_doc(workdir: Path) -> dict[str, Any]:
    explicit = [{"source": a} for a in CLIENTS["explicit"]]
    per_source = [{"source": "0.0.0.0/0", "per_source": True},
                  {"source": "::/0", "per_source": True}]  # fmt: skip
    return {
        "table": "mtd",
        "secret_file": str(workdir / "secret"),
        "audit_log": str(workdir / "audit.jsonl"),
        "ports": {"range": RANGE, "services": {"tcp": SERVICES}},
        "watched": [*explicit, *per_source],
        "buckets": 16,
    }


def label(template: Path) -> str:
    """A template as a report names it: relative to the checkout when inside it."""
    try:
        return str(template.resolve().relative_to(ROOT))
    except ValueError:
        return str(template)


def icmp_error_drop(command: dict[str, Any]) -> bool:
    """A rule of issue 21's first finding: it matches the ICMP or ICMPv6 type (the error
    types) and drops. No rule before that issue matched an ICMP type."""
    rule = command.get("add", {}).get("rule")
    if not rule:
        return False
    exprs = rule.get("expr", [])
    typed = any(
        e.get("match", {}).get("left", {}).get("payload", {}).get("field") == "type"
        and e["match"]["left"]["payload"].get("protocol") in ("icmp", "icmpv6")
        for e in exprs
    )
    return typed and any("drop" in e for e in exprs)


def ruleset(
    state: Any, mapping: Any, template: Path, out: Path, strip_icmp: bool = False
) -> tuple[Path, int]:
    """The batch mtd would send (create, delete, the rendered table) for `template` (a file
    whose name is NAME.json.j2; found before the shipped ones, which it may import), written
    for floor.py; `strip_icmp`: without issue 21's ICMP-error drops. And its rule count."""
    name = template.name.removesuffix(".json.j2")
    search = [template.resolve().parent, *template_dirs()]
    commands = render.render(dataclasses.replace(state, template=name), mapping, search)
    if strip_icmp:
        commands = [c for c in commands if not icmp_error_drop(c)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(bulk.dumps({"nftables": kernel.replace_batch(state.table, commands)}))
    return out, sum("rule" in c.get("add", {}) for c in commands)


def load(lab: Lab, doc: Path) -> None:
    proc = lab.run("srv", [PY, str(HERE / "floor.py"), "apply", str(doc)], timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"floor.py apply {doc}: {proc.stderr.strip()[-500:]}")


def closed(view: dict[int, int]) -> tuple[list[int], list[int]]:
    """(real service ports, unused ports of the range) a source finds closed."""
    shut = [p for p in range(RANGE[0], RANGE[1] + 1) if p not in set(view.values())]
    return [p for p in shut if p in SERVICES], [p for p in shut if p not in SERVICES]


def syns(lab: Lab, role: str, v: int, dst: str, ports: list[int], n: int) -> dict[int, list[int]]:
    host = lab.hosts[role]
    request = {"iface": "eth0", "v": v, "src": host.v4 if v == 4 else host.v6, "dst": dst,
               "ports": ports, "syns": n}  # fmt: skip
    proc = lab.run(role, [PY, "-m", "reconciler.lab.timing"], input=json.dumps(request),
                   cwd=ROOT, timeout=120 + n * len(ports))  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"timing sampler: {proc.stderr.strip()[-500:]}")
    return {int(p): s for p, s in json.loads(proc.stdout).items()}


@dataclasses.dataclass
class Row:
    template: str
    source: str
    v: int
    real: list[int]
    unused: list[int]
    result: Comparison


def measure(templates: list[Path], n: int, rounds: int, families: tuple[int, ...]) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="mtd-timing-") as tmp, Lab(prefix="mtdt") as lab:
        work = Path(tmp)
        path = work / "state.yaml"
        path.write_text(json.dumps(state_doc(work)))
        state = files.load_state(path)
        mapping = shuffle.compute(state, files.load_secret(state.secret_file, create=True), 0)
        docs = [ruleset(state, mapping, t, work / f"t{i}.json")[0] for i, t in enumerate(templates)]
        lab.add_server()
        for role, (v4, v6) in zip(("unt", "ps"), CLIENTS.values(), strict=True):
            lab.add_client(role, v4, v6)
        lab.serve("srv", SERVICES, [])
        views = {}
        for source, role in zip(CLIENTS, ("unt", "ps"), strict=True):
            for v in families:
                addr = CLIENTS[source][v == 6]
                if source == "explicit":
                    view = dict(mapping.moves[(addr, "tcp")])
                else:
                    view = dict(mapping.bucket_of(addr)["tcp"])
                real, unused = closed(view)
                if real and unused:  # a view with no real port closed has nothing to tell
                    views[(source, v)] = (role, (real, unused))
                else:
                    print(f"timing: {source} v{v}: no real or no unused port closed: {view}",
                          file=sys.stderr)  # fmt: skip
        got: dict[tuple[int, str, int], dict[int, list[int]]] = {}
        per_round = max(1, n // rounds)
        for r in range(rounds):
            order = list(enumerate(docs))  # ABBA...: no template always goes first
            for i, doc in order if r % 2 == 0 else order[::-1]:
                print(f"timing: round {r + 1}/{rounds}, {templates[i]}", file=sys.stderr)
                load(lab, doc)
                for (source, v), (role, (real, unused)) in views.items():
                    dst = lab.server.v4 if v == 4 else lab.server.v6
                    for port, s in syns(lab, role, v, dst, real + unused, per_round).items():
                        got.setdefault((i, source, v), {}).setdefault(port, []).extend(s)
        rows = []
        for (i, source, v), by_port in got.items():
            real, unused = views[(source, v)][1]
            result = Comparison.of(real, by_port, per_round * rounds)
            rows.append(Row(label(templates[i]), source, v, real, unused, result))
        return rows


def us(x: float) -> str:
    return f"{x:.2f} µs"


def table(rows: list[Row]) -> list[str]:
    out = [
        "| template | source | IP | real ports: median (IQR) | unused: median (IQR) | "
        "unused - real (95% CI) | SYNs per port for 99% | SYNs lost |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        c = row.result
        g, lo, hi = c.gap
        need = f"{c.syns:,}" if c.syns is not None else f"> {c.measured:,}"
        out.append(
            f"| {row.template} | {row.source} | v{row.v} | "
            f"{us(statistics.median(c.real))} ({us(spread(c.real))}) | "
            f"{us(statistics.median(c.unused))} ({us(spread(c.unused))}) | "
            f"{g:+.2f} ({lo:+.2f} to {hi:+.2f}) µs | {need} | {c.lost} |"
        )
    return out


CLASSIFIER = (
    "SYNs per port: the fewest with which taking the ports of lowest (or highest, as the "
    "full samples say) median names exactly the real ones in 99% of 400 trials simulated "
    "from the measured samples."
)


def ports_text(rows: list[Row]) -> str:
    ports = {(r.source, r.v): (r.real, r.unused) for r in rows}
    return "; ".join(f"{s} v{v}: {r}, {u}" for (s, v), (r, u) in ports.items())


def report(rows: list[Row], n: int, rounds: int, took: float) -> str:
    lines = [
        f"SYN to RST, kernel timestamps in the client's namespace; {n:,} SYNs per closed "
        f"port in {rounds} rounds, templates alternated; {os.cpu_count()} CPUs, "
        f"{took / 60:.1f} min. Closed ports per view (real; unused): {ports_text(rows)}. "
        + CLASSIFIER,
        "",
        *table(rows),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = "a NAME.json.j2 file; repeat to alternate (default: the shipped maps)"
    parser.add_argument("--template", type=Path, action="append", help=what)
    parser.add_argument("--syns", type=int, default=4000, help="SYNs per closed port")
    parser.add_argument("--rounds", type=int, default=20, help="alternations of the templates")
    parser.add_argument("--no-ipv6", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("timing: needs root (it creates network namespaces)")
    templates = args.template or [SHIPPED]
    for t in templates:
        if not t.name.endswith(".json.j2") or not t.is_file():
            sys.exit(f"timing: --template {t}: expected a NAME.json.j2 file")
    start = time.perf_counter()
    rows = measure(templates, args.syns, args.rounds, (4,) if args.no_ipv6 else (4, 6))
    text = report(rows, args.syns, args.rounds, time.perf_counter() - start)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
