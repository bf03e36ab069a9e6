"""Malformed values and names: each is rejected with the file and its real line number."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from hdqt_synth import pamap2_table, write_cifar100, write_dsads_tree, write_hapt, write_pamap2

from hdqt import data
from hdqt.data import DatasetFormatError
from hdqt.data import dsads as dsads_module


@pytest.fixture
def dsads_root(tmp_path, monkeypatch):
    monkeypatch.setattr(dsads_module, "_EXPECTED_FILES", 4)  # the 4-file tree counts as complete
    write_dsads_tree(tmp_path / "dsads" / "data")
    return tmp_path


def _edit_lines(path, edit):
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")


# --- DSADS -----------------------------------------------------------------------------

def test_dsads_extra_row_is_not_called_truncated(dsads_root):
    path = dsads_root / "dsads" / "data" / "a01" / "p8" / "s60.txt"
    _edit_lines(path, lambda lines: lines.append(lines[0]))
    with pytest.raises(DatasetFormatError, match=r"s60\.txt, line 126: expected 125 rows but the file holds 126"):
        data.load("dsads", root=dsads_root)


def test_dsads_nan_names_file_and_real_line(dsads_root):
    path = dsads_root / "dsads" / "data" / "a19" / "p8" / "s01.txt"

    def edit(lines):
        lines[39] = "nan" + lines[39][lines[39].index(","):]  # row 40, column 1
        lines[0:0] = ["", "  "]  # blank lines are skipped but still counted

    _edit_lines(path, edit)
    with pytest.raises(DatasetFormatError, match=r"a19/p8/s01\.txt, line 42: nan in column 1 is not a finite"):
        data.load("dsads", root=dsads_root)


def test_dsads_comment_line_is_an_error_not_skipped(dsads_root):
    path = dsads_root / "dsads" / "data" / "a01" / "p8" / "s01.txt"
    _edit_lines(path, lambda lines: lines.insert(2, "# recorded by hand"))
    with pytest.raises(DatasetFormatError, match=r"s01\.txt, line 3: comment lines"):
        data.load("dsads", root=dsads_root)


@pytest.mark.parametrize("name, problem", [
    ("a20/p8/s01.txt", "activity 20"), ("a01/p9/s01.txt", "subject 9"),
    ("a01/p0/s01.txt", "subject 0"), ("a01/p8/s61.txt", "segment 61"),
])
def test_dsads_file_with_an_invalid_id_is_named(dsads_root, name, problem):
    path = dsads_root / "dsads" / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(dsads_root / "dsads" / "data" / "a01" / "p8" / "s01.txt", path)
    with pytest.raises(DatasetFormatError, match=rf"{name}: {problem} in the file name is outside"):
        data.load("dsads", root=dsads_root)


def test_dsads_duplicate_member_is_named(dsads_root, tmp_path):
    src = dsads_root / "dsads"
    shutil.copytree(src / "data", src / "copy" / "data")  # a second copy of the tree
    root = tmp_path / "zipped"
    (root / "dsads").mkdir(parents=True)
    shutil.make_archive(str(root / "dsads" / "uci"), "zip", src)
    with pytest.raises(DatasetFormatError, match=r"uci\.zip:.*s\d\d\.txt: a\d\d/p8/s\d\d\.txt appears twice"):
        data.load("dsads", root=root)


@pytest.mark.filterwarnings("error")  # numpy's "input contained no data" would raise first
def test_empty_file_gives_the_format_error_and_no_numpy_warning(dsads_root):
    (dsads_root / "dsads" / "data" / "a19" / "p8" / "s60.txt").write_text("")
    with pytest.raises(DatasetFormatError, match=r"s60\.txt, line 1: the file holds no data rows"):
        data.load("dsads", root=dsads_root)


# --- HAPT and PAMAP2 -------------------------------------------------------------------

def test_hapt_nan_signal_names_file_and_line(tmp_path):
    raw = tmp_path / "hapt" / "RawData"
    write_hapt(raw, {(1, 1): 300}, [(1, 1, 1, 1, 200)])
    _edit_lines(raw / "acc_exp01_user01.txt", lambda lines: lines.__setitem__(149, "0.1 inf 0.2"))
    with pytest.raises(DatasetFormatError, match=r"acc_exp01_user01\.txt, line 150: inf in column 2"):
        data.load("hapt", root=tmp_path)


def test_hapt_labels_errors_name_the_real_line(tmp_path):
    raw = tmp_path / "hapt" / "RawData"
    write_hapt(raw, {(1, 1): 300}, [(1, 1, 1, 1, 100), (1, 1, 2, 101, 400)])
    _edit_lines(raw / "labels.txt", lambda lines: lines.insert(1, ""))  # row 2 is now line 3
    with pytest.raises(DatasetFormatError, match=r"labels\.txt, line 3: .*end 400"):
        data.load("hapt", root=tmp_path)
    _edit_lines(raw / "labels.txt", lambda lines: lines.__setitem__(0, "1 1 1 1 100.5"))
    with pytest.raises(DatasetFormatError, match=r"labels\.txt, line 1: .*whole numbers"):
        data.load("hapt", root=tmp_path)


def test_pamap2_line_numbers_count_blank_lines(tmp_path):
    table = pamap2_table([(1, 120)])
    table[30, 1] = 8  # not an activity id; row 31
    path = tmp_path / "pamap2" / "Protocol" / "subject101.dat"
    write_pamap2(path, table)
    _edit_lines(path, lambda lines: lines.__setitem__(slice(10, 10), ["", ""]))
    with pytest.raises(DatasetFormatError, match=r"subject101\.dat, line 33: activity id 8"):
        data.load("pamap2", root=tmp_path)


@pytest.mark.parametrize("arguments, name", [
    ({"window": 10.5}, "window"), ({"step": "2"}, "step"), ({"window": True}, "window"),
    ({"max_missing": "0.1"}, "max_missing"),
])
def test_pamap2_arguments_must_be_numbers_of_the_right_kind(arguments, name):
    with pytest.raises(ValueError, match=rf"pamap2: {name} must be"):
        data.load("pamap2", **arguments)


# --- CIFAR-100 -------------------------------------------------------------------------

def _rewrite(path, change):
    record = pickle.loads(path.read_bytes())
    change(record)
    path.write_bytes(pickle.dumps(record, protocol=2))


@pytest.mark.parametrize("names", [
    "a plain string", [f"c{i}".encode() for i in range(99)], list(range(100)),
])
def test_cifar100_meta_must_hold_100_fine_names(tmp_path, names):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder, n_train=4, n_test=2)
    _rewrite(folder / "meta", lambda meta: meta.__setitem__(b"fine_label_names", names))
    expected = r"cifar-100-python/meta: b'fine_label_names' must be a list of 100"
    with pytest.raises(DatasetFormatError, match=expected):
        data.load("cifar100", root=tmp_path)


def test_cifar100_pixel_values_above_255_are_rejected_not_wrapped(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder, n_train=4, n_test=2)
    _rewrite(folder / "train", lambda r: r.__setitem__(b"data", np.asarray(r[b"data"], np.int64) + 200))
    with pytest.raises(DatasetFormatError, match=r"cifar-100-python/train: b'data' must hold integers 0\.\.255"):
        data.load("cifar100", root=tmp_path)


@pytest.mark.parametrize("bad", [3.5, -1, 100, float("nan")])
def test_cifar100_labels_must_be_whole_numbers_in_range(tmp_path, bad):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder, n_train=4, n_test=2)
    _rewrite(folder / "test", lambda r: r.__setitem__(b"fine_labels", [1, bad]))
    expected = r"cifar-100-python/test: fine_labels must be whole numbers in 0\.\.99"
    with pytest.raises(DatasetFormatError, match=expected):
        data.load("cifar100", root=tmp_path)
