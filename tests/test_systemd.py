"""The shipped systemd unit: systemd accepts it, and it keeps the daemon's needs and limits."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "mtd.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_grants_only_what_the_daemon_needs():
    s = settings()
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_SYS_ADMIN"]
    assert s["RestrictNamespaces"] == ["net"]  # the scratch namespace of `unshare --net`
    assert "AF_NETLINK" in s["RestrictAddressFamilies"][0].split()
    assert s["StateDirectory"] == ["mtd"] and s["ProtectSystem"] == ["strict"]
    assert s["ReadWritePaths"][0].split() == [
        "/proc/sys/net/ipv4/fwmark_reflect",
        "/proc/sys/net/ipv6/fwmark_reflect",
    ]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert " run " in s["ExecStart"][0] + " "
    for flag in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables"):
        assert s[flag] == ["yes"], flag


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path):
    mtd = Path(sys.executable).with_name("mtd")
    if not mtd.exists():
        pytest.skip("mtd is not installed in this environment")
    unit = tmp_path / "mtd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mtd", str(mtd)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mtd.service" not in proc.stderr, proc.stderr  # no warning about our unit
