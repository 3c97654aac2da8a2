"""Count the calls between the package's modules on the desired state's path from the
command line to the reconcile pass, and those that go back up a layer (a lower layer calling
a function of a higher one: a callback, a cache set from above).

    unshare --net python -m tests.callpath        # root: an empty namespace, `mtd diff`

It runs `mtd diff -s STATE` in this process on a fresh state directory, records every call
from one module of `reconciler` to another between the command's start and the moment
`services.reconcile.reconcile` is entered, and prints the counts."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

LAYERS = ("core", "adapters", "services", "cli")


def rank(module: str) -> int:
    """-1 for the shared modules (`errors`, `defaults`, `logs`), else the layer's index."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def trace(argv: list[str]) -> list[tuple[str, str, str]]:
    """(caller module, callee module, callee function) for each call across modules."""
    from click.testing import CliRunner

    from reconciler.cli.common import cli, load_commands

    load_commands()
    calls: list[tuple[str, str, str]] = []
    done = False

    def profile(frame: Any, what: str, arg: Any) -> None:
        nonlocal done
        if what != "call" or done or frame.f_back is None:
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "")
        if callee == "reconciler.services.reconcile" and frame.f_code.co_name == "reconcile":
            done = True
            sys.setprofile(None)  # the pass itself is not the path to it
        if (
            callee != caller
            and callee.startswith("reconciler.")
            and caller.startswith("reconciler.")
        ):
            calls.append((caller, callee, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        result = CliRunner().invoke(cli, argv)
    finally:
        sys.setprofile(None)
    if not done:
        raise SystemExit(f"the pass was not reached: {result.output}{result.exception!r}")
    return calls


def main() -> None:
    from tests.conftest import write_state

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        state = write_state(
            base / "state.yaml", epoch_file=str(base / "epoch"), audit_log=str(base / "audit")
        )
        calls = trace(["diff", "-s", str(state)])
    up = [c for c in calls if rank(c[1]) > rank(c[0])]
    files = [c for c in calls if c[1] == "reconciler.adapters.files"]
    for caller, callee, name in up:
        print(f"up: {caller} -> {callee}.{name}")
    print(
        f"{len(calls)} calls between modules, {len(up)} back up a layer, files entered "
        f"{len(files)} times"
    )


if __name__ == "__main__":
    main()
