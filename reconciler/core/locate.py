"""Where a problem of the desired state is: the file and line of a key (from the YAML node
tree, built only when a problem is reported), and jsonschema's errors in the words every
other problem uses. At most `MAX_PROBLEMS` lines are printed; the rest are counted."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from reconciler.core.documents import _loader, _yaml
from reconciler.errors import StateError

if TYPE_CHECKING:
    import jsonschema
    import yaml


def key_path(path: Iterable[str | int]) -> str:
    """watched[0].ignore.tcp: the way a user writes a location in a YAML document."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


MAX_PROBLEMS = 20  # lines printed; the rest are counted


def _schema_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "required":
        return f"missing key: {error.message}"
    return f"{error.instance!r}: {_expected(error)}"


def _expected(error: jsonschema.ValidationError) -> str:
    v, arg = error.validator, error.validator_value
    if v == "type":
        return f"expected {arg}"
    if v == "minimum":
        return f"expected at least {arg}"
    if v == "maximum":
        return f"expected at most {arg}"
    if v == "enum":
        return f"expected one of {', '.join(map(str, arg))}"
    if v == "pattern":
        return f"expected text matching {arg}"
    if v == "uniqueItems":
        return "expected no repeated items"
    if v in ("minItems", "items", "maxItems"):
        return "expected [low, high]" if list(error.path)[-1:] == ["range"] else error.message
    return error.message


class _Locator:
    """Turns a key path of the merged document into `file:line: key.path: message`.

    Line numbers come from composing a file again, once, only when it has an error to
    report: thousands of errors cost one compose, not one each.
    """

    def __init__(
        self, parsed: Sequence[tuple[str, dict[str, Any]]], texts: Mapping[str, str]
    ) -> None:
        self._parsed = parsed
        self._texts = texts
        self._nodes: dict[str, yaml.Node | None] = {}

    def __call__(self, path: list[str | int], message: str) -> str:
        for name, data in reversed(self._parsed):
            if _has(data, path):
                line = _line_of(self._node(name), path)
                where = f"{name}:{line}" if line else name
                return f"{where}: {key_path(path)}: {message}"
        name = self._parsed[-1][0] if self._parsed else "desired state"
        return f"{name}: {key_path(path)}: {message}"

    def _node(self, name: str) -> yaml.Node | None:
        if name not in self._nodes:
            try:  # already bounded by `load_yaml`, so the C composer is safe here
                yaml = _yaml()
                self._nodes[name] = yaml.compose(self._texts.get(name, ""), Loader=_loader())
            except _yaml().YAMLError:
                self._nodes[name] = None
        return self._nodes[name]


def limited(problems: Sequence[str], more: int = 0) -> StateError:
    """The first `MAX_PROBLEMS` problems, then one line counting the rest (and `more`)."""
    rest = max(0, len(problems) - MAX_PROBLEMS) + more
    tail = [f"... and {rest} more problem{'s' if rest > 1 else ''}"] if rest else []
    return StateError(*problems[:MAX_PROBLEMS], *tail)


def _has(data: Any, path: list[str | int]) -> bool:
    for part in path:
        if (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and part < len(data)
        ):
            data = data[part]
        else:
            return False
    return True


def _line_of(node: yaml.Node | None, path: list[str | int]) -> int | None:
    yaml = _yaml()
    for part in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
        else:
            node = None
        if node is None:
            return None
    return node.start_mark.line + 1 if node is not None else None
