"""Reading dataset archives in place (.zip, .tar, .tar.gz, .tar.xz), never extracting them."""
from __future__ import annotations

import lzma
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from hdqt.data.errors import DatasetFormatError
from hdqt.data.paths import cached_arrays, fingerprint

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".zip")


def archives_in(folder: Path) -> list[Path]:
    """The archive files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))


def iter_members(
    archive: Path, read: Callable[[str], object] = lambda name: False
) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of each file member, the bytes only where ``read(name)`` is true, else None.

    Tars are streamed: xz has no random access, so one pass is all a listing can cost.
    An unreadable archive raises ``DatasetFormatError`` naming it.
    """
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        yield info.filename, zf.read(info) if read(info.filename) else None
            return
        with tarfile.open(archive, mode="r|*") as tf:
            for member in tf:
                if member.isfile():
                    yield member.name, tf.extractfile(member).read() if read(member.name) else None
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError, zlib.error) as exc:
        raise DatasetFormatError(archive, f"cannot read the archive ({exc})") from None


def archive_problem(dataset: str, archive: Path, check: Callable[[Path], str | None], *key: object) -> str | None:
    """``check(archive)``: None if the archive holds a complete ``dataset``, else why not.

    Listing a large .tar.xz takes seconds, and every ``load`` probes its source, so the
    verdict is cached per archive version (path, size, mtime) and ``key``. An unreadable
    or malformed archive is a verdict too (its message), not an exception.
    """
    def build() -> dict[str, np.ndarray]:
        try:
            problem = check(archive)
        except DatasetFormatError as exc:
            problem = f"malformed: {exc}"
        return {"problem": np.array(problem or "")}

    return str(cached_arrays(f"archive-check-{dataset}", fingerprint((archive,), *key), build)["problem"]) or None
