"""Per-channel statistical features for HAR windows.

``channel_statistics`` is the extractor used for DSADS (45 channels -> 405) and
PAMAP2 (27 channels -> 243): 9 statistics per channel, laid out channel-major,
i.e. feature ``c * 9 + s`` is statistic ``s`` of channel ``c``.

``extended_statistics`` adds 8 more statistics (17 per channel); the HAPT recipe
(hdqt/data/hapt_features.py) applies it to 33 derived channels -> 561 features.
All statistics are computed in float64 and returned as float32.
"""
from __future__ import annotations

import numpy as np

BASIC_STATISTICS = (
    "mean", "std", "min", "max", "median", "range", "rms", "skewness", "kurtosis",
)
EXTRA_STATISTICS = (
    "mad",  # median absolute deviation from the median
    "iqr",  # interquartile range, q75 - q25
    "entropy",  # Shannon entropy of |x| normalised to sum 1 (spectral entropy on spectra)
    "mean_abs_diff",  # mean |x[t+1] - x[t]|: how rough the signal is
    "autocorr1",  # lag-1 autocorrelation
    "argmax",  # position of the maximum in [0, 1] (dominant frequency on spectra)
    "centroid",  # |x|-weighted mean position in [0, 1] (mean frequency on spectra)
    "mean_crossings",  # fraction of consecutive samples that cross the mean
)
EXTENDED_STATISTICS = BASIC_STATISTICS + EXTRA_STATISTICS

_EPS = 1e-12


def channel_statistics(windows: np.ndarray) -> np.ndarray:
    """(N, T, C) windows -> (N, 9 * C) features: the 9 ``BASIC_STATISTICS`` per channel."""
    x = _as_ntc(windows)
    return _stack(_basic(x, np.sort(x, axis=1)))


def extended_statistics(windows: np.ndarray) -> np.ndarray:
    """(N, T, C) windows -> (N, 17 * C) features: ``EXTENDED_STATISTICS`` per channel."""
    x = _as_ntc(windows)
    ordered = np.sort(x, axis=1)
    stats = _basic(x, ordered)
    stats += _extra(x, ordered, stats[4])
    return _stack(stats)


def feature_names(channel_names: list[str], statistics: tuple[str, ...] = BASIC_STATISTICS) -> list[str]:
    """Names matching the channel-major layout, e.g. ``"T_xacc:mean"``."""
    return [f"{c}:{s}" for c in channel_names for s in statistics]


def _as_ntc(windows: np.ndarray) -> np.ndarray:
    x = np.asarray(windows, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"windows must have shape (N, T, C), got {x.shape}")
    if x.shape[1] < 2:
        raise ValueError(f"windows need at least 2 time steps, got T={x.shape[1]}")
    return x


def _basic(x: np.ndarray, ordered: np.ndarray) -> list[np.ndarray]:
    mean = x.mean(axis=1)
    centred = x - mean[:, None, :]
    c2 = centred * centred  # products, not **: float powers are ~10x slower
    var = c2.mean(axis=1)
    std = np.sqrt(var)
    lo, hi = ordered[:, 0], ordered[:, -1]
    median = _sorted_median(ordered)
    rms = np.sqrt((x * x).mean(axis=1))
    flat = var < _EPS  # constant channel: define skewness and kurtosis as 0, not NaN
    safe_var = np.where(flat, 1.0, var)
    skew = np.where(flat, 0.0, (c2 * centred).mean(axis=1) / (safe_var * np.sqrt(safe_var)))
    kurt = np.where(flat, 0.0, (c2 * c2).mean(axis=1) / (safe_var * safe_var) - 3.0)  # excess
    return [mean, std, lo, hi, median, hi - lo, rms, skew, kurt]


def _sorted_median(ordered: np.ndarray) -> np.ndarray:
    t = ordered.shape[1]
    return 0.5 * (ordered[:, (t - 1) // 2] + ordered[:, t // 2])


def _extra(x: np.ndarray, ordered: np.ndarray, median: np.ndarray) -> list[np.ndarray]:
    t = x.shape[1]
    mad = _sorted_median(np.sort(np.abs(x - median[:, None, :]), axis=1))
    q25, q75 = (_sorted_quantile(ordered, q) for q in (0.25, 0.75))
    mag = np.abs(x)
    total = mag.sum(axis=1)
    p = mag / np.where(total < _EPS, 1.0, total)[:, None, :]
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    diffs = np.diff(x, axis=1)
    mean_abs_diff = np.abs(diffs).mean(axis=1)
    centred = x - x.mean(axis=1, keepdims=True)
    denom = (centred * centred).sum(axis=1)
    lag1 = (centred[:, 1:] * centred[:, :-1]).sum(axis=1)
    autocorr = np.where(denom < _EPS, 0.0, lag1 / np.where(denom < _EPS, 1.0, denom))
    positions = np.arange(t, dtype=np.float64)[None, :, None] / (t - 1)
    argmax = np.argmax(x, axis=1) / (t - 1)
    centroid = np.where(total < _EPS, 0.0, (p * positions).sum(axis=1))
    signs = np.signbit(centred)
    crossings = (signs[:, 1:] != signs[:, :-1]).mean(axis=1)
    return [mad, q75 - q25, entropy, mean_abs_diff, autocorr, argmax, centroid, crossings]


def _sorted_quantile(ordered: np.ndarray, q: float) -> np.ndarray:
    # numpy's default ("linear") quantile, read off an already sorted axis
    pos = q * (ordered.shape[1] - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, ordered.shape[1] - 1)
    return ordered[:, lo] + (pos - lo) * (ordered[:, hi] - ordered[:, lo])


def _stack(stats: list[np.ndarray]) -> np.ndarray:
    # (N, C) each -> (N, C, S) -> (N, C * S): channel-major layout
    return np.stack(stats, axis=2).reshape(stats[0].shape[0], -1).astype(np.float32)
