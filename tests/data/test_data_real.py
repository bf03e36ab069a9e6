"""Checks on the real datasets, in the roots of HDQT_DATA (which tests/conftest.py defaults to
../shared/data): skipped where absent, failed where CI=true and absent. Layout: docs/data.md."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from hdqt import data
from hdqt.data import DatasetNotFoundError
from hdqt.data import dsads as dsads_module
from hdqt.data.base import Located

# Real data: seconds each to read and window the archives, so `-m "not slow"` leaves them out too.
pytestmark = [pytest.mark.realdata, pytest.mark.slow]


EXCERPT = "dsads/uci-excerpt-s01-s03.tar.xz"


@pytest.fixture(scope="module")
def dsads_root(real_root):
    return real_root("dsads")


@pytest.fixture(scope="module")
def excerpt(real_root):
    return real_root(EXCERPT) / EXCERPT


def test_dsads_counts(dsads_root):
    ds = data.load("dsads", root=dsads_root)
    assert ds.x.shape == (9120, 405) and ds.x.dtype == np.float32 and np.isfinite(ds.x).all()
    assert ds.num_classes == 19 and np.array_equal(np.bincount(ds.y), np.full(19, 480))
    info = data.dataset_info("dsads")  # what `hdqt energy` builds its model from
    assert (info.input_shape, info.classes) == (ds.x.shape[1:], ds.num_classes)
    assert np.array_equal(np.unique(ds.subject), np.arange(1, 9))
    assert np.array_equal(np.bincount(ds.extra["segment"])[1:], np.full(60, 152))
    raw = data.load("dsads", root=dsads_root, features=False)
    assert raw.x.shape == (9120, 125, 45)
    # feature 0 is the mean of channel 0 (torso x acceleration) over the segment
    np.testing.assert_allclose(ds.x[:5, 0], raw.x[:5, :, 0].mean(axis=1), rtol=1e-4)


def test_dsads_uci_text_matches_npz_rows(real_root, excerpt):
    found = Located(excerpt.parent, (excerpt,), "archive")
    rows = list(dsads_module.iter_segments(found))
    assert len(rows) == 19 * 8 * 3
    with np.load(real_root("dsads/dsads.npz") / "dsads" / "dsads.npz") as npz:
        x, y, subject, segment = (npz[k] for k in ("x", "y", "subject", "segment"))
    # npz rows are ordered by activity, then subject, then segment
    for activity, subj, seg, text_values in rows:
        row = ((activity - 1) * 8 + (subj - 1)) * 60 + (seg - 1)
        assert (y[row], subject[row], segment[row]) == (activity - 1, subj, seg)
        # README tolerance: 5e-4 relative; float16 subnormals need a tiny absolute floor
        np.testing.assert_allclose(x[row].astype(np.float64), text_values, rtol=5e-4, atol=1e-7)


def test_dsads_excerpt_alone_is_reported_as_partial(excerpt, tmp_path, monkeypatch):
    (tmp_path / "dsads").mkdir()
    os.symlink(excerpt, tmp_path / "dsads" / excerpt.name)
    with pytest.raises(DatasetNotFoundError, match="holds 456 of the 9120 segment files"):
        data.load("dsads", root=tmp_path)
    # an excerpt in an earlier root does not hide the complete copy in a later one
    monkeypatch.setenv("HDQT_DATA", f"{tmp_path}:{excerpt.parents[1]}")
    assert len(data.load("dsads")) == 9120


def test_dsads_prepare_splits_by_subject(dsads_root):
    prepared = data.prepare("dsads", root=dsads_root, seed=0)
    assert len(prepared.test_subjects) == 2
    assert set(prepared.subject_test) == set(prepared.test_subjects)
    assert set(prepared.subject_train).isdisjoint(prepared.subject_test)  # no subject leaks
    assert len(prepared.y_test) == 2 * 19 * 60 and prepared.input_shape == (405,)
    assert prepared.default_backbone == "fcnet" and prepared.augment is None


@pytest.fixture(scope="module")
def hapt(real_root):
    root = real_root("hapt")
    return root, data.load("hapt", root=root)


def _hapt_labels(root) -> np.ndarray:
    for archive in sorted((root / "hapt").glob("*.tar*")):
        with tarfile.open(archive, mode="r|*") as tf:
            for member in tf:
                if member.name.endswith("RawData/labels.txt"):
                    return np.loadtxt(io.BytesIO(tf.extractfile(member).read()), dtype=np.int64)
    labels = next((root / "hapt").rglob("RawData/labels.txt"))
    return np.loadtxt(labels, dtype=np.int64)


@pytest.mark.slow
def test_hapt_counts(hapt):
    _, ds = hapt
    assert ds.x.shape == (10929, 561) and np.isfinite(ds.x).all()
    assert ds.num_classes == 12 and np.bincount(ds.y).min() > 0
    assert (data.dataset_info("hapt").input_shape, data.dataset_info("hapt").classes) == (ds.x.shape[1:], 12)
    assert np.array_equal(np.unique(ds.subject), np.arange(1, 31))
    assert len(np.unique(ds.extra["experiment"])) == 61


@pytest.mark.slow
def test_hapt_windows_lie_inside_labelled_segments(hapt):
    root, ds = hapt
    labels = _hapt_labels(root)
    expected_total = 0
    for exp, user, activity, start, end in labels:
        mine = (ds.extra["experiment"] == exp) & (ds.extra["start"] >= start - 1) & (ds.extra["start"] + 128 <= end)
        n = max(0, (end - start + 1 - 128) // 64 + 1)
        expected_total += n
        assert mine.sum() == n, f"labels row {(exp, user, activity, start, end)}"
        assert np.all(ds.y[mine] == activity - 1) and np.all(ds.subject[mine] == user)
    assert len(ds) == expected_total


@pytest.mark.slow
def test_hapt_raw_windows_and_subject_split(hapt):
    root, _ = hapt
    raw = data.load("hapt", root=root, features=False)
    assert raw.x.shape == (10929, 128, 6)
    prepared = data.prepare("hapt", root=root, seed=1)
    assert len(prepared.test_subjects) == 6 and prepared.input_shape == (561,)
    assert set(prepared.subject_train).isdisjoint(prepared.subject_test)  # no subject leaks
    assert len(set(prepared.subject_train)) == 24
    test_mask = np.isin(raw.subject, prepared.test_subjects)
    assert len(prepared.y_test) == test_mask.sum()


def test_fashion_mnist_counts(real_root):
    ds = data.load("fashion_mnist", root=real_root("fashion-mnist"))
    assert ds.x.shape == (70000, 1, 28, 28) and ds.x.dtype == np.uint8
    assert data.dataset_info("fashion_mnist").input_shape == ds.x.shape[1:]
    is_test = ds.split == "test"
    assert is_test.sum() == 10000
    assert np.array_equal(np.bincount(ds.y[~is_test]), np.full(10, 6000))
    assert np.array_equal(np.bincount(ds.y[is_test]), np.full(10, 1000))
