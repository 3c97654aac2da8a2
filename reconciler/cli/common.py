"""What every command shares: the root group and its options, the context, `--host`,
and `friendly`, which prints an `MtdError` as its lines with exit code 1."""

from __future__ import annotations

import atexit
import os
import socket
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from reconciler.adapters import cachedir, files
from reconciler.core import caches, render
from reconciler.core.state import STATE_DIR, Local, State
from reconciler.errors import MtdError

EXIT_ERROR = 1
EXIT_PENDING = 2
EXIT_AUDIT_FAILED = 3  # apply/rotate: the table changed, its audit line could not be written


# The state without -s or $MTD_STATE: the repository's example when run from a checkout,
# else where `make install` and the systemd unit put it.
DEFAULT_STATE = "desired_state"
INSTALLED_STATE = "/etc/mtd"


def default_state() -> str:
    return DEFAULT_STATE if Path(DEFAULT_STATE).exists() else INSTALLED_STATE


def command_name() -> str:
    """`mtd watch add` as typed (whatever the program was called: mtd, python -m ...)."""
    names: list[str] = []
    ctx = click.get_current_context(silent=True)
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["mtd", *reversed(names)])


class Ctx:
    """Options shared by every command, whether given before or after the command's name."""

    def __init__(
        self, state_path: str = DEFAULT_STATE, templates: tuple[str, ...] = (), debug: bool = False
    ) -> None:
        self.state_path = state_path
        self.default_state = False  # no -s or $MTD_STATE: an error says where we looked
        self.user_templates = [Path(t) for t in templates]
        self.debug = debug
        self.host: str | None = None  # --host: which host of an inventory; None: this machine
        self._templates: list[Path] | None = None  # set once the state comes from a pull
        self.config: str | None = None  # --config; None: the default file, if present
        self.state_dir = STATE_DIR  # --state-dir: mtd's own files, the pull's clone
        self.untrusted = False  # True when the state path is a repository's (mtd run --pull)
        self.warned: set[str] = set()  # warnings about the state already printed

    @property
    def templates(self) -> list[Path]:
        """User directories first, so a custom template can add to or shadow a shipped one;
        then a templates/ directory kept with the state files: a repository's
        (docs/security.md) when the state is one (`--repository`), and for the pull's clone, the
        templates its round validated, never the clone's own folder."""
        if self._templates is not None:
            return self._templates
        kept = files.state_templates(self.state_path)
        if self.in_clone:
            kept = [files.kept_templates(self.state_dir)]
        if self.untrusted or self.in_clone:
            kept = [render.RepositoryDir(d) for d in kept]
        return self.user_templates + kept + render.template_dirs()

    @property
    def in_clone(self) -> bool:
        """Whether the state path is inside the pull's clone (`-s /var/lib/mtd/repo/mtd`):
        what commits wrote, as untrusted as a pull round's."""
        clone = (Path(self.state_dir) / "repo").resolve()
        try:
            return Path(self.state_path).resolve().is_relative_to(clone)
        except (OSError, RuntimeError):
            return False

    @templates.setter
    def templates(self, dirs: list[Path]) -> None:
        self._templates = dirs

    @property
    def hostname(self) -> str:
        return self.host or socket.gethostname()

    def local(self, *, untrusted: bool | None = None) -> Local:
        """The host's own settings: its configuration file and state directory."""
        return Local(
            documents=files.local_config(self.config),
            state_dir=self.state_dir,
            untrusted=(self.untrusted or self.in_clone) if untrusted is None else untrusted,
            forbidden=(str(Path(self.state_dir) / "repo"),),
        )

    def state(self) -> State:
        if self.default_state and not Path(self.state_path).exists():
            raise MtdError(
                f"no desired state: looked for ./{DEFAULT_STATE} and {INSTALLED_STATE}: expected "
                f"-s PATH, $MTD_STATE, or the state in {INSTALLED_STATE} (make install)"
            )
        kept = self.caches()
        state = files.load_state(self.state_path, self.hostname, self.local(), self.config, kept)
        self.warn(state)
        return state

    @property
    def cache_dir(self) -> Path:
        """Where the caches are: what the host chose (`--state-dir`), never a document."""
        return cachedir.directory(self.state_dir)

    def caches(self, *, write: bool = False, rendered: bool = False) -> caches.Caches:
        """The caches `MTD_CACHE` leaves on, in `cache_dir`; read-only commands (`write`
        False) read them, never add. `rendered`: rendered texts too (one command's pass;
        the daemon renders each epoch once and keeps Jinja2 loaded)."""
        use = caches.chosen(os.environ.get(caches.ENV))
        return cachedir.open_caches(
            self.cache_dir, write=write, use=use if rendered else use - {"rendered"}
        )

    def warn(self, state: State, prefix: str = "") -> None:
        """What the state declares that cannot work (`advice.warnings`), once a process, on
        stderr: the command goes on."""
        from reconciler.core.advice import warnings

        for line in warnings(state):
            if prefix + line not in self.warned:
                self.warned.add(prefix + line)
                click.echo(f"mtd: warning: {prefix}{self.state_path}: {line}", err=True)

    def need_nftables(self) -> None:
        """One line, before any file is made or libnftables is called, when this process
        may not use nftables (not root, or root without CAP_NET_ADMIN)."""
        from reconciler.adapters import privilege

        privilege.require(command_name())

    def kernel_cache(self, *, write: bool) -> cachedir.KernelCache:
        """The kernel backend's caches (`canonical`, `committed`) `MTD_CACHE` leaves on."""
        use = caches.chosen(os.environ.get(caches.ENV))
        return cachedir.KernelCache(self.cache_dir, write=write, use=use)

    def nft(self, state: State | None = None, *, write: bool = True, one_shot: bool = True) -> Any:
        """The real kernel backend, wrapped with its caches (the kernel's canonical form,
        the last commit) in `cache_dir`; read-only commands (`write=False`) read them, never
        add. A command that writes also keeps `state` as parsed and accepted by the schema,
        for the next one. `one_shot`: the process ends with the command (`Nft.abandon` at
        exit)."""
        from reconciler.adapters.caching import CachingBackend
        from reconciler.adapters.kernel import Nft

        self.need_nftables()
        if write and state is not None:  # creates the directory 0700 if need be
            kept = self.caches(write=True)
            kept.verdicts.add(state.schema_key)
            kept.parsed.put(state.parsed_key, state.parsed_json)
        nft = Nft()
        if one_shot:
            atexit.register(nft.abandon)
        return CachingBackend(nft, self.kernel_cache(write=write))


