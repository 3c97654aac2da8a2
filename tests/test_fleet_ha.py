"""A fleet that survives its Redis failing, converges right after a merge, and reports where
each host stands: real `mtd run` daemons in server namespaces, Redis (a master, a replica,
three Sentinels; or one plain server) in a hub namespace."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from reconciler.lab.netns import HUB_V6, Lab, RedisSentinel, RedisServer, sentinel_url
from tests.conftest import MTD, ROOT, mtd, write_state
from tests.redis_fixtures import needs_redis
from tests.test_daemon import Daemon, is_pass, started
from tests.test_gitops import Remote

pytestmark = [pytest.mark.netns, needs_redis]


@contextlib.contextmanager
def hub_lab(roles: tuple[str, ...]) -> Iterator[Lab]:
    """A hub and servers joined to it: no clients, the daemons only load their tables."""
    lab = Lab()
    try:
        lab.add_hub()
        for i, role in enumerate(roles, 1):
            lab.add_server(role)
            lab.join_hub(role, f"2001:db8:ff::{10 + i}")
        yield lab
    finally:
        lab.close()


def when(ev: dict) -> float:
    """The wall time of a log event (its `time`, ISO 8601 in UTC)."""
    return datetime.fromisoformat(ev["time"].replace("Z", "+00:00")).timestamp()


def test_daemons_follow_a_sentinel_failover_and_lose_no_rotation(tmp_path: Path):
    roles = ("srv", "srv2")
    with hub_lab(roles) as lab:
        redis = [RedisServer(tmp_path / "m", lab=lab, role="hub", host=HUB_V6, port=6379)]
        daemons: list[Daemon] = []
        publisher: subprocess.Popen | None = None
        try:
            master = redis[0].start()
            replica = RedisServer(
                tmp_path / "r", lab=lab, role="hub", host=HUB_V6, port=6380, replica_of=master
            )
            redis.append(replica.start())
            replica.wait_synced()
            for i in range(3):
                s = RedisSentinel(
                    tmp_path / f"s{i}", master, lab=lab, role="hub", host=HUB_V6, port=26379 + i
                )
                redis.append(s.start())
            url = sentinel_url(redis[2:])
            for role in roles:
                (tmp_path / role).mkdir()
                state = write_state(tmp_path / role / "state.yaml", redis={"url": url})
                daemons.append(Daemon(lab, role, state, tmp_path / role / "run.log", []))
            for d in daemons:
                d.wait(started)

            pub_state = write_state(tmp_path / "publisher.yaml", redis={"url": url})
            out = (tmp_path / "published").open("w")
            publisher = lab.spawn(
                "hub",
                [*MTD, "-s", str(pub_state), "trigger", "--every", "0.15", "--count", "30"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
            for d in daemons:
                d.wait(lambda e: is_pass(e) and e["epoch"] >= 3)
            killed = time.time()
            master.stop()  # the master dies mid-stream; the replica gets promoted
            assert publisher.wait(timeout=90) == 0, (tmp_path / "published").read_text()
            lines = (tmp_path / "published").read_text().splitlines()
            acknowledged = [int(line.split()[2]) for line in lines]
            assert len(acknowledged) == 30, lines
            assert all(a < b for a, b in itertools.pairwise(acknowledged)), lines  # never reused
            assert redis[2].master_address() == (HUB_V6, 6380)
            final = int(replica.cli("GET", "mtd:epoch"))
            assert final == acknowledged[-1]  # every acknowledged rotation survived
            for d in daemons:
                d.applied(final)
                changed = [e["epoch"] for e in d.passes() if e["result"] == "changed"]
                assert changed == sorted(set(changed)), changed  # in order, each once
                assert changed[-1] == final and d.epoch_file() == final
                after = [e for e in d.passes() if when(e) > killed and e["epoch"] > 3]
                assert after and when(after[0]) - killed < 20  # bounded by the failover
                follows = [e for e in d.events() if "connected, subscribed" in e.get("message", "")]
                assert len(follows) >= 2  # resubscribed to the new master
                assert d.proc.poll() is None
        finally:
            if publisher is not None and publisher.poll() is None:
                publisher.kill()
            for d in daemons:
                if d.proc.poll() is None:
                    d.proc.kill()
            for r in redis:
                r.stop()


def inventory(tmp_path: Path, url: str, **base: object) -> dict[str, str]:
    """The fleet's repository: desired state only. What each host sets itself (its secret,
    its Redis) is in its own configuration file (`host_config`): a commit may not set it."""
    doc = {
        "ports": {"range": [1, 20], "services": {"tcp": [1, 2, 3, 4, 5], "udp": [53]}},
        "watched": [{"source": "192.0.2.3", "ignore": {"tcp": [1, 2]}}],
    } | base
    files = {"base.yaml": yaml.safe_dump(doc)}
    for host in ("web1", "web2"):
        files[f"hosts/{host}.yaml"] = "{}\n"
    return files


def host_config(tmp_path: Path, host: str, url: str) -> Path:
    path = tmp_path / host / "mtd.yaml"
    config = {
        "secret_file": str(tmp_path / host / "secret"),
        "redis": {"url": url, "heartbeat_ttl": 5},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_merge_reaches_the_fleet_in_seconds_and_fleet_status_tracks_it(tmp_path: Path):
    roles = {"srv": "web1", "srv2": "web2"}
    with hub_lab(tuple(roles)) as lab:
        server = RedisServer(tmp_path / "redis", lab=lab, role="hub", host=HUB_V6)
        daemons: dict[str, Daemon] = {}
        try:
            server.start()
            remote = Remote(tmp_path)
            remote.commit(inventory(tmp_path, server.url))
            ci = write_state(tmp_path / "ci.yaml", redis={"url": server.url})

            def status() -> tuple[int, dict]:
                out = mtd("-s", str(ci), "fleet", "status", "--json", ns=lab, role="hub")
                assert out.returncode in (0, 2), out.stderr
                return out.returncode, json.loads(out.stdout)

            for role, host in roles.items():
                (tmp_path / host).mkdir()
                args = ["--pull", str(remote.bare), "--pull-interval", "300", "--host", host,
                        "--state-dir", str(tmp_path / host / "sd"),
                        "--config", str(host_config(tmp_path, host, server.url)),
                        "--metrics", "127.0.0.1:9108"]  # fmt: skip
                log = tmp_path / host / "run.log"
                daemons[host] = Daemon(lab, role, tmp_path / host / "sd" / "repo", log, args)
            for d in daemons.values():
                d.wait(started)
            deadline = time.monotonic() + 30
            while (rc_doc := status())[0] != 0:  # both report ok once their first pass is done
                assert time.monotonic() < deadline, rc_doc
            assert [h["host"] for h in rc_doc[1]["hosts"]] == ["web1", "web2"]

            more = [{"source": "192.0.2.3", "ignore": {"tcp": [1, 2]}}, {"source": "192.0.2.9"}]
            merged = remote.commit(inventory(tmp_path, server.url, watched=more))
            t0 = time.time()
            out = mtd("-s", str(ci), "pull", "--notify", ns=lab, role="hub")
            assert out.returncode == 0 and "(2 subscribers)" in out.stdout, out.stdout + out.stderr
            for d in daemons.values():
                ev = d.wait(lambda e: e.get("event") == "pull" and e.get("commit") == merged)
                assert ev["result"] == "applied"
                assert when(ev) - t0 < 2.0, f"{d.role}: {when(ev) - t0:.2f} s after the notice"
                metrics = lab.run(
                    d.role,
                    [sys.executable, "-c", "import urllib.request as u;"
                     "print(u.urlopen('http://127.0.0.1:9108/metrics').read().decode())"],
                ).stdout.splitlines()  # fmt: skip
                assert 'mtd_pull_notices_total{outcome="accepted"} 1.0' in metrics
            deadline = time.monotonic() + 30
            while not ((doc := status()[1])["converged"] and all(
                h["commit"] == merged for h in doc["hosts"]
            )):  # fmt: skip
                assert time.monotonic() < deadline, doc

            # web2 stops answering; the fleet moves on without it: behind, then silent.
            stopped = daemons["web2"]
            os.killpg(stopped.proc.pid, signal.SIGSTOP)
            out = mtd("-s", str(ci), "rotate", "--publish", ns=lab, role="hub")
            epoch = int(out.stdout.split()[2])
            daemons["web1"].applied(epoch)
            deadline = time.monotonic() + 30
            seen = []
            while (rc_doc := status())[1]["recap"]["silent"] == 0:
                seen.append([h["status"] for h in rc_doc[1]["hosts"]])
                assert time.monotonic() < deadline, rc_doc
            rc, doc = rc_doc
            assert ["changed", "behind"] in seen or ["ok", "behind"] in seen, seen
            assert rc == 2 and [h["status"] for h in doc["hosts"]][1] == "silent"
            assert doc["recap"]["behind"] == 0 and doc["fleet_epoch"] == epoch
            text = mtd("-s", str(ci), "fleet", "status", ns=lab, role="hub")
            assert text.returncode == 2
            assert text.stdout.splitlines()[-1].startswith("recap: ok=")
            assert "silent=1" in text.stdout.splitlines()[-1]
            secret = (tmp_path / "web1" / "secret").read_bytes().hex()
            assert secret not in text.stdout + json.dumps(doc)
            os.killpg(stopped.proc.pid, signal.SIGCONT)
        finally:
            for d in daemons.values():
                if d.proc.poll() is None:
                    d.proc.kill()
            server.stop()
