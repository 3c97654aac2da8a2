"""The Jinja2 side of rendering: a sandboxed environment with bounds on what a template may
allocate, and a watchdog on how long it may run (a template may come from a repository,
see docs/security.md).

Imported only when a template has to be rendered: `render` reuses a rendered text kept by
the previous process when it can, and jinja2 is a large part of a short command's start-up.
The bounds themselves (`render.MAX_RENDERED_CHARS`, `render.RENDER_SECONDS`) live in
`render`, which passes them in at each use (an environment is cached per bound).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.nodes
import jinja2.sandbox

from reconciler.core import values

MAX_SIZE_ARG = 1 << 20  # widths and repeat counts: "x" * 10**10 must not allocate first
_SIZED_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_SIZED_FILTERS = ("center", "indent", "wordwrap", "truncate", "batch", "slice")
_HUGE_WIDTH = re.compile(r"\d{7,}")  # a format width of a million characters or more


class _Codegen(jinja2.compiler.CodeGenerator):
    """`a ~ b` through `_Sandbox.concat`, so doubling a string in a loop is bounded too."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.concat_bounded((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja2's sandbox (immutable: no list.append or dict.update, which could double a
    list in a loop), plus bounds on what one operation may allocate: repeating, joining,
    padding, replacing, formatting and powers are checked before or right after they run,
    since a C-level allocation cannot be interrupted by the time limit."""

    code_generator_class = _Codegen
    max_chars = 128 << 20  # set by `environment`: the most one operation may allocate

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        """The context is read-only data: its own objects (element lists, placeholders)
        have no attribute a template may read or call (`add` wrote past every bound)."""
        if isinstance(obj, values.CONTEXT_TYPES):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def concat_bounded(self, parts: Iterable[Any]) -> str:
        texts = [str(p) for p in parts]
        if sum(map(len, texts)) > self.max_chars:
            raise jinja2.sandbox.SecurityError("concatenation too large")
        return "".join(texts)

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _number(left) and _number(right):
            if abs(right) > 64 and abs(left) > 1:
                raise jinja2.sandbox.SecurityError(f"power {left} ** {right} is too large")
        elif operator == "*":
            limit = self.max_chars
            for seq, n in ((left, right), (right, left)):
                if hasattr(seq, "__len__") and _number(n) and len(seq) * n > limit:
                    raise jinja2.sandbox.SecurityError("repetition too large")
        elif operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
            if len(left) + len(right) > self.max_chars:
                raise jinja2.sandbox.SecurityError("concatenation too large")
        elif operator == "%" and isinstance(left, str) and _HUGE_WIDTH.search(left):
            raise jinja2.sandbox.SecurityError("format width too large")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        name, owner = getattr(method, "__name__", ""), getattr(method, "__self__", None)
        if isinstance(owner, str):
            if name in _SIZED_METHODS:
                _check_sizes(name, args, kwargs)
            elif name in ("format", "format_map") and _HUGE_WIDTH.search(owner):
                raise jinja2.sandbox.SecurityError("format width too large")
            elif (
                name == "replace"
                and len(args) > 1
                and isinstance(args[1], str)
                and len(owner) * max(1, len(args[1])) > __self.max_chars
            ):
                raise jinja2.sandbox.SecurityError("replace result too large")
        out = super().call(__context, __obj, *args, **kwargs)
        _check_result(out, __self.max_chars)
        return out


def _check_result(value: Any, limit: int) -> None:
    """After an operation whose size is only known once done (a join): at most twice the
    bound was allocated, and the next doubling is refused."""
    if isinstance(value, str | list | tuple) and len(value) > limit:
        raise jinja2.sandbox.SecurityError("result too large")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_sizes(name: str, args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if _number(value) and abs(value) > MAX_SIZE_ARG:
            raise jinja2.sandbox.SecurityError(
                f"{name}: {value} is too large (at most {MAX_SIZE_ARG})"
            )


def _sized_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)  # keeps the pass_context/pass_environment mark
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_sizes(name, args[1:], kwargs)
        return fn(*args, **kwargs)

    return bounded


def _checked_filter(fn: Callable[..., Any], limit: int) -> Callable[..., Any]:
    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        _check_result(out, limit)
        return out

    return checked


def environment(
    search: Iterable[Path],
    bytecode: Callable[[], jinja2.BytecodeCache] | None = None,
    max_chars: int = _Sandbox.max_chars,
) -> jinja2.Environment:
    """The sandbox for `search`; `bytecode` makes the cache of compiled templates;
    `max_chars` bounds what one operation may allocate."""
    env = _Sandbox(
        loader=_Loader(
            [str(p) for p in search],
            [str(p) for p in search if isinstance(p, values.RepositoryDir)],
        ),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        optimized=False,  # no constant folding: nothing of a template runs while compiling
        bytecode_cache=bytecode() if bytecode is not None else None,
    )
    env.max_chars = max_chars
    for name in _SIZED_FILTERS:
        env.filters[name] = _sized_filter(name, env.filters[name])
    for name in ("join", "replace", "list", "string"):
        env.filters[name] = _checked_filter(env.filters[name], max_chars)
    env.filters["format"] = _format_filter(env.filters["format"])
    # A rendering is a function of its inputs: the diff, the render cache and a pull round's
    # check all rely on the same state rendering the same rules. Jinja2's two sources of
    # chance would let a template change by itself (drift at every pass) and a repository
    # template apply, at a later rotation, rules its round never saw.
    del env.filters["random"]
    del env.globals["lipsum"]
    # Plain compact JSON, with element lists left as placeholders (see `Elements`).
    env.policies["json.dumps_function"] = values.dumps
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":")}
    return env


def _format_filter(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def bounded(value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, str) and _HUGE_WIDTH.search(value):
            raise jinja2.sandbox.SecurityError("format width too large")
        return fn(value, *args, **kwargs)

    return bounded


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise `RenderTimeout` in this thread (any thread, unlike SIGALRM) once `seconds`
    have passed, at the next Python instruction it runs; again every 50 ms until it ends,
    since an exception raised inside a gc callback or a `__del__` is swallowed."""
    target, lock, timers = threading.get_ident(), threading.Lock(), []
    set_async = ctypes.pythonapi.PyThreadState_SetAsyncExc

    def arm(delay: float) -> None:
        timer = threading.Timer(delay, fire)
        timer.daemon = True
        timers[:] = [timer]  # the previous one has fired
        timer.start()

    def fire() -> None:
        with lock:
            if timers:
                set_async(ctypes.c_ulong(target), ctypes.py_object(values.RenderTimeout))
                arm(0.05)

    with lock:
        arm(seconds)
    try:
        yield
    finally:
        while True:  # the timeout may land in here too: retry until the watchdog is off
            try:
                with lock:
                    for timer in timers:
                        timer.cancel()
                    timers.clear()
                    set_async(ctypes.c_ulong(target), None)  # a pending one must not fire later
                break
            except values.RenderTimeout:
                continue


