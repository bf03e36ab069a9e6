"""Fixtures for the data tests: an isolated cache, and the real datasets when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hdqt.data.paths import configured_roots


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    # One cache per test session: real data is parsed once, never into the user's cache.
    # Session-scoped so that it is in place before module-scoped fixtures load data.
    cache = tmp_path_factory.mktemp("hdqt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HDQT_CACHE", str(cache))
        yield cache


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, session_cache):
    # Each test sees only the folders it names: the real-data tests pass their root explicitly.
    monkeypatch.setenv("HDQT_CACHE", str(session_cache))
    monkeypatch.delenv("HDQT_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)


@pytest.fixture(scope="session")
def real_data_roots(data_env) -> tuple[Path, ...]:
    """The roots the real-data tests search: those of ``HDQT_DATA`` as the session set it
    (tests/conftest.py defaults it to ../shared/data), by the library's own rule. The per-user
    cache, the library's last root, is replaced by a temporary one during tests."""
    return tuple(configured_roots(data_env.in_session or ""))


@pytest.fixture(scope="session")
def real_root(real_data_roots):
    """Return a function ``need(path) -> root``: the first real-data root holding ``path`` (a
    dataset folder, or one file in it); where none does, the test skips with the roots searched
    (or fails under CI=true). ``roots=`` replaces the session's roots (for testing ``need``)."""

    def need(path: str, roots: tuple[Path, ...] | None = None) -> Path:
        roots = real_data_roots if roots is None else roots
        for root in roots:
            if (root / path).exists():
                return root
        searched = ", ".join(str(r) for r in roots) or "none: HDQT_DATA is unset and ../shared/data is absent"
        reason = f"real dataset file or folder {path} not found in the data roots ({searched}); set HDQT_DATA"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)

    return need
