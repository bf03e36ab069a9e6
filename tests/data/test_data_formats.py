"""Loaders on small files written in the original formats: round trips and damaged files."""
from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
from hdqt_synth import (
    pamap2_table,
    write_cifar100,
    write_dsads_tree,
    write_fashion_mnist,
    write_hapt,
    write_pamap2,
)

from hdqt import data
from hdqt.data import DatasetFormatError, DatasetNotFoundError
from hdqt.data import pamap2 as pamap2_module


# --- CIFAR-100 -------------------------------------------------------------------------

def test_cifar100_round_trip(tmp_path):
    written = write_cifar100(tmp_path / "cifar-100-python", n_train=20, n_test=10)
    ds = data.load("cifar100", root=tmp_path)
    assert ds.x.shape == (30, 3, 32, 32) and ds.x.dtype == np.uint8
    train_data, train_labels = written["train"]
    # (N, 3072) rows are 1024 red, 1024 green, 1024 blue values, row-major
    np.testing.assert_array_equal(ds.x[:20].reshape(20, -1), train_data)
    np.testing.assert_array_equal(ds.x[3, 1, 2, 5], train_data[3, 1024 + 2 * 32 + 5])
    np.testing.assert_array_equal(ds.y[:20], train_labels)
    np.testing.assert_array_equal(ds.y[20:], written["test"][1])
    assert list(ds.split) == ["train"] * 20 + ["test"] * 10
    assert ds.class_names[:2] == ["class00", "class01"] and len(ds.class_names) == 100


def test_cifar100_reads_the_original_archive(tmp_path):
    written = write_cifar100(tmp_path / "src" / "cifar-100-python", n_train=8, n_test=4)
    (tmp_path / "root").mkdir()
    with tarfile.open(tmp_path / "root" / "cifar-100-python.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    ds = data.load("cifar100", root=tmp_path / "root")
    np.testing.assert_array_equal(ds.x[:8].reshape(8, -1), written["train"][0])


def test_cifar100_corrupted_pickle_names_the_file(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder)
    (folder / "train").write_bytes(b"this is not a pickle at all")
    with pytest.raises(DatasetFormatError, match=r"cifar-100-python/train.*corrupted"):
        data.load("cifar100", root=tmp_path)


def test_cifar100_truncated_pickle_names_the_file(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder)
    blob = (folder / "test").read_bytes()
    (folder / "test").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetFormatError, match=r"cifar-100-python/test.*truncated"):
        data.load("cifar100", root=tmp_path)


def test_cifar100_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": Evil()}))
    with pytest.raises(DatasetFormatError, match=r"meta.*builtins.print"):
        data.load("cifar100", root=tmp_path)


def test_cifar100_partial_folder_is_reported(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder)
    (folder / "meta").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        data.load("cifar100", root=tmp_path)
    message = str(info.value)
    assert "lacks meta" in message and "cifar-100-python.tar.gz" in message
    assert str(folder) in message


# --- PAMAP2 ----------------------------------------------------------------------------

def _pamap2_root(tmp_path, tables: dict[int, np.ndarray]):
    for subject, table in tables.items():
        write_pamap2(tmp_path / "pamap2" / "Protocol" / f"subject{subject}.dat", table)
    return tmp_path


def test_pamap2_round_trip_windows_labels_and_channels(tmp_path):
    table = pamap2_table([(0, 50), (4, 300), (0, 20), (17, 250)], seed=1)
    root = _pamap2_root(tmp_path, {101: table, 102: pamap2_table([(4, 200), (24, 100)], seed=2)})
    ds = data.load("pamap2", root=root, features=False, window=100, step=50)
    # subject 101: walking run 300 -> 5 windows, ironing run 250 -> 4; subject 102: 3 + 1
    assert ds.x.shape == (13, 100, 27)
    assert ds.class_names == ["walking", "ironing", "rope jumping"]  # ids 4, 17, 24 in id order
    np.testing.assert_array_equal(np.bincount(ds.y), [8, 4, 1])
    np.testing.assert_array_equal(np.unique(ds.subject), [101, 102])
    # first walking window of subject 101 = rows 50..149, hand acc16 x = column 4 (0-based)
    np.testing.assert_allclose(ds.x[0, :, 0], table[50:150, 4], rtol=1e-6)
    # last channel: ankle magnetometer z = column 49
    np.testing.assert_allclose(ds.x[0, :, 26], table[50:150, 49], rtol=1e-6)
    feats = data.load("pamap2", root=root, window=100, step=50)
    assert feats.x.shape == (13, 243)
    np.testing.assert_allclose(feats.x[0, 0], table[50:150, 4].mean(), rtol=1e-5, atol=1e-6)


