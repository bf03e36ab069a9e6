"""The real-data tests and the library agree on where the datasets are (docs/data.md, "Tests")."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from hdqt.cli import main as hdqt_main


def test_hdqt_data_defaults_to_the_shared_data_next_to_the_checkout(data_env, tmp_path):
    shared = tmp_path / "shared" / "data"
    environ: dict[str, str] = {}
    assert data_env.default(environ, shared) is None and environ == {}  # no such folder: nothing set
    shared.mkdir(parents=True)
    assert data_env.default(environ, shared) == str(shared) and environ == {"HDQT_DATA": str(shared)}
    assert data_env.default({"HDQT_DATA": ""}, shared) == str(shared)  # empty counts as unset
    mine = {"HDQT_DATA": "/elsewhere:/more"}
    assert data_env.default(mine, shared) == "/elsewhere:/more" and mine == {"HDQT_DATA": "/elsewhere:/more"}
    # this session was set up by that rule, with ../shared/data from the repository root
    assert data_env.shared == Path(__file__).resolve().parents[2].parent / "shared" / "data"
    at_start = {} if data_env.at_start is None else {"HDQT_DATA": data_env.at_start}
    assert data_env.in_session == data_env.default(at_start, data_env.shared)


def test_the_real_data_tests_search_the_roots_hdqt_data_lists(
    data_env, real_data_roots, session_cache, monkeypatch, capsys
):
    if data_env.in_session:  # as the session set it up (each data test's isolation removes it)
        monkeypatch.setenv("HDQT_DATA", data_env.in_session)
    assert hdqt_main(["data"]) == 0
    out = capsys.readouterr().out
    # the same roots, then the cache (a temporary one during tests)
    assert out.splitlines()[0] == "roots searched: " + ", ".join(map(str, (*real_data_roots, session_cache)))
    for name, folder in (("dsads", "dsads"), ("hapt", "hapt"), ("fashion_mnist", "fashion-mnist")):
        root = next((r for r in real_data_roots if (r / folder).is_dir()), None)
        if root is not None:  # the copy the real-data tests read is the one hdqt data finds
            assert f"\n{name}: found in {root / folder}" in out


def test_missing_real_data_is_searched_in_every_root_then_skipped_or_failed_under_ci(real_root, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    (b / "dsads").mkdir(parents=True)
    assert real_root("dsads", roots=(a, b)) == b
    (a / "dsads").mkdir(parents=True)
    assert real_root("dsads", roots=(a, b)) == a  # the first root holding it, as the library
    monkeypatch.delenv("CI", raising=False)
    searched = rf"\({re.escape(str(a))}, {re.escape(str(b))}\); set HDQT_DATA"
    with pytest.raises(pytest.skip.Exception, match=rf"pamap2 not found in the data roots {searched}"):
        real_root("pamap2", roots=(a, b))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=rf"CI=true but real dataset file or folder pamap2 not found"):
        real_root("pamap2", roots=(a, b))
