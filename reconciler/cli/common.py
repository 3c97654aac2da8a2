"""What every command shares: the root group and its options, the context, `--host`,
and `friendly`, which prints an `MtdError` as its lines with exit code 1."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from reconciler import defaults
from reconciler.adapters import files
from reconciler.core import render
from reconciler.core.state import State
from reconciler.errors import MtdError

EXIT_ERROR = 1
EXIT_PENDING = 2


class Ctx:
    """Options shared by every command."""

    def __init__(self, state_path: str, templates: tuple[str, ...], debug: bool) -> None:
        self.state_path = state_path
        # User directories come first, so a custom template can add to or shadow a shipped one;
        # then a templates/ directory kept with the state files (in the state repository).
        self.user_templates = [Path(t) for t in templates]
        self.templates = (
            self.user_templates + files.state_templates(state_path) + render.template_dirs()
        )
        self.debug = debug
        self.host: str | None = None  # --host: which host of an inventory; None: this machine

    @property
    def hostname(self) -> str:
        return self.host or socket.gethostname()

    def state(self) -> State:
        return files.load_state(self.state_path, self.hostname)

    def nft(self, state: State | None = None, cache_dir: Path | None = None) -> Any:
        """The real kernel backend. Its canonical-form cache is `cache_dir`, or sits next to
        the state's epoch file (by default /var/lib/mtd/cache)."""
        from reconciler.adapters.kernel import Nft

        if cache_dir is None and state is not None:
            cache_dir = Path(state.epoch_file).parent / defaults.CACHE
        return Nft(cache_dir=cache_dir)


pass_ctx = click.make_pass_decorator(Ctx)


def host_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--host NAME`: the host of an inventory (groups/, hosts/) a command is about."""

    def remember(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(Ctx).host = value

    return click.option(
        "--host",
        metavar="NAME",
        expose_value=False,
        callback=remember,
        help="Host of an inventory state (groups/, hosts/); default: this machine's name.",
    )(fn)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print an `MtdError` as its lines and exit 1; anything else as one line too."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MtdError as exc:
            for line in exc.problems:
                click.echo(f"mtd: error: {line}", err=True)
            sys.exit(EXIT_ERROR)
        except PermissionError as exc:
            click.echo(
                f"mtd: error: {exc.filename or ''}: permission denied (run as root)", err=True
            )
            sys.exit(EXIT_ERROR)
        except Exception as exc:
            ctx = click.get_current_context(silent=True)
            if ctx and ctx.find_object(Ctx) and ctx.find_object(Ctx).debug:
                raise
            click.echo(
                f"mtd: internal error: {type(exc).__name__}: {exc} (--debug shows more)", err=True
            )
            sys.exit(EXIT_ERROR)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-s",
    "--state",
    "state_path",
    envvar="MTD_STATE",
    default="desired_state",
    show_default=True,
    help="Desired state: a YAML file or a directory of them.",
)
@click.option(
    "--templates",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Template directory (repeatable); default: the shipped templates.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.version_option(package_name="mtd")
@click.pass_context
def cli(ctx: click.Context, state_path: str, templates: tuple[str, ...], debug: bool) -> None:
    """mtd: hide this host's services from untrusted sources on shifting ports."""
    ctx.obj = Ctx(state_path, templates, debug)


STATE_DIR_OPTION = click.option(
    "--state-dir",
    envvar="MTD_STATE_DIR",
    default=str(defaults.STATE_DIR),
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the pull keeps its clone (repo/) and pull.json.",
)