def test_pamap2_nan_gaps_are_interpolated_and_long_gaps_dropped(tmp_path):
    table = pamap2_table([(1, 200)], seed=3)
    table[10:15, 4] = np.nan  # 5% of window 0 (rows 0..99): interpolated
    table[120:140, 21] = np.nan  # 20% of window 1 (rows 100..199) on chest acc x: dropped
    root = _pamap2_root(tmp_path, {101: table})
    ds = data.load("pamap2", root=root, features=False, window=100, step=100)
    assert ds.x.shape == (1, 100, 27)
    expected = np.interp(np.arange(10, 15), [9, 15], table[[9, 15], 4])
    np.testing.assert_allclose(ds.x[0, 10:15, 0], expected, rtol=1e-5)
    assert not np.isnan(ds.x).any()


def test_pamap2_malformed_value_names_file_and_line(tmp_path):
    root = _pamap2_root(tmp_path, {101: pamap2_table([(1, 120)])})
    path = root / "pamap2" / "Protocol" / "subject101.dat"
    lines = path.read_text().splitlines()
    lines[6] = lines[6].replace(" ", " abc ", 1)  # 55 fields on line 7
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=r"subject101\.dat, line 7: expected 54"):
        data.load("pamap2", root=root)


def test_pamap2_truncated_file_names_file_and_line(tmp_path):
    root = _pamap2_root(tmp_path, {101: pamap2_table([(1, 120)])})
    path = root / "pamap2" / "Protocol" / "subject101.dat"
    text = path.read_text()
    path.write_text(text[: len(text) - 300])  # cut in the middle of line 120
    with pytest.raises(DatasetFormatError, match=r"subject101\.dat, line 120: expected 54 .* found \d+"):
        data.load("pamap2", root=root)


def test_pamap2_unknown_activity_id_names_file_and_line(tmp_path):
    table = pamap2_table([(1, 120)])
    table[30, 1] = 8  # not a PAMAP2 activity id
    root = _pamap2_root(tmp_path, {101: table})
    with pytest.raises(DatasetFormatError, match=r"subject101\.dat, line 31: activity id 8"):
        data.load("pamap2", root=root)


def test_pamap2_window_arguments_are_checked():
    with pytest.raises(ValueError, match="window"):
        pamap2_module.load(window=1)
    with pytest.raises(ValueError, match="max_missing"):
        pamap2_module.load(max_missing=1.5)


# --- Fashion-MNIST ---------------------------------------------------------------------

def test_fashion_mnist_round_trip(tmp_path):
    written = write_fashion_mnist(tmp_path / "fashion-mnist", n_train=12, n_test=6)
    ds = data.load("fashion-mnist", root=tmp_path)
    assert ds.name == "fashion_mnist" and ds.x.shape == (18, 1, 28, 28)
    np.testing.assert_array_equal(ds.x[:12, 0], written["train"][0])
    np.testing.assert_array_equal(ds.y[12:], written["t10k"][1])
    assert (ds.split == "test").sum() == 6
    assert ds.class_names[9] == "Ankle boot"


def test_fashion_mnist_truncated_file_names_it(tmp_path):
    folder = tmp_path / "fashion-mnist"
    write_fashion_mnist(folder)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetFormatError, match=r"t10k-images-idx3-ubyte\.gz.*truncated"):
        data.load("fashion_mnist", root=tmp_path)


