"""A real CrowdSec Local API for tests: `crowdsec -no-cs` (the LAPI alone) with its own
config, database and credentials in a temp dir, on loopback inside a lab namespace. The
package's own database and credentials are never touched; the process is always stopped.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from reconciler.lab.netns import Lab

CROWDSEC, CSCLI = shutil.which("crowdsec"), shutil.which("cscli")
PACKAGE_CONFIG = Path("/etc/crowdsec/config.yaml")
needs_crowdsec = pytest.mark.skipif(
    CROWDSEC is None or CSCLI is None or not PACKAGE_CONFIG.exists(),
    reason="needs Debian's crowdsec (make deb)",
)


# Exits 0 once the Local API answers at all (401 without a key).
_PROBE = """import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1] + "/v1/decisions", timeout=2)
except urllib.error.HTTPError:
    pass
except OSError:
    sys.exit(1)
"""


class Lapi:
    """`crowdsec -no-cs` in `role`'s namespace, listening on 127.0.0.1:`port`."""

    def __init__(self, lab: Lab, role: str, workdir: Path, port: int = 8080) -> None:
        self.lab, self.role, self.dir, self.port = lab, role, workdir, port
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "config.yaml"
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "crowdsec.out"
        cfg = yaml.safe_load(PACKAGE_CONFIG.read_text())
        cfg["common"] |= {"daemonize": False, "log_media": "stdout", "log_dir": str(self.dir)}
        cfg["config_paths"]["data_dir"] = str(self.dir)
        cfg["db_config"] |= {"db_path": str(self.dir / "crowdsec.db"), "use_wal": False}
        creds = self.dir / "local_api_credentials.yaml"
        cfg["api"]["client"]["credentials_path"] = str(creds)
        server = cfg["api"]["server"]
        server["listen_uri"] = f"127.0.0.1:{port}"
        online = self.dir / "online_api_credentials.yaml"
        online.write_text("# offline: no Central API\n")
        server["online_client"] = {"credentials_path": str(online)}
        cfg["prometheus"] = {"enabled": False}
        self.config.write_text(yaml.safe_dump(cfg))
        # A machine (cscli's own login to the LAPI, for `decisions add`), made in the database.
        self.cscli("machines", "add", "mtdtest", "--auto", "-f", str(creds))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cscli(self, *args: str) -> str:
        out = self.lab.run(self.role, [CSCLI or "cscli", "-c", str(self.config), *args])
        if out.returncode != 0:
            raise AssertionError(f"cscli {' '.join(args)}: {out.stderr or out.stdout}")
        return out.stdout

    def bouncer_key(self, path: Path, name: str = "mtd") -> Path:
        key = self.cscli("bouncers", "add", name, "-o", "raw").strip()
        path.touch(mode=0o600)
        path.write_text(key + "\n")
        return path

    def start(self, timeout: float = 30) -> Lapi:
        with self.log.open("ab") as out:
            self.proc = self.lab.spawn(
                self.role,
                [CROWDSEC or "crowdsec", "-c", str(self.config), "-no-cs"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:  # up when it answers (401 without a key)
            probe = self.lab.run(self.role, [sys.executable, "-c", _PROBE, self.url])
            if probe.returncode == 0:
                return self
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def lapi(lab: Lab, role: str, workdir: Path, port: int = 8080) -> Iterator[Lapi]:
    server = Lapi(lab, role, workdir, port)
    try:
        yield server.start()
    finally:
        server.stop()
