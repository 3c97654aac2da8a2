"""What `mtd run --metrics` exports, what a scrape costs, and the shipped Grafana dashboard and
Prometheus alert rules (contrib/): every metric they name exists, the rules pass `promtool
check rules`, and a real Prometheus (Debian's, on loopback in the daemon's namespace) scrapes
the daemon and evaluates every rule without an error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.lab.netns import Lab, free_port
from tests.conftest import ROOT
from tests.test_daemon import fleet, started
from tests.test_readme import exported_metrics

RULES = ROOT / "contrib" / "prometheus" / "mtd-alerts.yaml"
DASHBOARD = ROOT / "contrib" / "grafana" / "mtd-dashboard.json"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None, reason="needs Debian's prometheus (make deb)"
)
BUILTIN = {"up", "time"}  # Prometheus's own series and functions


def _series() -> set[str]:
    """Every series name a scrape can carry (a histogram's _bucket, _sum and _count)."""
    out = set()
    for name, (kind, _) in exported_metrics().items():
        out |= {name} | (
            {f"{name}_{s}" for s in ("bucket", "sum", "count")} if kind == "histogram" else set()
        )
    return out


def _rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in doc["templating"]["list"]]
    return exprs


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_the_dashboard_and_the_rules_name_exists(source: str):
    exprs = _rule_exprs() if source == "rules" else _dashboard_exprs()
    named = {m for e in exprs for m in re.findall(r"\b(mtd_[a-z0-9_]+)", e)}
    assert named, exprs
    assert not named - _series(), f"{source} name metrics mtd does not export"
    if source == "dashboard":  # the packet counters and the new gauges are all on it
        for name in ("mtd_packets_total", "mtd_in_sync", "mtd_build_info",
                     "mtd_last_success_timestamp_seconds",
                     "mtd_redis_reconnects_total"):  # fmt: skip
            assert name in named, name


@needs_prometheus
def test_promtool_accepts_the_rules():
    out = subprocess.run([PROMTOOL or "promtool", "check", "rules", str(RULES)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rule_exprs())} rules found" in out.stdout


_SCRAPES = """
import sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    urllib.request.urlopen(url).read()
"""


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.netns
@needs_prometheus
def test_a_real_prometheus_scrapes_the_daemon_and_evaluates_every_rule(tmp_path: Path):
    port, prom_port = free_port(), free_port()
    with fleet(tmp_path) as f:
        per_source = [{"source": "0.0.0.0/0", "per_source": True},
                      {"source": "::/0", "per_source": True}]  # fmt: skip
        f.states["srv"] = f.write_state("srv", buckets=64, watched=per_source)
        d = f.start("srv", "--metrics", f"127.0.0.1:{port}")
        d.wait(started)
        url = f"http://127.0.0.1:{port}/metrics"
        # Redis restarts: one reconnect, counted
        mark = d.mark()
        f.redis.stop()
        d.wait(lambda e: e.get("event") == "redis" and e.get("connected") is False, mark)
        f.redis.start()
        d.wait(lambda e: e.get("event") == "redis" and e.get("connected") is True, mark)
        # the CPU one scrape costs the daemon (the table holds 64 buckets' chains and maps)
        n = 200
        before = _cpu_ticks(d.proc.pid)
        out = f.lab.run("srv", [sys.executable, "-c", _SCRAPES, url, str(n)])
        assert out.returncode == 0, out.stderr
        per_scrape = (_cpu_ticks(d.proc.pid) - before) / n / 100  # clock ticks are 10 ms
        assert per_scrape < 0.005, f"{per_scrape * 1000:.1f} ms of CPU per scrape"
        text = _fetch(f.lab, url)
        lines = text.splitlines()
        assert "_created" not in text
        for line in ("mtd_in_sync 1.0", "mtd_redis_reconnects_total 1.0",
                     f'mtd_build_info{{version="{_version()}"}} 1.0'):  # fmt: skip
            assert line in lines, line
        (success,) = [x for x in lines if x.startswith("mtd_last_success_timestamp_seconds ")]
        assert abs(float(success.split()[1]) - time.time()) < 120

        # Prometheus in the same namespace: scrapes every second, loads the shipped rules
        prom = tmp_path / "prom"
        prom.mkdir()
        (prom / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "mtd",
                                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        }))  # fmt: skip
        log = (prom / "out.log").open("wb")
        proc = f.lab.spawn("srv", [
            PROMETHEUS or "prometheus", f"--config.file={prom / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
        ], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            api = f"http://127.0.0.1:{prom_port}/api/v1"

            def get(path: str) -> dict:
                text = _fetch(f.lab, api + path)
                return json.loads(text) if text else {}

            def until(pred: Callable[[], Any], timeout: float = 60) -> Any:
                deadline = time.monotonic() + timeout
                while True:
                    found = pred()
                    if found:
                        return found
                    assert proc.poll() is None, (prom / "out.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, (prom / "out.log").read_text()[-3000:]
                    time.sleep(0.2)

            def rules_evaluated() -> list | None:
                groups = get("/rules").get("data", {}).get("groups", [])
                rules = [r for g in groups for r in g["rules"]]
                done = rules and all(r.get("lastEvaluation", "0001")[:4] != "0001" for r in rules)
                return rules if done else None

            result = until(lambda: get("/query?query=mtd_in_sync").get("data", {}).get("result"))
            assert result[0]["value"][1] == "1"
            rules = until(rules_evaluated)
            assert len(rules) == len(_rule_exprs())
            assert all(r["health"] == "ok" for r in rules), [
                r for r in rules if r["health"] != "ok"
            ]
            firing = [r["name"] for r in rules if r["state"] == "firing"]
            assert firing == [], firing  # a converged daemon fires nothing
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            log.close()


def _fetch(lab: Lab, url: str) -> str:
    """GET inside the namespace; "" when nothing answers yet."""
    code = "import sys, urllib.request as u; print(u.urlopen(sys.argv[1]).read().decode())"
    out = lab.run("srv", [sys.executable, "-c", code, url])
    return out.stdout if out.returncode == 0 else ""


def _version() -> str:
    from reconciler import __version__

    return __version__


@pytest.mark.netns
def test_counters_are_read_by_netlink_as_libnftables_lists_them():
    with Lab(prefix="mtdcn") as lab:
        lab.add_server("srv")
        lab.sh("srv", "; ".join([
            "nft add table inet t", "nft add counter inet t moved_ip packets 42 bytes 9",
            "nft add counter inet t trip_ip6 packets 1099511627776 bytes 1",
            "nft add table inet t2", "nft add counter inet t2 moved_ip packets 7 bytes 1",
            "nft add table ip t", "nft add counter ip t moved_ip packets 5 bytes 1",
        ]))  # fmt: skip
        code = (
            "import json; from reconciler.adapters import monitor, kernel\n"
            "print(json.dumps([monitor.counters('t'), monitor.counters('none'),"
            " kernel.Nft()._cmd('list counters table inet t')[1]]))"
        )
        out = lab.run("srv", [sys.executable, "-c", code], cwd=ROOT)
        assert out.returncode == 0, out.stderr
        ours, missing, listed = json.loads(out.stdout)
        assert ours == {"moved_ip": 42, "trip_ip6": 2**40}  # other tables and families: not ours
        assert missing is None
        by_nft = {o["counter"]["name"]: o["counter"]["packets"]
                  for o in json.loads(listed)["nftables"] if "counter" in o}  # fmt: skip
        assert ours == by_nft
