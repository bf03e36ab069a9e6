"""The HAPT feature recipe: 561 features per 128-sample window, from the raw signals.

The UCI release computes 561 features, but those files are often not at hand and the
exact code was never published. This recipe keeps the UCI *signals* (same names as
``features_info.txt``) and replaces the hand-picked per-signal variables by one uniform
set of 17 statistics, which gives the same size: 33 signals x 17 = 561.

1. Noise: median filter (3 samples) then 3rd-order Butterworth low-pass at 20 Hz,
   zero-phase, over each whole recording (so window edges see no filter transients).
2. Gravity: 3rd-order Butterworth low-pass at 0.3 Hz of the acceleration; body
   acceleration = acceleration - gravity.
3. Jerk: time derivative (``numpy.gradient`` x 50 Hz) of body acceleration and gyroscope.
4. Magnitudes: Euclidean norm of body acc, gravity, body acc jerk, gyro, gyro jerk.
   Steps 1-4 give 20 time-domain signals (``TIME_SIGNALS``), cut into the windows.
5. Spectra: per window, |rfft| / 128 of 13 of them (``FREQUENCY_SIGNALS``), bins 1..64
   (the DC bin is dropped: it duplicates the mean).
6. Per signal, the 17 ``EXTENDED_STATISTICS`` of hdqt/data/features.py, channel-major:
   feature ``s * 17 + k`` is statistic ``k`` of signal ``s`` (time signals first).
"""
from __future__ import annotations

import numpy as np

from hdqt.data.features import EXTENDED_STATISTICS, extended_statistics

SAMPLE_RATE = 50.0
TIME_SIGNALS = (
    *[f"tBodyAcc-{a}" for a in "XYZ"],
    *[f"tGravityAcc-{a}" for a in "XYZ"],
    *[f"tBodyAccJerk-{a}" for a in "XYZ"],
    *[f"tBodyGyro-{a}" for a in "XYZ"],
    *[f"tBodyGyroJerk-{a}" for a in "XYZ"],
    "tBodyAccMag", "tGravityAccMag", "tBodyAccJerkMag", "tBodyGyroMag", "tBodyGyroJerkMag",
)
# Which time signals get a spectrum, as in the UCI list (fBodyAcc-XYZ, ..., fBodyGyroJerkMag).
_SPECTRUM_OF = (0, 1, 2, 6, 7, 8, 9, 10, 11, 15, 17, 18, 19)
FREQUENCY_SIGNALS = tuple("f" + TIME_SIGNALS[i][1:] for i in _SPECTRUM_OF)
FEATURE_NAMES = tuple(
    f"{signal}:{stat}" for signal in TIME_SIGNALS + FREQUENCY_SIGNALS for stat in EXTENDED_STATISTICS
)


def derived_signals(acc: np.ndarray, gyro: np.ndarray) -> np.ndarray:
    """(L, 3) acceleration in g and (L, 3) angular velocity in rad/s -> (L, 20) ``TIME_SIGNALS``."""
    from scipy.signal import butter, medfilt, sosfiltfilt  # scipy comes with scikit-learn

    raw = np.concatenate([acc, gyro], axis=1).astype(np.float64)
    denoised = medfilt(raw, kernel_size=(3, 1))
    if len(raw) > 30:  # sosfiltfilt needs a few times the filter order of padding
        denoised = sosfiltfilt(butter(3, 20.0, fs=SAMPLE_RATE, output="sos"), denoised, axis=0)
        gravity = sosfiltfilt(butter(3, 0.3, fs=SAMPLE_RATE, output="sos"), denoised[:, :3], axis=0)
    else:
        gravity = np.repeat(denoised[:, :3].mean(axis=0, keepdims=True), len(raw), axis=0)
    body = denoised[:, :3] - gravity
    gyro_f = denoised[:, 3:]
    body_jerk = np.gradient(body, axis=0) * SAMPLE_RATE
    gyro_jerk = np.gradient(gyro_f, axis=0) * SAMPLE_RATE
    norms = [np.linalg.norm(s, axis=1, keepdims=True) for s in (body, gravity, body_jerk, gyro_f, gyro_jerk)]
    return np.concatenate([body, gravity, body_jerk, gyro_f, gyro_jerk, *norms], axis=1)


def window_features(windows: np.ndarray) -> np.ndarray:
    """(N, T, 20) windows of ``derived_signals`` -> (N, 561) float32 features."""
    if windows.ndim != 3 or windows.shape[2] != len(TIME_SIGNALS):
        raise ValueError(f"expected (N, T, {len(TIME_SIGNALS)}) windows, got {windows.shape}")
    t = windows.shape[1]
    spectra = np.abs(np.fft.rfft(windows[:, :, list(_SPECTRUM_OF)], axis=1))[:, 1:] / t
    return np.concatenate([extended_statistics(windows), extended_statistics(spectra)], axis=1)
