"""UCI Daily and Sports Activities (DSADS).

Accepted layouts in ``<root>/dsads/``, first match wins:

1. ``dsads.npz`` with arrays ``x`` (9120, 125, 45) float16, ``y`` 0..18, ``subject`` 1..8,
   ``segment`` 1..60 (the layout of the project's shared copy);
2. the UCI text tree ``data/aNN/pN/sNN.txt`` (or ``aNN/pN/sNN.txt`` directly);
3. an archive of that tree: ``*.tar``, ``*.tar.gz``, ``*.tar.xz`` or ``*.zip``, read in place.

Text and archives are parsed once into an npz of layout 1 in the cache, so both routes
give the same arrays (float16 signal, as the shared copy).
"""
from __future__ import annotations

import re
import tarfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from hdqt.data.base import Dataset, DatasetSource, Located
from hdqt.data.errors import DatasetFormatError, DatasetNotFoundError
from hdqt.data.features import channel_statistics
from hdqt.data.paths import cached_arrays, fingerprint
from hdqt.data.text import parse_table

URL = "https://archive.ics.uci.edu/dataset/256/daily+and+sports+activities"
N_ACTIVITIES, N_SUBJECTS, N_SEGMENTS = 19, 8, 60
SAMPLES, CHANNELS = 125, 45  # 5 s at 25 Hz; 5 units x (acc, gyro, mag) x (x, y, z)

ACTIVITIES = [
    "sitting", "standing", "lying on back", "lying on right side", "ascending stairs",
    "descending stairs", "standing in an elevator", "moving around in an elevator",
    "walking in a parking lot", "walking on a treadmill (4 km/h, flat)",
    "walking on a treadmill (4 km/h, 15 deg incline)", "running on a treadmill (8 km/h)",
    "exercising on a stepper", "exercising on a cross trainer",
    "cycling on an exercise bike (horizontal)", "cycling on an exercise bike (vertical)",
    "rowing", "jumping", "playing basketball",
]
# Column order of the UCI text files: torso, right arm, left arm, right leg, left leg.
CHANNEL_NAMES = [
    f"{unit}_{axis}{sensor}"
    for unit in ("T", "RA", "LA", "RL", "LL")
    for sensor in ("acc", "gyro", "mag")
    for axis in "xyz"
]
DESCRIPTION = (
    "UCI Daily and Sports Activities: 19 activities x 8 subjects x 60 segments of 5 s "
    "(125 samples at 25 Hz, 45 channels)."
)

_SEGMENT_PATH = re.compile(r"(?:^|/)a(\d\d)/p(\d)/s(\d\d)\.txt$")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".zip")
_EXPECTED_FILES = N_ACTIVITIES * N_SUBJECTS * N_SEGMENTS


def _probe(folder: Path) -> Located | str | None:
    npz = folder / "dsads.npz"
    if npz.is_file():
        return Located(folder, (npz,), "npz")
    for tree in (folder / "data", folder):
        files = sorted(tree.glob("a[0-9][0-9]/p[0-9]/s[0-9][0-9].txt"))
        if len(files) == _EXPECTED_FILES:
            return Located(folder, tuple(files), "text")
        if files:
            return (
                f"{tree} holds {len(files)} of the {_EXPECTED_FILES} segment files "
                "aNN/pN/sNN.txt (an excerpt?)"
            )
    # Archives are only opened when parsed (listing an .xz costs as much as reading it);
    # the parsed arrays are cached, so that happens once.
    for archive in sorted(folder.iterdir()):
        if archive.is_file() and archive.name.endswith(_ARCHIVE_SUFFIXES):
            return Located(folder, (archive,), "archive")
    return None


SOURCE = DatasetSource(
    name="dsads",
    subfolders=("dsads",),
    expected=(
        "dsads.npz, or the UCI text files data/aNN/pN/sNN.txt for a01..a19, p1..p8, "
        "s01..s60 (9120 files), or an archive (.zip/.tar.*) of them"
    ),
    url=URL,
    probe=_probe,
)


