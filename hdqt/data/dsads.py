"""UCI Daily and Sports Activities (DSADS).

Accepted layouts in ``<root>/dsads/``, first match wins:

1. ``dsads.npz`` with arrays ``x`` (9120, 125, 45) float16, ``y`` 0..18, ``subject`` 1..8,
   ``segment`` 1..60 (the layout of the project's shared copy); checked from the .npy headers
   and the id arrays, without reading the signal; fewer segments: a partial copy;
2. the UCI text tree ``data/aNN/pN/sNN.txt`` (or ``aNN/pN/sNN.txt`` directly);
3. an archive of that tree: ``*.tar``, ``*.tar.gz``, ``*.tar.xz`` or ``*.zip``, read in place;
   its member list must name all 9120 files (an excerpt is reported, not loaded).

File names must carry valid ids (a01..a19, p1..p8, s01..s60), each at most once, and
every value must be a finite number.

Text and archives are parsed once into an npz of layout 1 in the cache, so both routes
give the same arrays (float16 signal, as the shared copy).
"""
from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import Iterator

import numpy as np

from hdqt.data.archives import archive_problem, archives_in, iter_members
from hdqt.data.base import Dataset, DatasetSource, Located
from hdqt.data.errors import DatasetFormatError, DatasetNotFoundError
from hdqt.data.features import channel_statistics
from hdqt.data.paths import cached_arrays, fingerprint
from hdqt.data.text import check_head, parse_table

URL = "https://archive.ics.uci.edu/dataset/256/daily+and+sports+activities"
N_ACTIVITIES, N_SUBJECTS, N_SEGMENTS = 19, 8, 60
SAMPLES, CHANNELS = 125, 45  # 5 s at 25 Hz; 5 units x (acc, gyro, mag) x (x, y, z)

ACTIVITIES = (
    "sitting", "standing", "lying on back", "lying on right side", "ascending stairs",
    "descending stairs", "standing in an elevator", "moving around in an elevator",
    "walking in a parking lot", "walking on a treadmill (4 km/h, flat)",
    "walking on a treadmill (4 km/h, 15 deg incline)", "running on a treadmill (8 km/h)",
    "exercising on a stepper", "exercising on a cross trainer",
    "cycling on an exercise bike (horizontal)", "cycling on an exercise bike (vertical)",
    "rowing", "jumping", "playing basketball",
)
# Column order of the UCI text files: torso, right arm, left arm, right leg, left leg.
CHANNEL_NAMES = tuple(
    f"{unit}_{axis}{sensor}"
    for unit in ("T", "RA", "LA", "RL", "LL")
    for sensor in ("acc", "gyro", "mag")
    for axis in "xyz"
)
DESCRIPTION = (
    "UCI Daily and Sports Activities: 19 activities x 8 subjects x 60 segments of 5 s "
    "(125 samples at 25 Hz, 45 channels)."
)

_SEGMENT_PATH = re.compile(r"(?:^|/)a(\d\d)/p(\d)/s(\d\d)\.txt$")
_EXPECTED_FILES = N_ACTIVITIES * N_SUBJECTS * N_SEGMENTS


def _probe(folder: Path) -> Located | str | None:
    npz = folder / "dsads.npz"
    if npz.is_file():
        return _probe_npz(npz)  # raises DatasetFormatError for a malformed file
    notes = []
    for tree in (folder / "data", folder):
        files = sorted(tree.glob("a[0-9][0-9]/p[0-9]/s[0-9][0-9].txt"))
        if files:
            _check_tree(files)
            problem = _coverage_problem([str(f) for f in files], str(tree))
            if problem is None:
                return Located(folder, tuple(files), "text")
            notes.append(problem)
            break
    for archive in archives_in(folder):
        problem = archive_problem("dsads", archive, _archive_coverage, _EXPECTED_FILES)
        if problem is None:
            return Located(folder, (archive,), "archive")
        notes.append(problem)
    return "; ".join(notes) or None


_NPZ_ARRAYS = ("x", "y", "subject", "segment")
_ID_RANGES = MappingProxyType({"y": (0, N_ACTIVITIES - 1), "subject": (1, N_SUBJECTS), "segment": (1, N_SEGMENTS)})


