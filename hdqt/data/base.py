"""The ``Dataset`` record and the machinery each loader uses to find its files."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from hdqt.data.errors import DatasetFormatError, DatasetNotFoundError
from hdqt.data.paths import candidate_folders, data_roots


@dataclass(frozen=True)
class Dataset:
    """A whole dataset as numpy arrays (before any train/test split or normalisation).

    - ``x``: HAR: float32 features (N, F) or raw windows (N, T, C);
      images: uint8 (N, C, H, W); digits: float32 (N, 64) with values 0..16.
    - ``y``: int64 labels 0..K-1, indexing ``class_names``.
    - ``subject``: int64 subject id per row for HAR datasets, else None.
    - ``split``: for image datasets an array of the strings ``"train"``/``"test"``
      (the dataset's own split), else None.
    - ``extra``: dataset-specific per-row arrays (e.g. DSADS ``segment``,
      HAPT ``experiment`` and ``start``) documented in docs/data.md.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    description: str
    subject: np.ndarray | None = None
    split: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.x)
        for attr in ("y", "subject", "split"):
            value = getattr(self, attr)
            if value is not None and len(value) != n:
                raise ValueError(f"Dataset {self.name!r}: {attr} has {len(value)} rows, x has {n}")
        if n and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
            raise ValueError(f"Dataset {self.name!r}: labels must lie in 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class Located:
    """Where a dataset's files were found: the folder, the source files, and their layout.

    ``partial`` is empty for a complete copy; otherwise it says what is missing from a copy
    that still loads (e.g. PAMAP2 with fewer than its 9 subjects).
    """

    folder: Path
    files: tuple[Path, ...]
    layout: str
    partial: str = ""


@dataclass(frozen=True)
class DatasetSource:
    """How to find one dataset on disk.

    ``probe(folder)`` returns a ``Located`` if the folder holds a usable copy, a string
    explaining what is missing if it holds an incomplete one, and None if it holds nothing of
    this dataset; it raises ``DatasetFormatError`` for a malformed copy. Probes run on every
    load, so they check cheaply (names, headers, shapes, first rows), never parse everything.
    """

    name: str
    subfolders: tuple[str, ...]
    expected: str
    url: str
    probe: Callable[[Path], "Located | str | None"]
    system_folders: tuple[str, ...] = ()

    def folders(self, root: str | os.PathLike | None = None) -> list[Path]:
        return candidate_folders(data_roots(root), self.subfolders, self.system_folders)

    def search(self, root: str | os.PathLike | None = None) -> list[tuple[Path, "Located | str | None"]]:
        """Probe every candidate folder (for ``hdqt data``); existing folders only are probed."""
        return [(f, self.safe_probe(f) if f.is_dir() else None) for f in self.folders(root)]

    def safe_probe(self, folder: Path) -> "Located | str | None":
        """``probe(folder)``, with a copy the probe finds malformed (a file that cannot be read
        or fails the probe's checks) reported as the string ``"malformed: <why>"``: one bad
        copy must not stop a search."""
        return self._probe(folder)[0]

    def _probe(self, folder: Path) -> "tuple[Located | str | None, DatasetFormatError | None]":
        try:
            return self.probe(folder), None
        except DatasetFormatError as exc:
            return f"malformed: {exc}", exc
        except OSError as exc:  # e.g. a file without read permission
            error = DatasetFormatError(exc.filename or folder, f"cannot read it ({exc.strerror or exc})")
            return f"malformed: {error}", error

    def locate(self, root: str | os.PathLike | None = None) -> Located:
        """The first complete copy in search order, else the first partial one. A malformed
        copy is skipped. Without a usable copy: the first malformed copy's
        ``DatasetFormatError`` (it names the file, and line, to fix), else
        ``DatasetNotFoundError``."""
        searched, notes, partial, malformed = [], [], None, None
        for folder in self.folders(root):
            searched.append(folder)
            if not folder.is_dir():
                continue
            found, error = self._probe(folder)
            malformed = malformed or error
            if isinstance(found, Located) and not found.partial:
                return found
            if isinstance(found, Located):
                partial = partial or found
            elif isinstance(found, str):
                notes.append(f"{folder}: {found}")
        if partial is not None:
            return partial
        if malformed is not None:
            raise malformed
        raise DatasetNotFoundError(self.name, self.expected, searched, self.url, notes)


def first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first ``folder/name`` that is a file, trying names in order."""
    for name in names:
        path = folder / name
        if path.is_file():
            return path
    return None
