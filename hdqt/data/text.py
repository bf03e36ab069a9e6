"""Parsing numeric text tables with errors that point at the offending line.

numpy's C parser is fast but its messages vary between versions, so on failure
we re-scan the text line by line (slow, but only on the error path) to name the
first bad line ourselves. Blank lines are skipped; nothing else is (no comment
character: a '#' line is an error, not silently dropped), so a table row maps to
its line with ``row_lines``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from hdqt.data.errors import DatasetFormatError


def parse_table(
    data: bytes,
    label: str,
    n_cols: int,
    delimiter: str | None = None,
    n_rows: int | None = None,
    finite: bool = False,
) -> np.ndarray:
    """Parse ``data`` (the bytes of a text file) into a float64 (rows, n_cols) array.

    ``label`` names the file in errors. ``delimiter=None`` means any whitespace.
    ``n_rows``, if given, is the exact number of rows required. ``finite=True``
    rejects ``nan``/``inf`` values; otherwise they are accepted and kept.
    """
    if not data.strip():  # checked first: numpy would also warn "input contained no data"
        raise DatasetFormatError(label, "the file holds no data rows", line=1)
    table = _loadtxt(data, delimiter)
    if table is None:
        _raise_first_bad_line(data, label, n_cols, delimiter)
        # Every line is fine: with a delimiter, numpy chokes on whitespace-only lines.
        table = _loadtxt(b"\n".join(line for line in data.splitlines() if line.strip()), delimiter)
    if table is None or table.shape[1] != n_cols:
        _raise_first_bad_line(data, label, n_cols, delimiter)
        raise DatasetFormatError(label, "could not parse the file as a numeric table")
    if n_rows is not None and table.shape[0] < n_rows:
        raise DatasetFormatError(
            label,
            f"expected {n_rows} rows but the file ends after {table.shape[0]} (truncated?)",
            line=len(data.splitlines()) + 1,
        )
    if n_rows is not None and table.shape[0] > n_rows:
        raise DatasetFormatError(
            label,
            f"expected {n_rows} rows but the file holds {table.shape[0]}: extra rows from this line on",
            line=int(row_lines(data)[n_rows]),
        )
    if finite and not np.isfinite(table).all():
        row, col = np.argwhere(~np.isfinite(table))[0]
        raise DatasetFormatError(
            label, f"{table[row, col]} in column {col + 1} is not a finite number", line=int(row_lines(data)[row])
        )
    return table


HEAD_BYTES = 1 << 16  # how much of a file ``check_head`` reads


def check_head(source: Path | bytes, label: str, n_cols: int, delimiter: str | None = None) -> None:
    """A cheap look at a text table, for probes: raise ``DatasetFormatError`` unless the file
    holds a first data row of ``n_cols`` numbers (an empty file, a comment line, or a first row
    of the wrong width or with a non-number is named with its line). Reads at most
    ``HEAD_BYTES`` of a file (a ``Path``); the rows after the first are checked by
    ``parse_table`` when the file is loaded."""
    if isinstance(source, bytes):
        head, whole = source[:HEAD_BYTES], len(source) <= HEAD_BYTES
    else:
        with open(source, "rb") as f:
            head = f.read(HEAD_BYTES + 1)
        whole, head = len(head) <= HEAD_BYTES, head[:HEAD_BYTES]
    lines = head.splitlines()
    if not whole and not head.endswith((b"\n", b"\r")):
        lines = lines[:-1]  # cut off inside a line
    first = next((n for n, line in enumerate(lines) if line.strip()), None)
    if first is None:
        if whole:
            raise DatasetFormatError(label, "the file holds no data rows", line=1)
        raise DatasetFormatError(label, f"no complete data row in the first {HEAD_BYTES} bytes: not a "
                                        f"table of {n_cols} numbers", line=len(lines) + 1)
    _raise_first_bad_line(b"\n".join(lines[: first + 1]), label, n_cols, delimiter)


def row_lines(data: bytes) -> np.ndarray:
    """The 1-based line number of each row ``parse_table`` returns (blank lines hold no row)."""
    return np.array([n for n, line in enumerate(data.splitlines(), start=1) if line.strip()], dtype=np.int64)


def _loadtxt(data: bytes, delimiter: str | None) -> np.ndarray | None:
    try:
        return np.loadtxt(io.BytesIO(data), delimiter=delimiter, comments=None, dtype=np.float64, ndmin=2)
    except ValueError:
        return None


def _raise_first_bad_line(data: bytes, label: str, n_cols: int, delimiter: str | None) -> None:
    """Raise for the first line that is not ``n_cols`` numbers; return if there is none."""
    what = "whitespace-separated" if delimiter is None else f"{delimiter!r}-separated"
    for number, line in enumerate(data.splitlines(), start=1):  # bytes: the same lines as row_lines
        raw = line.decode("utf-8", errors="replace")
        if not raw.strip():
            continue
        if raw.lstrip().startswith("#"):
            raise DatasetFormatError(label, "comment lines ('#') are not part of the format", line=number)
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