def load(root=None, features: bool = True, **kwargs) -> Dataset:
    """DSADS as 405 features (9 statistics x 45 channels) or raw windows (N, 125, 45)."""
    if kwargs:
        raise TypeError(f"dsads: unexpected arguments {sorted(kwargs)}")
    found = SOURCE.locate(root)
    key = fingerprint(found.files, found.layout)

    def read_raw() -> dict[str, np.ndarray]:
        if found.layout == "npz":
            return _read_npz(found.files[0])
        return cached_arrays("dsads", key, lambda: parse_uci(found))

    if features:
        # The feature cache carries the labels too, so a warm load never touches the signal.
        def build() -> dict[str, np.ndarray]:
            raw = read_raw()
            return {**{k: raw[k] for k in ("y", "subject", "segment")}, "x": channel_statistics(raw["x"])}

        arrays = cached_arrays("dsads-features", key, build, keys=("x", "y", "subject", "segment"))
    else:
        arrays = read_raw()
    return Dataset(
        name="dsads",
        x=arrays["x"].astype(np.float32),
        y=arrays["y"].astype(np.int64),
        class_names=list(ACTIVITIES),
        description=DESCRIPTION,
        subject=arrays["subject"].astype(np.int64),
        extra={"segment": arrays["segment"].astype(np.int64)},
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in ("x", "y", "subject", "segment")}
    except KeyError as exc:
        raise DatasetFormatError(path, f"missing array {exc}; expected x, y, subject, segment") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetFormatError(path, f"not a readable npz archive ({exc})") from None
    n = len(raw["x"])
    if raw["x"].shape[1:] != (SAMPLES, CHANNELS) or any(len(v) != n for v in raw.values()):
        raise DatasetFormatError(
            path, f"x must be (N, {SAMPLES}, {CHANNELS}) with y, subject, segment of length N"
        )
    return raw


def parse_uci(found: Located, allow_partial: bool = False) -> dict[str, np.ndarray]:
    """Parse the UCI segment files into the dsads.npz layout, ordered by activity, subject, segment."""
    rows = sorted(iter_segments(found), key=lambda r: r[:3])
    if not allow_partial and len(rows) != _EXPECTED_FILES:
        where = found.files[0] if found.layout == "archive" else found.folder
        raise DatasetNotFoundError(
            "dsads", SOURCE.expected, [found.folder], URL,
            [f"{where} holds {len(rows)} of the {_EXPECTED_FILES} segment files (an excerpt?)"],
        )
    return {
        "x": np.stack([r[3] for r in rows]).astype(np.float16),
        "y": np.array([r[0] - 1 for r in rows], dtype=np.int16),
        "subject": np.array([r[1] for r in rows], dtype=np.int16),
        "segment": np.array([r[2] for r in rows], dtype=np.int16),
    }


def iter_segments(found: Located) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Yield (activity 1..19, subject 1..8, segment 1..60, float64 (125, 45) signal) per file."""
    if found.layout == "text":
        for path in found.files:
            yield (*_ids(str(path)), _parse_segment(path.read_bytes(), str(path)))
        return
    for label, data in _iter_archive(found.files[0]):
        yield (*_ids(label), _parse_segment(data, label))


def _ids(name: str) -> tuple[int, int, int]:
    a, p, s = _SEGMENT_PATH.search(name.replace("\\", "/")).groups()
    return int(a), int(p), int(s)


def _parse_segment(data: bytes, label: str) -> np.ndarray:
    return parse_table(data, label, n_cols=CHANNELS, delimiter=",", n_rows=SAMPLES)


def _iter_archive(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(label 'archive:member', bytes) for each segment file, streaming through the archive."""
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if _SEGMENT_PATH.search(name):
                        yield f"{archive}:{name}", zf.read(name)
            return
        with tarfile.open(archive, mode="r|*") as tf:  # stream: xz has no random access
            for member in tf:
                if member.isfile() and _SEGMENT_PATH.search(member.name):
                    yield f"{archive}:{member.name}", tf.extractfile(member).read()
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetFormatError(archive, f"cannot read the archive ({exc})") from None