pass_ctx = click.make_pass_decorator(Ctx)


def examples(*lines: str) -> str:
    """A `--help` epilog of command lines kept as typed (click's \\b stops the rewrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


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


def _on_command_line(ctx: click.Context, param: click.Parameter) -> bool:
    """The root group takes every source (command line, $MTD_STATE, default); a command only
    what was typed after its name, so `mtd -s A apply` keeps A."""
    return ctx.parent is None or ctx.get_parameter_source(param.name or "") in (
        ParameterSource.COMMANDLINE,
    )


def _set_state(ctx: click.Context, param: click.Parameter, value: str) -> None:
    if _on_command_line(ctx, param):
        obj = ctx.ensure_object(Ctx)
        obj.state_path = value
        obj.default_state = ctx.get_parameter_source(param.name or "") is ParameterSource.DEFAULT


def _add_templates(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    if _on_command_line(ctx, param):
        ctx.ensure_object(Ctx).user_templates += [Path(t) for t in value]


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and _on_command_line(ctx, param):
        ctx.ensure_object(Ctx).debug = True


def _set_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None and _on_command_line(ctx, param):
        ctx.ensure_object(Ctx).config = value


def _set_state_dir(ctx: click.Context, param: click.Parameter, value: str) -> None:
    if _on_command_line(ctx, param):
        ctx.ensure_object(Ctx).state_dir = value


_SHARED_OPTIONS = [
    click.option(
        "-s",
        "--state",
        "state_path",
        envvar="MTD_STATE",
        default=default_state,
        show_default=f"./{DEFAULT_STATE} if it exists, else {INSTALLED_STATE}",
        show_envvar=True,
        metavar="PATH",
        expose_value=False,
        callback=_set_state,
        help="Desired state: a YAML file or a directory of them.",
    ),
    click.option(
        "--templates",
        multiple=True,
        type=click.Path(file_okay=False),
        metavar="DIR",
        expose_value=False,
        callback=_add_templates,
        help="Template directory, searched before the shipped ones (repeatable).",
    ),
    click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        callback=_set_debug,
        help="Show tracebacks of internal errors.",
    ),
    click.option(
        "--config",
        envvar="MTD_CONFIG",
        show_envvar=True,
        metavar="FILE",
        type=click.Path(dir_okay=False),
        expose_value=False,
        callback=_set_config,
        help="The host's local configuration: host-local keys only (docs/security.md)."
        "  [default: /etc/mtd/mtd.yaml when present]",
    ),
    click.option(
        "--state-dir",
        envvar="MTD_STATE_DIR",
        default=STATE_DIR,
        show_default=True,
        show_envvar=True,
        metavar="DIR",
        type=click.Path(file_okay=False),
        expose_value=False,
        callback=_set_state_dir,
        help="mtd's own files: secret, epoch, audit log (unless the configuration names "
        "them), the pull's clone (repo/), pull.json and the caches (cache/; $MTD_CACHE).",
    ),
]


def state_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`-s/--state`, `--templates` and `--debug`, accepted before the command's name (`mtd -s
    FILE apply`) and after it (`mtd apply -s FILE`): one declaration for the group and every
    command that reads a desired state."""
    for option in reversed(_SHARED_OPTIONS):
        fn = option(fn)
    return fn


