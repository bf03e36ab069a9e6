"""Where datasets are looked for, and the on-disk cache of parsed arrays.

Search order for a dataset (see docs/data.md):

1. the ``root`` argument, if given (then nothing else except dataset-specific
   system folders such as ``/usr/share/datasets/fashion-mnist``);
2. otherwise every folder in the environment variable ``HDQT_DATA``
   (several may be given, separated by ``os.pathsep``);
3. then the per-user cache directory (``cache_dir()``).

Inside each root a dataset lives in its own sub-folder (``dsads/``, ``hapt/``, ...).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

DATA_ENV = "HDQT_DATA"
CACHE_ENV = "HDQT_CACHE"
# Bump when a parser or feature recipe changes, so stale caches are not reused.
CACHE_VERSION = "3"  # 2: DSADS/HAPT reject non-finite values and bad file ids; 3: archive checks read first rows


def cache_dir() -> Path:
    """The per-user cache: ``$HDQT_CACHE``, else ``$XDG_CACHE_HOME/hdqt``, else ``~/.cache/hdqt``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hdqt"


def configured_roots(value: str | None = None) -> list[Path]:
    """The folders named in ``HDQT_DATA`` (or in ``value``, a string in its format), in order."""
    value = os.environ.get(DATA_ENV, "") if value is None else value
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p]


def data_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """The roots to search, in order: ``root`` alone if given, else ``HDQT_DATA`` then the cache.

    The one rule for where datasets are: the loaders, ``hdqt data`` and the real-data tests
    (tests/data/conftest.py) all use it."""
    if root is not None:
        return [Path(root).expanduser()]
    return [*configured_roots(), cache_dir()]


def candidate_folders(
    roots: Iterable[Path], subfolders: Iterable[str], extra: Iterable[str] = ()
) -> list[Path]:
    """``<root>/<sub>`` for every root and sub-folder name, then the ``extra`` folders."""
    subfolders = list(subfolders)
    folders: list[Path] = []
    for r in roots:
        folders += [r / s for s in subfolders]
    folders += [Path(e) for e in extra]
    unique: list[Path] = []
    for f in folders:
        if f not in unique:
            unique.append(f)
    return unique


def fingerprint(files: Iterable[Path], *parts: object) -> str:
    """A short key that changes when any source file (path, size, mtime) or any part changes."""
    h = hashlib.sha1(CACHE_VERSION.encode())
    for f in sorted(Path(p).resolve() for p in files):
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


def cached_arrays(
    stem: str, key: str, build: Callable[[], dict[str, np.ndarray]], keys: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Load ``<cache>/parsed/<stem>-<key>.npz`` or build, save and return it.

    A cached file lacking any of ``keys`` (written by an older version) is rebuilt.

    A cache that cannot be written (read-only home, full disk) only costs a warning:
    the data is still returned. A cache that cannot be read is rebuilt.
    """
    path = cache_dir() / "parsed" / f"{stem}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                if set(keys) <= set(npz.files):
                    return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError):
            pass  # damaged cache file: fall through and rebuild it
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a file
    except OSError as exc:
        warnings.warn(f"could not write the data cache {path}: {exc}", stacklevel=2)
    return arrays
