"""Helpers for tests that run mtd for real inside a lab's server namespace."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from reconciler.adapters import files, watchstore
from reconciler.core import audit, shuffle
from reconciler.lab.netns import Lab
from tests.conftest import mtd


def plant_secret(state_path: Path, fits: Callable[[bytes], bool], what: str) -> None:
    """Write the state's secret file (0600, as mtd makes it) with the first of a fixed list
    of secrets that `fits`: a test that needs a mapping of a given shape (a service drawn
    to its own port, or never) gets it every run, not by chance."""
    state = files.load_state(state_path)
    for i in range(5000):
        secret = hashlib.sha256(b"mtd-test-%d" % i).digest()
        if fits(secret):
            fd = os.open(state.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
            return
    raise AssertionError(f"no secret gives {what}")


def expected_moves(state_path: Path, epoch: int | None = None) -> dict[tuple[str, str], dict]:
    """The mapping mtd applied, recomputed from the state and the secret it created."""
    state = files.load_state(state_path)
    secret = files.load_secret(state.secret_file)
    epoch = files.read_epoch(state.epoch_file) if epoch is None else epoch
    return dict(shuffle.compute(state, secret, epoch).moves)


def seen_moves(
    state_path: Path, source: str, proto: str = "tcp", epoch: int | None = None
) -> dict[int, int]:
    """What `source` should see: its explicit entry's moves, its bucket's (per_source or
    dynamic, from the watch store), or none (trusted, unlisted): `mtd mapping`'s answer."""
    state = files.load_state(state_path)
    secret = files.load_secret(state.secret_file)
    epoch = files.read_epoch(state.epoch_file) if epoch is None else epoch
    dynamic = set(watchstore.load(watchstore.path_for(state.epoch_file)))
    return dict(audit.mapping_of(state, secret, epoch, source, dynamic).moves.get(proto, {}))


def visible(moves: dict[int, int], services: list[int]) -> set[int]:
    """Where an untrusted source finds services: moved ones at their targets, others in place."""
    return {moves.get(p, p) for p in services}


def nft(lab: Lab, script: str) -> str:
    return lab.sh("srv", f"nft {script}")


def table_text(lab: Lab, table: str = "inet mtd") -> str:
    proc = lab.run("srv", ["nft", "list", "table", *table.split()])
    return proc.stdout if proc.returncode == 0 else f"(absent: {proc.stderr.strip()})"


def apply(lab: Lab, state: Path, *args: str, cmd: str = "apply"):
    return mtd("-s", str(state), cmd, *args, ns=lab)
