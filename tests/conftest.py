"""Set-up shared by every test folder: where the real datasets are.

The library decides where datasets are looked for (``hdqt.data.data_roots``: ``HDQT_DATA``,
then the per-user cache) and the real-data tests search the same ``HDQT_DATA`` roots
(tests/data/conftest.py). So that a checkout on the project's machines, which sit next to a
``shared/data`` folder (``../shared/data`` from the repository root), finds the shared copies
with no setting, ``HDQT_DATA`` defaults to that folder when it is unset and the folder exists.
It is set here, when pytest imports this file and before it imports any test module or other
conftest, so the tests, ``hdqt data`` run by a test, and the processes tests start all see the
same roots. docs/data.md ("Tests") describes the layout.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace
from typing import MutableMapping

import pytest

from hdqt.data.paths import DATA_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def default_data_env(environ: MutableMapping[str, str], shared: Path = SHARED_DATA) -> str | None:
    """Set ``environ["HDQT_DATA"]`` to ``shared`` if it is unset or empty and ``shared`` is a
    folder; return the value the tests then run with (None: no data roots but the cache)."""
    if not environ.get(DATA_ENV) and Path(shared).is_dir():
        environ[DATA_ENV] = str(shared)
    return environ.get(DATA_ENV) or None


_AT_START = os.environ.get(DATA_ENV)
_IN_SESSION = default_data_env(os.environ)


@pytest.fixture(scope="session")
def data_env() -> SimpleNamespace:
    """``HDQT_DATA`` when pytest started (``at_start``) and as this session set it
    (``in_session``, which per-test isolation may later remove), the folder it defaults to
    (``shared``) and the rule (``default``)."""
    return SimpleNamespace(at_start=_AT_START, in_session=_IN_SESSION, shared=SHARED_DATA, default=default_data_env)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """A loader of a script in benchmarks/ by name (``load_benchmark("bench_cl")``), as a
    module: the scripts are not a package, so the tests import them from their files."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


def pytest_report_header(config) -> list[str]:
    """Which kernels this run tests: the int8 and narrow-vector tests run only where the CPU
    has them (their skips say so), and the torch path runs everywhere."""
    from hdqt.quantization import native

    return [f"hdqt kernels: {native.kernel_variant()}"]
