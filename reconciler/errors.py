"""The exceptions users see: each message is the line (or lines) the CLI prints.

One root, `MtdError`, so every command turns any of them into `mtd: error: ...` lines and
exit code 1; the subclasses say which input or system was at fault, for callers that treat
them differently (the daemon keeps enforcing through a Redis outage, a pull round rejects a
commit whose state or template is bad but retries one the kernel could not take).
"""

from __future__ import annotations

import copy


class MtdError(Exception):
    """A problem the user can fix, described in one line (file, key, value, what was expected).

    Several independent problems (for example every bad key of a state file) may be reported
    at once; each is one line of the message.
    """

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))

    def reworded(self, problems: list[str]) -> MtdError:
        """The same error (same type and facts) with its lines rewritten, e.g. with paths
        named as in the repository rather than as in a scratch copy."""
        new = copy.copy(self)
        new.problems = [p for p in problems if p]
        new.args = ("\n".join(new.problems),)
        return new


class StateError(MtdError):
    """The desired state: YAML, schema or meaning."""


class TemplateError(MtdError):
    """A template: missing, not valid Jinja2, failing, or rendering something mtd refuses."""


class BusError(MtdError):
    """Redis: unreachable, refused, or its settings are wrong."""


class GitError(MtdError):
    """git failed or timed out; the message is one line."""


class KernelError(MtdError):
    """libnftables or the kernel refused, parsed once into facts callers can test.

    `index` is the refused command's place in the rendered document (the template's own
    numbering, from 0), `command` what it is (`add set tiny`), `reason` the kernel's words;
    `not_found` says the object named does not exist. `line` is the one format every
    command prints: `nftables refused rendered command 1 (add set tiny): <reason>`.
    """

    def __init__(
        self,
        reason: str,
        *,
        index: int | None = None,
        command: str | None = None,
        not_found: bool = False,
        context: str | None = None,
    ) -> None:
        self.reason = reason
        self.index = index
        self.command = command
        self.not_found = not_found
        self.context = context
        super().__init__(self.line)

    @property
    def line(self) -> str:
        if self.index is not None:
            return f"nftables refused rendered command {self.index} ({self.command}): {self.reason}"
        if self.command is not None:
            return f"nftables refused {self.command}: {self.reason}"
        return f"{self.context}: {self.reason}" if self.context else self.reason

    def renumbered(self, positions: list[int]) -> KernelError:
        """The same refusal with `index` mapped through `positions` (a sub-document's
        command i is the rendered document's command positions[i])."""
        if self.index is None or not 0 <= self.index < len(positions):
            return self
        return KernelError(
            self.reason,
            index=positions[self.index],
            command=self.command,
            not_found=self.not_found,
            context=self.context,
        )


NftError = KernelError  # the name used before the hierarchy
