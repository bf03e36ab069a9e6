"""Fixtures for the data tests: an isolated cache, and the real datasets when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


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
    monkeypatch.setenv("HDQT_CACHE", str(session_cache))
    monkeypatch.delenv("HDQT_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)


def _real_root() -> Path:
    configured = os.environ.get("HDQT_DATA")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_root():
    """Return a function ``need(path) -> root`` that skips (or fails under CI=true)
    when ``<root>/<path>`` (a dataset folder, or one file in it) is absent."""
    root = _real_root()

    def need(path: str) -> Path:
        if not (root / path).exists():
            reason = f"real dataset file or folder {root / path} not found (set HDQT_DATA)"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI=true but {reason}")
            pytest.skip(reason)
        return root

    return need