def test_fashion_mnist_wrong_magic_is_reported(tmp_path):
    folder = tmp_path / "fashion-mnist"
    write_fashion_mnist(folder)
    # labels file where an images file belongs: 1-d magic instead of 3-d
    (folder / "train-images-idx3-ubyte.gz").write_bytes((folder / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DatasetFormatError, match=r"train-images-idx3-ubyte\.gz: IDX magic number 2049"):
        data.load("fashion_mnist", root=tmp_path)


# --- HAPT (synthetic tree) -------------------------------------------------------------

def test_hapt_windows_follow_labels_and_raw_rows(tmp_path):
    raw = tmp_path / "hapt" / "HAPT Data Set" / "RawData"
    segments = [
        (1, 1, 5, 11, 330),  # 320 samples -> 4 windows
        (1, 1, 7, 331, 457),  # 127 samples -> none
        (2, 2, 1, 1, 192),  # 192 -> 2
        (3, 3, 12, 101, 228),  # 128 -> 1
    ]
    signals = write_hapt(raw, {(1, 1): 500, (2, 2): 200, (3, 3): 300}, segments)
    ds = data.load("hapt", root=tmp_path, features=False)
    assert ds.x.shape == (7, 128, 6)
    np.testing.assert_array_equal(ds.extra["start"], [10, 74, 138, 202, 0, 64, 100])
    np.testing.assert_array_equal(ds.y, [4, 4, 4, 4, 0, 0, 11])
    np.testing.assert_array_equal(ds.subject, [1, 1, 1, 1, 2, 2, 3])
    acc, gyro = signals[(1, 1)]
    np.testing.assert_allclose(ds.x[1, :, :3], acc[74:202], rtol=1e-6)
    np.testing.assert_allclose(ds.x[1, :, 3:], gyro[74:202], rtol=1e-6)
    feats = data.load("hapt", root=tmp_path)
    assert feats.x.shape == (7, 561) and np.isfinite(feats.x).all()


def test_hapt_label_beyond_signal_names_labels_line(tmp_path):
    raw = tmp_path / "hapt" / "RawData"
    write_hapt(raw, {(1, 1): 300}, [(1, 1, 1, 1, 200), (1, 1, 2, 201, 400)])
    with pytest.raises(DatasetFormatError, match=r"labels\.txt, line 2: .*end 400"):
        data.load("hapt", root=tmp_path)


def test_hapt_truncated_signal_names_file_and_line(tmp_path):
    raw = tmp_path / "hapt" / "RawData"
    write_hapt(raw, {(1, 1): 300}, [(1, 1, 1, 1, 200)])
    path = raw / "gyro_exp01_user01.txt"
    text = path.read_text()
    path.write_text(text[: len(text) - 12])  # last line loses its third value
    with pytest.raises(DatasetFormatError, match=r"gyro_exp01_user01\.txt, line 300: expected 3"):
        data.load("hapt", root=tmp_path)


def test_hapt_missing_signal_file_is_a_partial_dataset(tmp_path):
    raw = tmp_path / "hapt" / "RawData"
    write_hapt(raw, {(1, 1): 300, (2, 1): 300}, [(1, 1, 1, 1, 200), (2, 1, 1, 1, 200)])
    (raw / "acc_exp02_user01.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"acc_exp02_user01\.txt"):
        data.load("hapt", root=tmp_path)


# --- DSADS (UCI text layout, scaled down) ----------------------------------------------

@pytest.mark.parametrize("layout", ["text", "zip"])
def test_dsads_text_and_archive_give_the_npz_layout(tmp_path, monkeypatch, layout):
    from hdqt.data import dsads

    monkeypatch.setattr(dsads, "_EXPECTED_FILES", 4)  # accept the 4-file set as complete
    monkeypatch.setenv("HDQT_CACHE", str(tmp_path / "cache"))
    values = write_dsads_tree(tmp_path / "src" / "data")
    if layout == "text":
        root = tmp_path / "src"
        (root / "dsads").mkdir()
        (root / "data").rename(root / "dsads" / "data")
    else:
        import shutil

        root = tmp_path / "zipped"
        (root / "dsads").mkdir(parents=True)
        shutil.make_archive(str(root / "dsads" / "uci"), "zip", tmp_path / "src")
    ds = data.load("dsads", root=root, features=False)
    np.testing.assert_array_equal(ds.y, [0, 0, 18, 18])
    np.testing.assert_array_equal(ds.extra["segment"], [1, 60, 1, 60])
    np.testing.assert_array_equal(ds.subject, [8, 8, 8, 8])
    np.testing.assert_allclose(ds.x[3], values[(19, 60)], rtol=5e-4, atol=1e-7)
    (cached,) = (tmp_path / "cache" / "parsed").glob("dsads-*.npz")  # the parsed signal
    with np.load(cached) as npz:
        assert {k: npz[k].dtype.name for k in npz.files} == {
            "x": "float16", "y": "int16", "subject": "int16", "segment": "int16"}
    feats = data.load("dsads", root=root)
    assert feats.x.shape == (4, 405)


def test_dsads_truncated_segment_names_file_and_line(tmp_path, monkeypatch):
    from hdqt.data import dsads

    monkeypatch.setattr(dsads, "_EXPECTED_FILES", 4)
    write_dsads_tree(tmp_path / "dsads" / "data")
    path = tmp_path / "dsads" / "data" / "a19" / "p8" / "s01.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:120]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"a19/p8/s01\.txt, line 121: expected 125 rows"):
        data.load("dsads", root=tmp_path)
