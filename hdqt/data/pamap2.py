"""PAMAP2 Physical Activity Monitoring, protocol recordings.

Looks in ``<root>/pamap2/`` for ``Protocol/subjectNNN.dat`` (also inside
``PAMAP2_Dataset/``, as the UCI zip extracts). Each file: whitespace-separated, 54
columns at 100 Hz: timestamp, activity id, heart rate, then 3 IMUs (hand, chest,
ankle) of 17 columns each (temperature, acc +-16 g xyz, acc +-6 g xyz, gyro xyz,
magnetometer xyz, 4 invalid orientation values); the probe checks the first row of each
file, so a malformed copy is skipped. Fewer files than the 9 protocol subjects
(101..109) still load; ``hdqt data`` and the dataset's ``description`` call the copy partial.

- Channels: the 27 IMU channels acc +-16 g, gyro and magnetometer (x, y, z) of each IMU
  (temperature, the saturating +-6 g accelerometer, orientation and heart rate are unused).
- Activity 0 (transient) is dropped. Ids map to 0..K-1 in increasing id order over the
  activities present (the 12 protocol activities give K = 12).
- Windows: ``window`` samples (default 512 = 5.12 s) with step ``step`` (default 256),
  cut inside runs of consecutive rows with the same activity.
- NaN gaps (wireless drop-outs): a window is dropped if any channel misses more than
  ``max_missing`` (default 10%) of its samples; otherwise gaps are filled by linear
  interpolation in time within the run (constant at the run's ends).
- Features: 9 statistics x 27 channels = 243 (hdqt/data/features.py).
"""
from __future__ import annotations

import re
from numbers import Integral, Real
from pathlib import Path
from types import MappingProxyType

import numpy as np

from hdqt.data.base import Dataset, DatasetSource, Located
from hdqt.data.errors import DatasetFormatError
from hdqt.data.features import channel_statistics
from hdqt.data.paths import cached_arrays, fingerprint
from hdqt.data.text import check_head, parse_table, row_lines

URL = "https://archive.ics.uci.edu/dataset/231/pamap2+physical+activity+monitoring"
N_COLUMNS = 54
ACTIVITY_NAMES = MappingProxyType({
    1: "lying", 2: "sitting", 3: "standing", 4: "walking", 5: "running", 6: "cycling",
    7: "Nordic walking", 9: "watching TV", 10: "computer work", 11: "car driving",
    12: "ascending stairs", 13: "descending stairs", 16: "vacuum cleaning", 17: "ironing",
    18: "folding laundry", 19: "house cleaning", 20: "playing soccer", 24: "rope jumping",
})
_IMU_FIRST_COLUMN = MappingProxyType({"hand": 3, "chest": 20, "ankle": 37})  # 0-based column of temperature
# offsets inside one IMU block: acc16 xyz at +1..+3, gyro xyz at +7..+9, mag xyz at +10..+12
_SENSOR_OFFSETS = MappingProxyType({"acc": 1, "gyro": 7, "mag": 10})
CHANNEL_NAMES = tuple(
    f"{imu}_{sensor}_{axis}" for imu in _IMU_FIRST_COLUMN for sensor in _SENSOR_OFFSETS for axis in "xyz"
)
CHANNEL_COLUMNS = tuple(
    first + offset + k
    for first in _IMU_FIRST_COLUMN.values()
    for offset in _SENSOR_OFFSETS.values()
    for k in range(3)
)
PROTOCOL_SUBJECTS = tuple(range(101, 110))
DESCRIPTION = (
    "PAMAP2 protocol: 9 subjects, 12 activities, 3 IMUs (hand, chest, ankle) at 100 Hz; "
    "27 channels (acc, gyro, mag)."
)
_SUBJECT_FILE = re.compile(r"^subject(\d+)\.dat$")


def _probe(folder: Path) -> Located | None:
    """The first Protocol/ folder with subject files; raises DatasetFormatError if one of them
    is empty or its first row is not 54 numbers."""
    for protocol in (folder / "Protocol", folder / "PAMAP2_Dataset" / "Protocol"):
        files = sorted(p for p in protocol.glob("subject*.dat") if _SUBJECT_FILE.match(p.name))
        if files:
            for path in files:  # cheap: the first row of each (all rows are checked when loaded)
                check_head(path, str(path), n_cols=N_COLUMNS)
            present = {int(_SUBJECT_FILE.match(p.name).group(1)) for p in files}
            missing = [s for s in PROTOCOL_SUBJECTS if s not in present]
            # what is there still loads (e.g. a quick look at one subject), flagged as partial
            partial = (
                f"{len(PROTOCOL_SUBJECTS) - len(missing)} of the {len(PROTOCOL_SUBJECTS)} protocol subjects "
                f"(missing {', '.join(f'subject{s}.dat' for s in missing)})"
                if missing else ""
            )
            return Located(protocol, tuple(files), "protocol", partial)
    return None


