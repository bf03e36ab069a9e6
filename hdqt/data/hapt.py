"""UCI Human Activities and Postural Transitions (HAPT), from the raw signals.

Accepted layouts in ``<root>/hapt/``, first match wins:

1. a ``RawData/`` folder (directly, or inside ``HAPT Data Set/``) with ``labels.txt``,
   ``acc_expNN_userNN.txt`` and ``gyro_expNN_userNN.txt``;
2. an archive (``*.zip``, ``*.tar``, ``*.tar.gz``, ``*.tar.xz``) holding such a ``RawData/``
   folder anywhere inside, read in place (e.g. the project's ``hapt-uci-rawdata.tar.xz``);
   an archive lacking labels.txt or a signal file it names is reported, not loaded.

labels.txt holds whole numbers (activity 1..12, 1 <= start <= end); signal files finite
numbers. The probe checks labels.txt whole and the first row of every signal file, so a
malformed copy is skipped; the other rows are checked when loaded. Errors name file and line.

Windows: 128 samples (2.56 s at 50 Hz), 50% overlap, cut only inside each labelled
segment of ``labels.txt`` (start and end are 1-based, inclusive sample numbers, i.e.
line numbers of the signal files); a segment shorter than 128 samples gives no window.
Features: the 561-feature recipe of hdqt/data/hapt_features.py. Raw windows are the
unfiltered acc (g) and gyro (rad/s) columns: (N, 128, 6).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np

from hdqt.data.archives import archive_problem, archives_in, iter_members
from hdqt.data.base import Dataset, DatasetSource, Located
from hdqt.data.errors import DatasetFormatError, DatasetNotFoundError
from hdqt.data.hapt_features import derived_signals, window_features
from hdqt.data.paths import cached_arrays, fingerprint
from hdqt.data.text import check_head, parse_table, row_lines

URL = "https://archive.ics.uci.edu/dataset/341/smartphone+based+recognition+of+human+activities+and+postural+transitions"
WINDOW, STEP = 128, 64
ACTIVITIES = (
    "walking", "walking upstairs", "walking downstairs", "sitting", "standing", "laying",
    "stand to sit", "sit to stand", "sit to lie", "lie to sit", "stand to lie", "lie to stand",
)
RAW_CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
DESCRIPTION = (
    "UCI HAPT v2.1: 30 users, 12 activities (6 postures/movements + 6 transitions), "
    "waist smartphone acc + gyro at 50 Hz; 128-sample windows, 50% overlap, inside labelled segments."
)

_SIGNAL_FILE = re.compile(r"(?:^|/)RawData/(acc|gyro)_exp(\d\d)_user(\d\d)\.txt$")
_LABELS_FILE = re.compile(r"(?:^|/)RawData/labels\.txt$")


def _probe(folder: Path) -> Located | str | None:
    notes = []
    for raw in (folder / "RawData", folder / "HAPT Data Set" / "RawData"):
        labels = raw / "labels.txt"
        if not labels.is_file():
            continue
        files = sorted(raw.glob("*_exp[0-9][0-9]_user[0-9][0-9].txt"))
        # a malformed labels.txt or signal file raises here; DatasetSource reports the copy as malformed
        missing = _missing_signal_files(labels.read_bytes(), {f.name for f in files}, str(labels))
        if not missing:
            for path in files:  # cheap: the first row of each (all rows are checked when loaded)
                check_head(path, str(path), n_cols=3)
            return Located(raw, (labels, *files), "folder")
        notes.append(f"{raw} lacks {len(missing)} signal files named in labels.txt, e.g. {missing[0]}")
    for archive in archives_in(folder):
        problem = archive_problem("hapt", archive, _archive_coverage)
        if problem is None:
            return Located(folder, (archive,), "archive")
        notes.append(problem)
    return "; ".join(notes) or None


def _archive_coverage(archive: Path) -> str | None:
    """None if the archive holds RawData/labels.txt and every signal file it names."""
    labels, present = None, set()
    wanted = lambda name: bool(_LABELS_FILE.search(name) or _SIGNAL_FILE.search(name))  # noqa: E731
    for name, data in iter_members(archive, wanted):
        if data is None:
            continue
        if _LABELS_FILE.search(name):
            labels = labels or (f"{archive}:{name}", data)
        else:  # decompressed anyway while listing the tar: check its first row
            check_head(data, f"{archive}:{name}", n_cols=3)
            present.add(Path(name).name)
    if labels is None:
        return f"{archive} holds no RawData/labels.txt"
    missing = _missing_signal_files(labels[1], present, labels[0])
    if missing:
        return f"{archive} lacks {len(missing)} signal files named in labels.txt, e.g. {missing[0]}"
    return None


SOURCE = DatasetSource(
    name="hapt",
    subfolders=("hapt",),
    expected=(
        "RawData/labels.txt with RawData/acc_expNN_userNN.txt and gyro_expNN_userNN.txt "
        "for every experiment it names (optionally inside 'HAPT Data Set/', or in a "
        ".zip/.tar.* archive)"
    ),
    url=URL,
    probe=_probe,
)


def load(root=None, features: bool = True, **kwargs) -> Dataset:
    """HAPT windows as 561 features or raw (N, 128, 6) signals; subject = user id 1..30."""
    if kwargs:
        raise TypeError(f"hapt: unexpected arguments {sorted(kwargs)}")
    found = SOURCE.locate(root)
    arrays = cached_arrays("hapt", fingerprint(found.files, found.layout), lambda: parse(found))
    return Dataset(
        name="hapt",
        x=arrays["features"] if features else arrays["raw"],
        y=arrays["y"],
        class_names=list(ACTIVITIES),
        description=DESCRIPTION,
        subject=arrays["subject"],
        extra={"experiment": arrays["experiment"], "start": arrays["start"]},
    )


def parse(found: Located) -> dict[str, np.ndarray]:
    """Read labels and signals, cut windows and compute features (both kept for the cache)."""
    files = _read_files(found)
    labels_name = next((n for n in files if _LABELS_FILE.search(n)), None)
    if labels_name is None:
        raise DatasetNotFoundError("hapt", SOURCE.expected, [found.files[0]], URL, ["no RawData/labels.txt"])
    labels, label_lines = _parse_labels(files[labels_name], labels_name)
    by_name = {Path(n).name: n for n in files if _SIGNAL_FILE.search(n)}
    missing = _missing_signal_files(files[labels_name], set(by_name), labels_name)
    if missing:
        raise DatasetNotFoundError(
            "hapt", SOURCE.expected, [found.files[0]], URL,
            [f"{len(missing)} signal files named in labels.txt are missing, e.g. {missing[0]}"],
        )
    out = {k: [] for k in ("raw", "features", "y", "subject", "experiment", "start")}
    for exp, user in sorted({(int(e), int(u)) for e, u in labels[:, :2]}):
        acc_name, gyro_name = (by_name[_signal_name(k, exp, user)] for k in ("acc", "gyro"))
        acc = parse_table(files[acc_name], acc_name, n_cols=3, finite=True)
        gyro = parse_table(files[gyro_name], gyro_name, n_cols=3, finite=True)
        if len(acc) != len(gyro):
            raise DatasetFormatError(gyro_name, f"has {len(gyro)} rows but {acc_name} has {len(acc)}")
        starts, activity = _window_starts(labels, label_lines, exp, user, len(acc), labels_name)
        if not len(starts):
            continue
        index = starts[:, None] + np.arange(WINDOW)[None, :]
        raw = np.concatenate([acc, gyro], axis=1)
        out["raw"].append(raw[index].astype(np.float32))
        out["features"].append(window_features(derived_signals(acc, gyro)[index]))
        out["y"].append(activity - 1)
        out["subject"].append(np.full(len(starts), user))
        out["experiment"].append(np.full(len(starts), exp))
        out["start"].append(starts)
    return {k: np.concatenate(v).astype(np.float32 if k in ("raw", "features") else np.int64)
            for k, v in out.items()}


def window_starts(segment_start: int, segment_end: int) -> np.ndarray:
    """0-based first rows of the windows inside a 1-based inclusive labelled segment."""
    length = segment_end - segment_start + 1
    if length < WINDOW:
        return np.zeros(0, dtype=np.int64)
    return segment_start - 1 + STEP * np.arange((length - WINDOW) // STEP + 1, dtype=np.int64)


def _window_starts(labels, lines, exp, user, n_rows, labels_name) -> tuple[np.ndarray, np.ndarray]:
    starts, activity = [], []
    for line, (e, u, act, begin, end) in zip(lines.tolist(), labels):
        if (e, u) != (exp, user):
            continue
        if not (1 <= act <= len(ACTIVITIES)) or begin < 1 or end < begin or end > n_rows:
            raise DatasetFormatError(
                labels_name,
                f"activity {act} must be 1..{len(ACTIVITIES)} and 1 <= start <= end <= {n_rows} "
                f"(rows of experiment {exp}), got start {begin}, end {end}",
                line=line,
            )
        s = window_starts(begin, end)
        starts.append(s)
        activity.append(np.full(len(s), act))
    return np.concatenate(starts), np.concatenate(activity)


def _signal_name(kind: str, exp: int, user: int) -> str:
    return f"{kind}_exp{exp:02d}_user{user:02d}.txt"


def _parse_labels(data: bytes, label: str) -> tuple[np.ndarray, np.ndarray]:
    """labels.txt as an int64 (rows, 5) table and the line number of each row."""
    table = parse_table(data, label, n_cols=5, finite=True)
    lines = row_lines(data)
    fractional = np.flatnonzero((table != np.round(table)).any(axis=1))
    if len(fractional):
        raise DatasetFormatError(label, "experiment, user, activity, start and end must be whole numbers",
                                 line=int(lines[fractional[0]]))
    table = table.astype(np.int64)
    act, begin, end = table[:, 2], table[:, 3], table[:, 4]
    bad = np.flatnonzero((act < 1) | (act > len(ACTIVITIES)) | (begin < 1) | (end < begin))
    if len(bad):  # the end is checked against the recording's length when it is loaded
        row = bad[0]
        raise DatasetFormatError(
            label, f"activity {act[row]} must be 1..{len(ACTIVITIES)} and 1 <= start <= end, "
                   f"got start {begin[row]}, end {end[row]}", line=int(lines[row]))
    return table, lines


def _missing_signal_files(labels: bytes, present: set[str], label: str) -> list[str]:
    table, _ = _parse_labels(labels, label)
    wanted = [_signal_name(k, e, u) for e, u in sorted({(e, u) for e, u in table[:, :2]}) for k in ("acc", "gyro")]
    return [w for w in wanted if w not in present]


def _read_files(found: Located) -> Mapping[str, bytes]:
    """{name: bytes} of labels.txt and the signal files, from a folder or an archive."""
    if found.layout == "folder":
        return {str(p): p.read_bytes() for p in found.files}
    archive = found.files[0]
    wanted = lambda name: bool(_SIGNAL_FILE.search(name) or _LABELS_FILE.search(name))  # noqa: E731
    return {f"{archive}:{name}": data for name, data in iter_members(archive, wanted) if data is not None}
