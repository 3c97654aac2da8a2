"""Every backend contract case (tests/backend_cases.py) against the fake and the kernel."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters import files
from reconciler.adapters.fake import FakeKernel
from reconciler.lab.netns import Lab
from tests.backend_cases import CASES
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def server() -> Iterator[Lab]:
    with Lab(prefix="mtdc") as lab:
        lab.add_server()
        yield lab


@pytest.mark.parametrize("case", sorted(CASES))
def test_fake(case: str, state_file: Path):
    CASES[case](FakeKernel(), files.load_state(state_file))


@pytest.mark.netns
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel(case: str, state_file: Path, server: Lab):
    server.sh("srv", "nft flush ruleset")
    out = server.run(
        "srv", [sys.executable, "-m", "tests.backend_cases", case, str(state_file)], cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