def _probe_npz(path: Path) -> Located:
    """Check dsads.npz without reading the signal: the names, shapes and dtypes of the four
    arrays (from their .npy headers), and the values of the three small id arrays (ranges, no
    segment twice). A copy lacking segments loads, reported as partial."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {name.removesuffix(".npy"): name for name in zf.namelist() if name.endswith(".npy")}
            missing = [a for a in _NPZ_ARRAYS if a not in members]
            if missing:
                raise DatasetFormatError(path, _missing_arrays(missing, members))
            headers = {}
            for a in _NPZ_ARRAYS:
                with zf.open(members[a]) as f:
                    headers[a] = _npy_header(f)
            n = _check_npz_headers(path, headers)
            ids = {}
            for a in _ID_RANGES:
                with zf.open(members[a]) as f:
                    ids[a] = np.lib.format.read_array(f, allow_pickle=False)
    except DatasetFormatError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetFormatError(path, f"not a readable npz archive ({exc})") from None
    for a, (low, high) in _ID_RANGES.items():
        outside = (ids[a] < low) | (ids[a] > high)
        if outside.any():
            raise DatasetFormatError(path, f"array {a!r} holds {ids[a][outside][0]}, outside {low}..{high}")
    key = (ids["y"].astype(np.int64) * N_SUBJECTS + ids["subject"] - 1) * N_SEGMENTS + ids["segment"] - 1
    order = np.argsort(key, kind="stable")
    twice = np.flatnonzero(np.diff(key[order]) == 0)
    if len(twice):
        first, second = sorted(order[twice[0]: twice[0] + 2].tolist())
        name = "a{:02d}/p{}/s{:02d}".format(ids["y"][first] + 1, ids["subject"][first], ids["segment"][first])
        raise DatasetFormatError(path, f"segment {name} appears in rows {first} and {second}")
    partial = (
        f"{n} of the {_EXPECTED_FILES} segments (a01..a19 x p1..p8 x s01..s60)" if n < _EXPECTED_FILES else ""
    )
    return Located(path.parent, (path,), "npz", partial)


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of a .npy stream, without reading its data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    return shape, dtype


def _check_npz_headers(path: Path, headers: dict[str, tuple]) -> int:
    """The number of rows, after checking the shapes and dtypes of the four arrays."""
    shape, dtype = headers["x"]
    if len(shape) != 3 or shape[1:] != (SAMPLES, CHANNELS):
        raise DatasetFormatError(path, f"array 'x' has shape {shape}, expected (N, {SAMPLES}, {CHANNELS})")
    if dtype.kind != "f":
        raise DatasetFormatError(path, f"array 'x' has dtype {dtype}, expected floating point")
    n = shape[0]
    if n == 0:
        raise DatasetFormatError(path, "array 'x' holds no rows")
    for a in _ID_RANGES:
        shape, dtype = headers[a]
        if shape != (n,):
            raise DatasetFormatError(path, f"array {a!r} has shape {shape}, expected ({n},) (one value per row of x)")
        if dtype.kind not in "iu":
            raise DatasetFormatError(path, f"array {a!r} has dtype {dtype}, expected integers")
    return n


def _missing_arrays(missing: list[str], present) -> str:
    found = ", ".join([a for a in _NPZ_ARRAYS if a in present] + sorted(set(present) - set(_NPZ_ARRAYS)))
    return (
        f"missing array{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
        f"expected arrays {', '.join(_NPZ_ARRAYS)} (found {found or 'none'})"
    )


def _check_tree(files: list[Path]) -> None:
    """Cheap checks of a UCI text tree: valid ids in every file name, no empty file, and a first
    row of 45 comma-separated numbers in the first file (all rows are checked when loaded)."""
    for path in files:
        _ids(str(path))
        if path.stat().st_size == 0:
            raise DatasetFormatError(path, "the file holds no data rows", line=1)
    check_head(files[0], str(files[0]), CHANNELS, ",")


def _archive_coverage(archive: Path) -> str | None:
    return _coverage_problem([name for name, _ in iter_members(archive)], str(archive))


def _coverage_problem(names: list[str], where: str) -> str | None:
    """None if ``names`` hold every segment file once or more, else how many they hold."""
    ids = set()
    for name in names:
        match = _SEGMENT_PATH.search(name.replace("\\", "/"))
        if match and _ids_problem(*map(int, match.groups())) is None:
            ids.add(match.groups())
    if len(ids) == _EXPECTED_FILES:
        return None
    return f"{where} holds {len(ids)} of the {_EXPECTED_FILES} segment files aNN/pN/sNN.txt (an excerpt?)"


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
        description=f"{DESCRIPTION} Partial copy: {found.partial}." if found.partial else DESCRIPTION,
        subject=arrays["subject"].astype(np.int64),
        extra={"segment": arrays["segment"].astype(np.int64)},
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of a dsads.npz that ``_probe_npz`` accepted; the signal must be finite."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [a for a in _NPZ_ARRAYS if a not in npz.files]
            if missing:
                raise DatasetFormatError(path, _missing_arrays(missing, npz.files))
            raw = {k: npz[k] for k in _NPZ_ARRAYS}
    except DatasetFormatError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetFormatError(path, f"not a readable npz archive ({exc})") from None
    bad = ~np.isfinite(raw["x"])
    if bad.any():
        row, sample, channel = np.argwhere(bad)[0]
        raise DatasetFormatError(
            path, f"array 'x' holds {raw['x'][row, sample, channel]} at row {row}, sample {sample}, "
                  f"channel {channel}: the signal must be finite"
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
        members = ((str(path), path.read_bytes()) for path in found.files)
    else:
        archive = found.files[0]
        members = (
            (f"{archive}:{name}", data)
            for name, data in iter_members(archive, _SEGMENT_PATH.search)
            if data is not None
        )
    seen: dict[tuple[int, int, int], str] = {}
    for label, data in members:
        ids = _ids(label)
        if ids in seen:  # e.g. two copies of the tree in one archive
            name = "a{:02d}/p{}/s{:02d}.txt".format(*ids)
            raise DatasetFormatError(label, f"{name} appears twice; first: {seen[ids]}")
        seen[ids] = label
        yield (*ids, _parse_segment(data, label))


def _ids(name: str) -> tuple[int, int, int]:
    a, p, s = map(int, _SEGMENT_PATH.search(name.replace("\\", "/")).groups())
    problem = _ids_problem(a, p, s)
    if problem:
        raise DatasetFormatError(name, problem)
    return a, p, s


def _ids_problem(activity: int, subject: int, segment: int) -> str | None:
    for what, value, top in (("activity", activity, N_ACTIVITIES), ("subject", subject, N_SUBJECTS),
                             ("segment", segment, N_SEGMENTS)):
        if not 1 <= value <= top:
            return f"{what} {value} in the file name is outside 1..{top} (aNN/pN/sNN.txt)"
    return None


def _parse_segment(data: bytes, label: str) -> np.ndarray:
    return parse_table(data, label, n_cols=CHANNELS, delimiter=",", n_rows=SAMPLES, finite=True)
