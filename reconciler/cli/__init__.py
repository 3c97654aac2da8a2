"""The command line: `reconciler.cli.common` holds the root group; each module adds the
commands of one area (host, pull, history, fleet, tools), imported only when one of its
commands runs (`common.COMMAND_MODULES`; `load_commands` registers them all). Errors the user
can fix arrive as `MtdError` and are printed once, one line per problem, with exit code 1."""

from __future__ import annotations

import signal

from reconciler.cli.common import cli, load_commands

__all__ = ["cli", "load_commands", "main"]


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `mtd diff | head` is not an error
    cli(prog_name="mtd")
