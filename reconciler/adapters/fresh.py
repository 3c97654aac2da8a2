"""A command that fails before it changed the kernel leaves mtd's files as it found them.

`apply` and `rotate` make the audit log, the lock, `cache/`, the secret, the watch store and
their directory as they go. When they fail before the kernel took the change (a refused
ruleset, a lockout refusal, a bad template), the live table is exactly as it was, and so,
here, is every file and directory that did not exist before: a failed first `apply` leaves
a fresh state directory as it was (no secret for a mapping never applied, no empty audit
log claiming a history).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path


class Undo:
    """What did not exist before; `done()` once the kernel took the change (keep it all)."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.created: list[Path] = []
        self.dirs: list[Path] = []
        self.kept = False
        for p in map(Path, paths):
            if not (p.exists() or p.is_symlink()):
                self.created.append(p)
            for parent in p.parents:
                if parent.exists():
                    break
                if parent not in self.dirs:
                    self.dirs.append(parent)

    def done(self) -> None:
        self.kept = True

    def undo(self) -> None:
        for p in self.created:
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        for d in sorted(self.dirs, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty: never anything of someone else's


@contextlib.contextmanager
def undo_on_failure(paths: Iterable[str | Path]) -> Iterator[Undo]:
    guard = Undo(paths)
    try:
        yield guard
    except BaseException:
        if not guard.kept:
            guard.undo()
        raise
