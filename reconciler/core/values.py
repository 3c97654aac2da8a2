"""What a template sees, apart from how it is rendered: the context's own value types (element
lists and placeholders, which no template attribute can reach), `| tojson`, and where
templates come from. Shared by `render` and `sandbox`, so neither imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PosixPath
from typing import Any

from reconciler.core import shuffle
from reconciler.core.diff import elem_text

_TOKEN = "\0mtd:"  # no template writes a NUL: placeholders cannot be mistaken for data
_TOKEN_JSON = json.dumps(_TOKEN)[1:-1]


def template_dirs() -> list[Path]:
    """Shipped templates: inside the package when installed, `templates/` in a checkout."""
    package = Path(__file__).resolve().parent.parent
    return [d for d in (package / "templates", package.parent / "templates") if d.is_dir()]


class RepositoryDir(PosixPath):
    """A template directory whose files came from the state repository (docs/security.md):
    read only when the host's configuration allows it (`repository_templates`), and what
    is rendered through a search path holding one gets the allow-list check
    (`core.templates.REPOSITORY`). Never equal to a plain path: environments are cached by
    their search path, and a repository's directory is searched with fewer names."""

    def __eq__(self, other: object) -> bool:
        return type(other) is RepositoryDir and super().__eq__(other)

    def __hash__(self) -> int:
        return hash(("repository", str(self)))


def repository_templates(search: Iterable[Path]) -> list[str]:
    """The template files of the repository directories in `search`, by name."""
    found = []
    for d in search:
        if isinstance(d, RepositoryDir) and d.is_dir():
            found += sorted(str(f) for f in d.iterdir())
    return found


class Elements(Sequence[Any]):
    """A map's elements `[{"concat": [key, port]}, port]`, kept as one row per source.

    A million elements are never a million Python objects: templates may iterate or index
    it like a list (elements are built as they are read), `| tojson` writes a placeholder
    that `render` swaps for this object after parsing, `json_text` writes the JSON array by
    string formatting (`bulk.dumps` uses it), and `rows` gives the diff (key, port, port)
    without building each element. `read` says whether anything looked at the elements
    themselves or their number (whether there are any aside): a text rendered without that
    holds no mapping.
    Each row keeps the shuffle's own moves (real -> shown); the map holds their permutation
    (`shuffle.inbound`: shown -> real), or its inverse when `outbound`.
    """

    def __init__(self, name: str, outbound: bool = False) -> None:
        self.token = _TOKEN + name
        self.outbound = outbound
        self._rows: list[tuple[Any, str, Mapping[int, int]]] = []  # key, key as JSON, moves
        self._len = 0
        self._list: list[Any] | None = None
        self.read = False
        self.written = 0  # times spliced into the document

    def __repr__(self) -> str:  # the same for the same state: part of the render cache key
        return f"Elements({self.token!r}, {bool(self._len)})"

    def add(self, key: Any, moves: Mapping[int, int]) -> None:
        self._rows.append((key, json.dumps(key, separators=(",", ":")), moves))
        self._len += shuffle.size(moves)

    def ports(self, moves: Mapping[int, int]) -> Mapping[int, int]:
        """One row's map: port -> port, in this map's direction."""
        return shuffle.outbound(moves) if self.outbound else shuffle.inbound(moves)

    def rows(self) -> Iterator[tuple[Any, int, int]]:
        self.read = True
        for key, _, moves in self._rows:
            for port, to in self.ports(moves).items():
                yield key, port, to

    def moves_by_key(self) -> Iterator[tuple[str, Mapping[int, int]]]:
        """(key as the diff writes it, the shuffle's moves) per row: what an element repair
        looks up (`core.elements.Desired`, through `ports`), without an entry per element."""
        for key, _, moves in self._rows:
            yield elem_text(key), moves

    def __iter__(self) -> Iterator[Any]:
        for key, port, to in self.rows():
            yield ({"concat": (key, port)}, to)

    def __len__(self) -> int:
        # A permutation's size depends on the draw (how many targets are services): a text
        # that used it holds a piece of the mapping, so it is not kept. `{% if %}` is not that.
        self.read = True
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __getitem__(self, i: Any) -> Any:
        self.read = True
        if self._list is None:
            self._list = list(self)
        return self._list[i]

    def same(self, other: object) -> bool:
        """The same elements as `other` (another rendering), compared row by row."""
        if not isinstance(other, Elements):
            return False
        return [r[1:] for r in self._rows] == [r[1:] for r in other._rows]

    def json_text(self) -> str:
        self.read = True
        parts = [
            f'[{{"concat":[{key},{port:d}]}},{to:d}]'
            for _, key, moves in self._rows
            for port, to in self.ports(moves).items()
        ]
        return f"[{','.join(parts)}]"