def template_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--templates`, `--debug`, `--config`, `--state-dir`: for commands whose state comes
    from elsewhere (a repository)."""
    for option in reversed(_SHARED_OPTIONS[1:]):
        fn = option(fn)
    return fn


# Which module declares each command of the root group. `mtd apply` imports only
# `host`, not the daemon, the pull, git, Redis or the audit history: a short command's
# start-up is mostly imports.
COMMAND_MODULES = {
    **dict.fromkeys(
        ("validate", "render", "diff", "apply", "rotate", "status", "down", "confirm"), "host"
    ),
    **dict.fromkeys(("run", "trigger"), "fleet"),
    "fleet": "fleet_status",
    "pull": "pull",
    "history": "history",
    "mapping": "mapping",
    "watch": "watch",
    **dict.fromkeys(("schema", "import-seed"), "tools"),
}


def load_commands() -> None:
    """Register every command (for `--help`, completion and the tests of the whole CLI)."""
    for module in sorted(set(COMMAND_MODULES.values())):
        __import__(f"reconciler.cli.{module}")


class LazyGroup(click.Group):
    """The root group: a command's module is imported when that command is looked up."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMAND_MODULES.get(cmd_name)
        if cmd_name not in self.commands and module is not None:
            __import__(f"reconciler.cli.{module}")
        elif module is None:  # a typo: click suggests from every registered command
            load_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        load_commands()
        return super().list_commands(ctx)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "mtd diff -s desired_state/          # or: mtd -s desired_state/ diff",
        "MTD_STATE=/etc/mtd mtd apply --diff",
        "mtd COMMAND --help",
    ),
)
@state_options
@click.version_option(package_name="mtd")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """mtd: hide this host's services from untrusted sources on shifting ports."""
    ctx.ensure_object(Ctx)
