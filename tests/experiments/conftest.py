"""Shared fixture: one uninterrupted tiny hdqt run (see run_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from run_helpers import TINY, run_cli


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted tiny hdqt run, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(*TINY, "--recipe", "hdqt", "--out", str(out)) == 0
    return out
