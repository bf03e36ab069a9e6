"""prepare(): subject split without leakage, train-only normalisation, seeded splits, augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hdqt_synth import pamap2_table, write_fashion_mnist, write_pamap2

from hdqt import data
from hdqt.data import Dataset
from hdqt.data.augment import RandomCropFlip
from hdqt.data.preparation import held_out_subjects, prepare_dataset


def _har(n_subjects: int = 10, per_subject: int = 30, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    subject = np.repeat(np.arange(1, n_subjects + 1), per_subject)
    # each subject has its own offset, so train-only statistics differ from global ones
    x = rng.normal(size=(len(subject), 5)) + subject[:, None] * np.arange(5)
    return Dataset(
        name="toy", x=x.astype(np.float32), y=rng.integers(0, 3, len(subject)),
        class_names=["a", "b", "c"], description="toy", subject=subject,
    )


def test_subject_split_has_no_leakage_and_holds_out_about_20_percent():
    ds = _har(n_subjects=10)
    prepared = prepare_dataset(ds, "fcnet", seed=3, clip=None)
    held = set(prepared.test_subjects)
    assert len(held) == 2
    assert len(prepared.x_test) == 2 * 30 and len(prepared.x_train) == 8 * 30
    # per-row subjects of the two parts, as prepare_dataset split them
    assert len(prepared.subject_train) == len(prepared.y_train)
    assert len(prepared.subject_test) == len(prepared.y_test)
    assert set(prepared.subject_test) == held
    assert held.isdisjoint(prepared.subject_train)
    assert set(prepared.subject_train) | held == set(ds.subject)
    # and each row kept its own subject: the offsets x = subject * (0..4) + noise say which
    mean = prepared.mean.astype(np.float64)
    raw_test = prepared.x_test * prepared.std + mean
    np.testing.assert_allclose(raw_test[:, 4] / 4, prepared.subject_test, atol=1.0)


def test_subject_split_is_seeded():
    subject = np.repeat(np.arange(1, 31), 3)
    a = held_out_subjects(subject, seed=7, test_fraction=0.2)
    np.testing.assert_array_equal(a, held_out_subjects(subject, seed=7, test_fraction=0.2))
    assert len(a) == 6
    others = {tuple(held_out_subjects(subject, seed=s, test_fraction=0.2)) for s in range(5)}
    assert len(others) > 1


def test_normalisation_is_fitted_on_train_only():
    ds = _har()
    prepared = prepare_dataset(ds, "fcnet", seed=0, clip=None)
    is_test = np.isin(ds.subject, prepared.test_subjects)
    raw_train, raw_test = ds.x[~is_test].astype(np.float64), ds.x[is_test].astype(np.float64)
    np.testing.assert_allclose(prepared.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(prepared.x_train.std(0), 1, atol=1e-4)
    expected = (raw_test - raw_train.mean(0)) / raw_train.std(0)
    np.testing.assert_allclose(prepared.x_test, expected, rtol=1e-4, atol=1e-4)
    assert abs(prepared.x_test[:, 4].mean()) > 0.1  # test subjects really differ


def test_feature_inputs_are_clipped_to_the_bound_and_images_are_not():
    ds = _har()
    ds.x[0, 0] = 1e4  # an outlier far beyond 3 standard deviations
    unclipped = prepare_dataset(ds, "fcnet", seed=0, clip=None)
    clipped = prepare_dataset(ds, "fcnet", seed=0)  # default bound: 3
    assert np.abs(unclipped.x_train).max() > 3
    assert np.abs(clipped.x_train).max() == pytest.approx(3.0)
    assert np.abs(clipped.x_test).max() <= 3.0
    inside = np.abs(unclipped.x_train) < 3
    np.testing.assert_array_equal(clipped.x_train[inside], unclipped.x_train[inside])
    with pytest.raises(ValueError, match="clip must be None or > 0"):
        prepare_dataset(ds, "fcnet", clip=0)


def test_raw_windows_are_normalised_per_channel():
    rng = np.random.default_rng(0)
    subject = np.repeat([1, 2, 3, 4, 5], 4)
    x = (rng.normal(size=(20, 16, 3)) * [1, 10, 100]).astype(np.float32)
    ds = Dataset("toy", x, np.zeros(20, np.int64), ["a"], "toy", subject=subject)
    prepared = prepare_dataset(ds, "fcnet", clip=None)  # the bound would change the std
    assert prepared.input_shape == (16, 3) and prepared.mean.shape == (1, 3)
    np.testing.assert_allclose(prepared.x_train.std(axis=(0, 1)), 1, atol=1e-4)


def test_digits_prepare_is_stratified_and_reproducible():
    a = data.prepare("digits", seed=1)
    b = data.prepare("digits", seed=1)
    c = data.prepare("digits", seed=2)
    assert a.input_shape == (64,) and a.default_backbone == "fcnet" and a.augment is None
    assert len(a.y_test) == 360 and a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)
    share = np.bincount(a.y_test, minlength=10) / np.bincount(np.concatenate([a.y_train, a.y_test]))
    assert np.all(np.abs(share - 0.2) < 0.02)


def test_image_prepare_keeps_the_own_split_and_attaches_augmentation(tmp_path):
    write_fashion_mnist(tmp_path / "fashion-mnist", n_train=12, n_test=6)
    prepared = data.prepare("fashion-mnist", root=tmp_path, test_fraction=0.5)
    assert prepared.x_train.shape == (12, 1, 28, 28) and prepared.x_test.shape == (6, 1, 28, 28)
    assert prepared.input_shape == (1, 28, 28) and prepared.default_backbone == "convnet"
    assert isinstance(prepared.augment, RandomCropFlip)
    np.testing.assert_allclose(prepared.x_train.mean(), 0, atol=1e-5)


def test_augmentation_can_be_switched_and_padded(tmp_path):
    write_fashion_mnist(tmp_path / "fashion-mnist", n_train=4, n_test=2)
    assert data.prepare("fashion_mnist", root=tmp_path, augment=False).augment is None
    padded = data.prepare("fashion_mnist", root=tmp_path, padding=2).augment
    assert isinstance(padded, RandomCropFlip) and padded.padding == 2
    assert data.prepare("digits", augment=None).augment is None  # default: images only
    with pytest.raises(ValueError, match="augment=True needs an image dataset"):
        data.prepare("digits", augment=True)
    with pytest.raises(ValueError, match="padding must be an integer"):
        data.prepare("fashion_mnist", root=tmp_path, padding=1.5)


def test_prepare_forwards_loader_arguments(tmp_path):
    for subject in (101, 102):
        write_pamap2(tmp_path / "pamap2" / "Protocol" / f"subject{subject}.dat",
                     pamap2_table([(4, 400)], seed=subject))
    prepared = data.prepare("pamap2", root=tmp_path, features=False, window=100, step=100, test_fraction=0.5)
    assert prepared.input_shape == (100, 27) and len(prepared.y_train) == len(prepared.y_test) == 4
    with pytest.raises(TypeError, match="unexpected"):
        data.prepare("digits", window=100)


def test_invalid_test_fraction_is_rejected():
    with pytest.raises(ValueError, match="test_fraction"):
        prepare_dataset(_har(), "fcnet", test_fraction=1.0)


def test_augment_crops_and_flips_reproducibly():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    augment = RandomCropFlip(padding=2)
    out1 = augment(x, torch.Generator().manual_seed(0))
    out2 = augment(x, torch.Generator().manual_seed(0))
    assert out1.shape == x.shape
    assert torch.equal(out1, out2)
    # every output is a shifted (zero-filled) and possibly mirrored window of its own image
    for i in range(2):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        candidates = [
            view
            for dy in range(5)
            for dx in range(5)
            for view in (padded[:, dy:dy + 8, dx:dx + 8], padded[:, dy:dy + 8, dx:dx + 8].flip(-1))
        ]
        assert any(torch.equal(out1[i], c) for c in candidates)
    outs = {tuple(augment(x, torch.Generator().manual_seed(s))[0].flatten().tolist()) for s in range(8)}
    assert len(outs) > 1


def test_augment_without_padding_only_flips():
    x = torch.randn(16, 1, 4, 4)
    out = RandomCropFlip(padding=0)(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
