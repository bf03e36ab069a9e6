"""The per-channel feature extractor and the HAPT recipe."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hdqt.data.features import (
    BASIC_STATISTICS,
    EXTENDED_STATISTICS,
    channel_statistics,
    extended_statistics,
    feature_names,
)
from hdqt.data.hapt import window_starts
from hdqt.data.hapt_features import FEATURE_NAMES, derived_signals, window_features


def test_channel_statistics_match_reference_formulas():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, size=(6, 125, 4))  # skewed, so skewness/kurtosis are not ~0
    got = channel_statistics(x).reshape(6, 4, 9)  # channel-major layout
    reference = [
        x.mean(1), x.std(1), x.min(1), x.max(1), np.median(x, 1), np.ptp(x, 1),
        np.sqrt((x**2).mean(1)), stats.skew(x, axis=1), stats.kurtosis(x, axis=1),
    ]
    for k, ref in enumerate(reference):
        np.testing.assert_allclose(got[:, :, k], ref, rtol=1e-5, atol=1e-6, err_msg=BASIC_STATISTICS[k])


def test_extended_statistics_extra_columns():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 64, 2))
    got = extended_statistics(x).reshape(3, 2, 17)
    mad = np.median(np.abs(x - np.median(x, 1, keepdims=True)), 1)
    iqr = np.quantile(x, 0.75, axis=1) - np.quantile(x, 0.25, axis=1)
    np.testing.assert_allclose(got[:, :, 9], mad, rtol=1e-5)
    np.testing.assert_allclose(got[:, :, 10], iqr, rtol=1e-5)
    np.testing.assert_allclose(got[:, :, 14], np.argmax(x, 1) / 63, rtol=1e-6)
    np.testing.assert_allclose(got[:, :, 12], np.abs(np.diff(x, axis=1)).mean(1), rtol=1e-5)


def test_constant_channel_gives_zero_skew_and_kurtosis_not_nan():
    x = np.full((2, 50, 1), 3.0)
    feats = extended_statistics(x)
    assert np.isfinite(feats).all()
    basic = feats.reshape(2, 17)
    assert basic[0, 7] == 0 and basic[0, 8] == 0 and basic[0, 1] == 0


def test_feature_sizes_of_the_paper():
    assert channel_statistics(np.zeros((1, 125, 45))).shape == (1, 405)
    assert channel_statistics(np.zeros((1, 512, 27))).shape == (1, 243)
    assert len(feature_names(["a", "b"])) == 18 and feature_names(["a"])[0] == "a:mean"
    assert len(EXTENDED_STATISTICS) == 17
    assert len(FEATURE_NAMES) == 561 == len(set(FEATURE_NAMES))


def test_hapt_recipe_separates_gravity_and_gives_561_features():
    t = np.arange(1000) / 50.0
    gravity = np.array([0.0, 0.0, 1.0])
    motion = 0.2 * np.sin(2 * np.pi * 2.0 * t)  # 2 Hz body motion on x
    acc = gravity + np.stack([motion, 0 * t, 0 * t], axis=1)
    gyro = np.zeros((1000, 3))
    signals = derived_signals(acc, gyro)
    assert signals.shape == (1000, 20)
    middle = slice(200, 800)  # away from filter edges
    np.testing.assert_allclose(signals[middle, 5], 1.0, atol=1e-3)  # tGravityAcc-Z
    np.testing.assert_allclose(signals[middle, 0], motion[middle], atol=0.02)  # tBodyAcc-X
    windows = np.stack([signals[s:s + 128] for s in range(0, 800, 64)])
    feats = window_features(windows)
    assert feats.shape == (len(windows), 561) and np.isfinite(feats).all()
    # fBodyAcc-X dominant frequency: bin 2 Hz * 128 / 50 Hz = 5.12 -> bin 5, i.e. index 4 of bins 1..64
    argmax = FEATURE_NAMES.index("fBodyAcc-X:argmax")
    np.testing.assert_allclose(feats[3, argmax], 4 / 63, atol=1e-6)


@pytest.mark.parametrize(
    "start, end, expected",
    [(1, 127, []), (1, 128, [0]), (11, 330, [10, 74, 138, 202]), (101, 292, [100, 164])],
)
def test_hapt_windows_stay_inside_the_segment(start, end, expected):
    starts = window_starts(start, end)
    np.testing.assert_array_equal(starts, expected)
    assert all(s >= start - 1 and s + 128 <= end for s in starts)