class _Loader(jinja2.FileSystemLoader):
    """Notes every template it reads (name, file, sha256 of the source): a rendered text
    kept across processes is reused only while those files are unchanged."""

    def __init__(self, searchpath: list[str], repository: list[str] | None = None) -> None:
        super().__init__(searchpath)
        # A repository's directory serves what a pull round exports: its top-level files,
        # no dotfile, no sub-folder (the round never saw those; docs/security.md).
        self.host_paths = [p for p in searchpath if p not in (repository or [])]
        self.read: dict[str, tuple[str, str]] = {}
        self.sources: dict[str, str] = {}
        self.missed: set[str] = set()

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        try:
            if len(self.host_paths) < len(self.searchpath) and (
                "/" in template or template.startswith(".")
            ):
                found = jinja2.FileSystemLoader(self.host_paths).get_source(environment, template)
            else:
                found = super().get_source(environment, template)
            source, filename, uptodate = found
        except jinja2.TemplateNotFound:
            self.missed.add(template)  # `include [a, b]`, `ignore missing`: may appear later
            raise
        self.read[template] = (filename, hashlib.sha256(source.encode()).hexdigest())
        self.sources[template] = source
        return source, filename, uptodate


def templates_read(env: jinja2.Environment) -> list[tuple[str, str, str]]:
    """(name, file, sha256) of every template `env` has read so far."""
    loader = env.loader
    read = loader.read if isinstance(loader, _Loader) else {}
    return [(name, filename, digest) for name, (filename, digest) in sorted(read.items())]


def missed_templates(env: jinja2.Environment) -> bool:
    """Whether a template name was looked up and not found: a text rendered so depends on
    a file's absence, which the render cache does not check, so it is not kept."""
    loader = env.loader
    return not isinstance(loader, _Loader) or bool(loader.missed)


def reads_variable(env: jinja2.Environment, name: str) -> bool:
    """Whether a template `env` has read may look up the top-level variable `name`: Jinja's
    own analysis of each source (`meta.find_undeclared_variables`, what its code generator
    resolves from the context), so a name in a comment or a local `set` does not count. A
    template reaches the context only by naming a variable; when in doubt, True."""
    import jinja2.meta

    loader = env.loader
    if not isinstance(loader, _Loader) or not loader.sources:
        return True
    for source in loader.sources.values():
        try:
            if name in jinja2.meta.find_undeclared_variables(env.parse(source)):
                return True
        except jinja2.TemplateSyntaxError:
            return True
    return False
