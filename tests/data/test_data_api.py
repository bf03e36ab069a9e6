"""The public data API: names, root resolution, missing-data errors, caching, `hdqt data`."""
from __future__ import annotations

import numpy as np
import pytest
from hdqt_synth import write_cifar100, write_fashion_mnist

from hdqt import data
from hdqt.cli import main as hdqt_main
from hdqt.data import DatasetNotFoundError, cache_dir, data_roots


def test_list_datasets_and_aliases():
    assert data.list_datasets() == ["dsads", "hapt", "pamap2", "cifar100", "fashion_mnist", "digits"]
    assert data.dataset_info("Fashion-MNIST").name == "fashion_mnist"


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*dsads.*hapt.*pamap2.*cifar100.*digits"):
        data.load("mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.prepare("imagenet")


def test_missing_dataset_error_names_files_folders_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("HDQT_DATA", str(tmp_path / "mine"))
    with pytest.raises(FileNotFoundError) as info:
        data.load("dsads")
    err = info.value
    assert isinstance(err, DatasetNotFoundError)
    message = str(err)
    assert "dsads.npz" in message and "data/aNN/pN/sNN.txt" in message
    assert str(tmp_path / "mine" / "dsads") in message
    assert str(cache_dir() / "dsads") in message
    assert "https://archive.ics.uci.edu/" in message


def test_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HDQT_CACHE", str(tmp_path / "cache"))
    assert data_roots() == [tmp_path / "cache"]
    monkeypatch.setenv("HDQT_DATA", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert data_roots() == [tmp_path / "a", tmp_path / "b", tmp_path / "cache"]
    assert data_roots(tmp_path / "explicit") == [tmp_path / "explicit"]
    monkeypatch.delenv("HDQT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "hdqt"


def test_first_root_holding_the_dataset_wins(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "b" / "fashion-mnist", n_train=5, n_test=2, seed=1)
    write_fashion_mnist(tmp_path / "c" / "fashion-mnist", n_train=7, n_test=2, seed=2)
    monkeypatch.setenv("HDQT_DATA", f"{tmp_path / 'a'}:{tmp_path / 'b'}:{tmp_path / 'c'}")
    assert len(data.load("fashion_mnist")) == 7  # 'a' lacks it, 'b' has 5 + 2
    monkeypatch.setenv("HDQT_CACHE", str(tmp_path / "c"))  # the cache is searched last
    monkeypatch.setenv("HDQT_DATA", str(tmp_path / "a"))
    assert len(data.load("fashion_mnist")) == 9


def test_parsed_data_is_cached_and_refreshed_when_the_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("HDQT_CACHE", str(tmp_path / "cache"))
    write_cifar100(tmp_path / "cifar-100-python", n_train=6, n_test=3)
    first = data.load("cifar100", root=tmp_path)
    cached = list((tmp_path / "cache" / "parsed").glob("cifar100-*.npz"))
    assert len(cached) == 1
    again = data.load("cifar100", root=tmp_path)
    np.testing.assert_array_equal(first.x, again.x)
    write_cifar100(tmp_path / "cifar-100-python", n_train=4, n_test=3, seed=5)
    assert len(data.load("cifar100", root=tmp_path)) == 7


def test_digits_needs_no_files():
    ds = data.load("digits")
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert ds.class_names == [str(i) for i in range(10)] and ds.subject is None
    assert data.load("digits", features=False).x.shape == (1797, 1, 8, 8)


def test_hdqt_data_command_lists_every_dataset(tmp_path, capsys):
    write_cifar100(tmp_path / "cifar100", n_train=2, n_test=2)
    (tmp_path / "dsads" / "data" / "a01" / "p1").mkdir(parents=True)
    (tmp_path / "dsads" / "data" / "a01" / "p1" / "s01.txt").write_text("1" + ",1" * 44 + "\n")
    assert hdqt_main(["data", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in data.list_datasets():
        assert f"\n{name}:" in out
    assert f"cifar100: found in {tmp_path / 'cifar100'}" in out
    assert "hapt: NOT FOUND" in out and f"{tmp_path / 'hapt'}: no such folder" in out
    assert "holds 1 of the 9120 segment files" in out
    assert "digits: available" in out


def test_module_constants_cannot_be_changed_by_accident():
    from hdqt.data import cifar100, dsads, fashion_mnist, hapt, hapt_features, pamap2

    for sequence in (dsads.ACTIVITIES, dsads.CHANNEL_NAMES, hapt.ACTIVITIES, hapt.RAW_CHANNELS,
                     pamap2.CHANNEL_NAMES, pamap2.CHANNEL_COLUMNS, fashion_mnist.CLASS_NAMES,
                     hapt_features.TIME_SIGNALS, hapt_features.FEATURE_NAMES):
        assert isinstance(sequence, tuple)
    for mapping in (pamap2.ACTIVITY_NAMES, fashion_mnist._MAGIC):
        with pytest.raises(TypeError):
            mapping[99] = "changed"
    assert isinstance(cifar100._ArrayOnlyUnpickler._ALLOWED, frozenset)
    # the loaders still hand out plain lists, so a caller may edit its own copy
    assert isinstance(data.load("digits").class_names, list)


def test_dataset_info_gives_the_shape_and_classes_the_models_see():
    prepared = data.prepare("digits")
    info = data.dataset_info("digits")
    assert info.input_shape == prepared.input_shape and info.classes == 10
    assert {data.dataset_info(n).input_shape for n in ("dsads", "hapt", "pamap2")} == {(405,), (561,), (243,)}


def test_train_per_class_keeps_a_seeded_subset_of_each_class_and_the_whole_test_set():
    full = data.prepare("digits", seed=0)
    small = data.prepare("digits", seed=0, train_per_class=7)
    assert np.bincount(small.y_train).tolist() == [7] * 10
    np.testing.assert_array_equal(small.y_test, full.y_test)  # the test part is whole
    assert len(small.x_test) == len(full.x_test)
    again = data.prepare("digits", seed=0, train_per_class=7)
    np.testing.assert_array_equal(again.x_train, small.x_train)
    other = data.prepare("digits", seed=1, train_per_class=7)
    assert not np.array_equal(np.sort(other.y_train), np.sort(small.y_train)) or \
        not np.array_equal(other.x_train, small.x_train)
    # statistics of the samples kept, not of the whole training part
    assert not np.allclose(small.mean, full.mean)
    # more than a class holds keeps all of it
    assert len(data.prepare("digits", seed=0, train_per_class=10_000).y_train) == len(full.y_train)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="train_per_class must be None"):
            data.prepare("digits", train_per_class=bad)
