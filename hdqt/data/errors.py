"""Errors raised by the dataset loaders.

Both carry enough context for a user to fix the problem without reading code:
a missing dataset names the files expected, every folder searched and where to
download them; a malformed file names the file and, for text, the line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing or incomplete in every folder searched."""

    def __init__(
        self,
        name: str,
        expected: str,
        searched: Sequence[Path | str],
        url: str,
        notes: Sequence[str] = (),
    ):
        self.name = name
        self.expected = expected
        self.searched = [str(p) for p in searched]
        self.url = url
        self.notes = list(notes)
        lines = [f"dataset {name!r} was not found.", f"Expected: {expected}", "Folders searched:"]
        lines += [f"  - {p}" for p in self.searched] or ["  (none)"]
        if self.notes:
            lines.append("Found but incomplete or unusable:")
            lines += [f"  - {n}" for n in self.notes]
        lines.append(f"Download it from {url} and put it under one of the folders above")
        lines.append("(or pass root=..., or set HDQT_DATA to the folder holding it).")
        super().__init__("\n".join(lines))

    def __str__(self) -> str:  # FileNotFoundError would otherwise print the errno tuple
        return self.args[0]


class DatasetFormatError(ValueError):
    """A dataset file is truncated or malformed; names the file and, for text, the line."""

    def __init__(self, path: Path | str, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")
