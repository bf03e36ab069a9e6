"""Parsing numeric text tables with errors that point at the offending line.

numpy's C parser is fast but its messages vary between versions, so on failure
we re-scan the text line by line (slow, but only on the error path) to name the
first bad line ourselves.
"""
from __future__ import annotations

import io

import numpy as np

from hdqt.data.errors import DatasetFormatError


def parse_table(
    data: bytes, label: str, n_cols: int, delimiter: str | None = None, n_rows: int | None = None
) -> np.ndarray:
    """Parse ``data`` (the bytes of a text file) into a float64 (rows, n_cols) array.

    ``label`` names the file in errors. ``delimiter=None`` means any whitespace.
    ``n_rows``, if given, is the exact number of rows required.
    Values such as ``NaN`` are accepted and kept.
    """
    try:
        table = np.loadtxt(io.BytesIO(data), delimiter=delimiter, dtype=np.float64, ndmin=2)
    except ValueError:
        table = None
    if table is None or table.shape[1] != n_cols and table.size:
        _raise_first_bad_line(data, label, n_cols, delimiter)
    if table.size == 0:
        raise DatasetFormatError(label, "the file holds no data rows", line=1)
    if n_rows is not None and table.shape[0] != n_rows:
        raise DatasetFormatError(
            label,
            f"expected {n_rows} rows but the file ends after {table.shape[0]} (truncated?)",
            line=table.shape[0] + 1,
        )
    return table


def _raise_first_bad_line(data: bytes, label: str, n_cols: int, delimiter: str | None) -> None:
    what = "whitespace-separated" if delimiter is None else f"{delimiter!r}-separated"
    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        fields = raw.split(delimiter)
        if len(fields) != n_cols:
            raise DatasetFormatError(
                label, f"expected {n_cols} {what} numbers, found {len(fields)}", line=number
            )
        for field in fields:
            try:
                float(field)
            except ValueError:
                raise DatasetFormatError(
                    label, f"{field.strip()!r} is not a number", line=number
                ) from None
    raise DatasetFormatError(label, "could not parse the file as a numeric table")