class Hidden(Sequence[Any]):
    """A value that a template writes as a placeholder: a small secret-derived one (a
    bucket's map elements, the jhash seed), or the dynamic entries with the seconds they
    have left. `{{ seed }}` and `| tojson` write its token, which `render` swaps for the
    value after parsing, so a kept text (the render cache) never holds it and its cache key
    never depends on it (only on whether it is empty). Anything else a template does with it
    (iterate, index, compare) reads the value and marks it `read`: such a text is not kept."""

    def __init__(self, name: str, value: Any) -> None:
        self.token = _TOKEN + name
        self._value = value
        self.read = False
        self.written = 0

    @property
    def value(self) -> Any:
        self.read = True
        return self._value

    def __repr__(self) -> str:  # the same whatever the secret: part of the render cache key
        n = bool(self._value) if isinstance(self._value, list) else None
        return f"Hidden({self.token!r}, {n})"

    def __str__(self) -> str:  # `{{ seed }}`: the placeholder, as a JSON string
        return json.dumps(self.token)

    def __len__(self) -> int:  # `| length`: a bucket map's size depends on the draw
        if isinstance(self._value, list):
            self.read = True
            return len(self._value)
        return 1

    def __bool__(self) -> bool:
        return bool(self._value) if isinstance(self._value, list) else True

    def __getitem__(self, i: Any) -> Any:
        return self.value[i] if isinstance(self._value, list) else self.value

    def __iter__(self) -> Iterator[Any]:
        return iter(self.value if isinstance(self._value, list) else [self.value])

    def __int__(self) -> int:
        return int(self.value)

    def __eq__(self, other: object) -> bool:
        return self.value == (other.value if isinstance(other, Hidden) else other)

    __hash__ = None  # type: ignore[assignment]


class Opaque:
    """A host-local value a template writes but never reads: the owned table's name, the
    mark bits. `{{ mark }}` and `| tojson` write its token, which `render` swaps for the
    value after parsing; nothing else can be done with it (docs/configuration.md,
    "Template variables")."""

    read = False

    def __init__(self, name: str, value: Any) -> None:
        self.token = _TOKEN + name
        self._value = value

    def __repr__(self) -> str:  # the same whatever the value: part of the render cache key
        return f"Opaque({self.token!r})"

    def __str__(self) -> str:
        return json.dumps(self.token)


class Lazy(Sequence[Any]):
    """A list built on first use: `pairs` costs a dict per moved port and only per-pair
    templates (classic) read it."""

    def __init__(self, build: Callable[[], list[Any]]) -> None:
        self._build: Callable[[], list[Any]] | None = build
        self._items: list[Any] = []

    def _list(self) -> list[Any]:
        if self._build is not None:
            self._items, self._build = self._build(), None
        return self._items

    @property
    def read(self) -> bool:
        return self._build is None

    def __repr__(self) -> str:
        return "Lazy()"

    def __getitem__(self, i: Any) -> Any:
        return self._list()[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._list())

    def __len__(self) -> int:
        return len(self._list())


# No attribute of theirs is a template's: nothing in the context can be called to change
# what is written (the sandbox refuses every attribute of these).
CONTEXT_TYPES = (Elements, Hidden, Opaque, Lazy)


def dumps(obj: Any, **kwargs: Any) -> str:
    """`| tojson`: compact; an `Elements` as its placeholder; a `Lazy` as a list."""
    if isinstance(obj, Elements | Hidden | Opaque):
        return json.dumps(obj.token)
    return json.dumps(obj, default=_plain, **kwargs)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Lazy | Elements):
        return list(obj)
    if isinstance(obj, Hidden):
        return obj.value
    if isinstance(obj, Opaque):
        return obj.token
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class RenderTimeout(BaseException):
    """Raised inside the rendering thread when its time is up (a template cannot catch it)."""
