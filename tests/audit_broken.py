"""`python tests/audit_broken.py MODE MTD-ARGS...`: the real `mtd` with a failing audit log.

MODE `write`: appending a line fails (as on a full disk) after the pre-check passed; MODE
`check`: the pre-check fails too. Fault injection for tests/test_audit_failures.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from reconciler.adapters import auditlog
from reconciler.errors import MtdError


def _no_space(path: str | Path, **_: Any) -> dict[str, Any]:
    raise MtdError(f"{path}: cannot write the audit log: No space left on device")


def _no_check(path: str | Path) -> None:
    raise MtdError(f"{path}: cannot write the audit log: Read-only file system: nothing changed")


if __name__ == "__main__":
    mode = sys.argv.pop(1)
    auditlog.record = _no_space  # type: ignore[assignment]
    if mode == "check":
        auditlog.check_writable = _no_check  # type: ignore[assignment]
    from reconciler.cli import main

    sys.argv[0] = "mtd"
    main()
