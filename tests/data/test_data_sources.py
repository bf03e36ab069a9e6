"""Finding the source files: malformed, incomplete and partial copies, archives, system folders."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from hdqt_synth import pamap2_table, write_dsads_tree, write_fashion_mnist, write_hapt, write_pamap2

from hdqt import data
from hdqt.cli import main as hdqt_main
from hdqt.data import DatasetFormatError, DatasetNotFoundError, archives
from hdqt.data import dsads as dsads_module
from hdqt.data import fashion_mnist as fmnist_module


def _hdqt_data(capsys, root=None) -> str:
    assert hdqt_main(["data"] + (["--root", str(root)] if root else [])) == 0
    return capsys.readouterr().out


def test_hdqt_data_reports_a_malformed_copy_and_goes_on(tmp_path, capsys):
    raw = tmp_path / "hapt" / "RawData"
    write_hapt(raw, {(1, 1): 200}, [(1, 1, 1, 1, 150)])
    (raw / "labels.txt").write_text("1 1 1 1 150\n1 1 x 1 150\n")
    out = _hdqt_data(capsys, tmp_path)
    assert "hapt: FOUND BUT MALFORMED" in out
    assert f"{tmp_path / 'hapt'}: malformed, skipped: {raw / 'labels.txt'}, line 2: 'x' is not a number" in out
    for name in data.list_datasets():  # the listing did not stop at hapt
        assert f"\n{name}:" in out
    with pytest.raises(DatasetFormatError, match=r"labels\.txt, line 2"):
        data.load("hapt", root=tmp_path)  # loading it names the file and line to fix


def test_junk_archive_is_not_a_dataset(tmp_path, capsys):
    (tmp_path / "hapt").mkdir()
    (tmp_path / "hapt" / "notes.zip").write_bytes(b"not a zip at all")
    out = _hdqt_data(capsys, tmp_path)
    assert "hapt: found" not in out
    assert "notes.zip: cannot read the archive" in out
    with pytest.raises(DatasetNotFoundError, match=r"notes\.zip: cannot read the archive"):
        data.load("hapt", root=tmp_path)


def test_incomplete_archive_falls_through_to_a_complete_copy_in_a_later_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dsads_module, "_EXPECTED_FILES", 4)
    values = write_dsads_tree(tmp_path / "b" / "dsads" / "data")
    excerpt = tmp_path / "excerpt" / "data" / "a01" / "p8"
    excerpt.mkdir(parents=True)
    shutil.copy(tmp_path / "b" / "dsads" / "data" / "a01" / "p8" / "s01.txt", excerpt)
    (tmp_path / "a" / "dsads").mkdir(parents=True)
    shutil.make_archive(str(tmp_path / "a" / "dsads" / "excerpt"), "zip", tmp_path / "excerpt")
    monkeypatch.setenv("HDQT_DATA", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    ds = data.load("dsads", features=False)
    np.testing.assert_allclose(ds.x[3], values[(19, 60)], rtol=5e-4, atol=1e-7)
    out = _hdqt_data(capsys)
    assert f"dsads: found in {tmp_path / 'b' / 'dsads'} (text)" in out
    assert "excerpt.zip holds 1 of the 4 segment files" in out


def test_archive_listing_is_cached_per_archive_version(tmp_path, monkeypatch):
    monkeypatch.setattr(dsads_module, "_EXPECTED_FILES", 4)
    write_dsads_tree(tmp_path / "src" / "data")
    (tmp_path / "dsads").mkdir()
    shutil.make_archive(str(tmp_path / "dsads" / "uci"), "zip", tmp_path / "src")
    assert data.load("dsads", root=tmp_path).x.shape == (4, 405)

    def no_listing(*args, **kwargs):
        raise AssertionError("the archive was listed again")

    monkeypatch.setattr(archives, "iter_members", no_listing)
    assert dsads_module.SOURCE.locate(tmp_path).layout == "archive"  # verdict from the cache


def _pamap2_copy(folder, subjects):
    for subject in subjects:
        path = folder / "pamap2" / "Protocol" / f"subject{subject}.dat"
        write_pamap2(path, pamap2_table([(4, 120)], seed=subject))


def test_pamap2_with_fewer_than_nine_subjects_loads_but_is_partial(tmp_path, capsys):
    _pamap2_copy(tmp_path, [101, 105])
    out = _hdqt_data(capsys, tmp_path)
    assert "pamap2: found in" in out and "PARTIAL: 2 of the 9 protocol subjects" in out
    assert "missing subject102.dat, subject103.dat, subject104.dat, subject106.dat" in out
    ds = data.load("pamap2", root=tmp_path, window=100, step=100)
    np.testing.assert_array_equal(np.unique(ds.subject), [101, 105])
    assert "Partial copy: 2 of the 9 protocol subjects" in ds.description


def test_a_complete_pamap2_copy_wins_over_an_earlier_partial_one(tmp_path, monkeypatch):
    _pamap2_copy(tmp_path / "a", [101])
    _pamap2_copy(tmp_path / "b", range(101, 110))
    monkeypatch.setenv("HDQT_DATA", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    ds = data.load("pamap2", window=100, step=100)
    assert len(np.unique(ds.subject)) == 9 and "Partial" not in ds.description


def test_fashion_mnist_is_found_in_the_debian_system_folder(tmp_path, monkeypatch):
    assert fmnist_module.SOURCE.system_folders == ("/usr/share/datasets/fashion-mnist",)
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    write_fashion_mnist(system, n_train=3, n_test=2)
    moved = dataclasses.replace(fmnist_module.SOURCE, system_folders=(str(system),))
    monkeypatch.setattr(fmnist_module, "SOURCE", moved)
    assert len(data.load("fashion_mnist")) == 5  # no HDQT_DATA: cache, then the system folder
    assert len(data.load("fashion_mnist", root=tmp_path / "empty")) == 5  # searched even with root=
    write_fashion_mnist(tmp_path / "mine" / "fashion-mnist", n_train=4, n_test=2)
    assert len(data.load("fashion_mnist", root=tmp_path / "mine")) == 6  # a root's copy comes first