SOURCE = DatasetSource(
    name="pamap2",
    subfolders=("pamap2",),
    expected="Protocol/subjectNNN.dat (whitespace-separated, 54 columns), optionally inside PAMAP2_Dataset/",
    url=URL,
    probe=_probe,
)


def load(
    root=None, features: bool = True, window: int = 512, step: int = 256, max_missing: float = 0.1
) -> Dataset:
    """PAMAP2 as 243 features or raw (N, window, 27) windows; subject = file number (101..109).

    A copy with fewer than the 9 protocol subjects loads what is there; ``description`` says so.
    """
    window, step = _integer(window, "window", 2), _integer(step, "step", 1)
    if isinstance(max_missing, bool) or not isinstance(max_missing, Real) or not 0.0 <= max_missing < 1.0:
        raise ValueError(f"pamap2: max_missing must be a number in [0, 1), got {max_missing!r}")
    found = SOURCE.locate(root)
    key = fingerprint(found.files, window, step, max_missing)
    raw = cached_arrays("pamap2", key, lambda: parse(found, window, step, max_missing))
    if len(raw["activity"]) == 0:
        raise DatasetFormatError(found.folder, f"no complete {window}-sample window of a labelled activity")
    ids = np.unique(raw["activity"])
    x = (
        cached_arrays("pamap2-features", key, lambda: {"x": channel_statistics(raw["x"])})["x"]
        if features
        else raw["x"]
    )
    return Dataset(
        name="pamap2",
        x=x,
        y=np.searchsorted(ids, raw["activity"]).astype(np.int64),
        class_names=[ACTIVITY_NAMES[int(i)] for i in ids],
        description=f"{DESCRIPTION} Partial copy: {found.partial}." if found.partial else DESCRIPTION,
        subject=raw["subject"],
        extra={"activity_id": raw["activity"]},
    )


def _integer(value, name: str, minimum: int) -> int:
    """``value`` as an int >= minimum; a float such as 10.5 would index windows wrongly."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"pamap2: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def parse(found: Located, window: int, step: int, max_missing: float) -> dict[str, np.ndarray]:
    xs, activities, subjects = [], [], []
    for path in found.files:
        data = path.read_bytes()
        table = parse_table(data, str(path), n_cols=N_COLUMNS)  # NaN allowed: wireless drop-outs
        activity = _activity_column(table, path, data)
        subject = int(_SUBJECT_FILE.match(path.name).group(1))
        signal = table[:, list(CHANNEL_COLUMNS)]
        for begin, end in _runs(activity):
            if activity[begin] == 0:
                continue
            windows = _cut_run(signal[begin:end], window, step, max_missing)
            xs.append(windows)
            activities.append(np.full(len(windows), activity[begin], dtype=np.int64))
            subjects.append(np.full(len(windows), subject, dtype=np.int64))
    empty = np.zeros((0, window, len(CHANNEL_COLUMNS)), dtype=np.float32)
    return {
        "x": np.concatenate([empty, *xs]).astype(np.float32),
        "activity": np.concatenate([np.zeros(0, np.int64), *activities]),
        "subject": np.concatenate([np.zeros(0, np.int64), *subjects]),
    }


def _activity_column(table: np.ndarray, path: Path, data: bytes) -> np.ndarray:
    column = table[:, 1]
    bad = ~np.isin(column, [0, *ACTIVITY_NAMES])
    if bad.any():
        row = int(np.argmax(bad))
        raise DatasetFormatError(
            path, f"activity id {column[row]:g} is not 0 or one of {sorted(ACTIVITY_NAMES)}",
            line=int(row_lines(data)[row]),
        )
    return column.astype(np.int64)


def _runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """[begin, end) of each run of equal consecutive labels."""
    edges = np.flatnonzero(np.diff(labels)) + 1
    bounds = np.concatenate([[0], edges, [len(labels)]])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _cut_run(signal: np.ndarray, window: int, step: int, max_missing: float) -> np.ndarray:
    if len(signal) < window:
        return np.zeros((0, window, signal.shape[1]), dtype=np.float32)
    missing = np.isnan(signal)
    filled = signal.copy()
    t = np.arange(len(signal))
    for c in range(signal.shape[1]):
        ok = ~missing[:, c]
        if ok.any() and not ok.all():
            filled[~ok, c] = np.interp(t[~ok], t[ok], signal[ok, c])
        elif not ok.any():
            filled[:, c] = 0.0  # such windows are dropped below (100% missing)
    starts = np.arange(0, len(signal) - window + 1, step)
    index = starts[:, None] + np.arange(window)[None, :]
    keep = missing[index].mean(axis=1).max(axis=1) <= max_missing
    return filled[index[keep]].astype(np.float32)
