"""CIFAR-100, the "python version" pickles.

Looks in ``<root>/cifar-100-python/`` then ``<root>/cifar100/`` and
``<root>/cifar100/cifar-100-python/`` for the three files ``train``, ``test`` and ``meta``,
then for the original archive ``cifar-100-python.tar.gz`` in ``<root>/`` or ``<root>/cifar100/``
(read in place). Keys used: ``b'data'`` (N, 3072) uint8 (1024 red, 1024 green, 1024 blue
values per image, row-major), ``b'fine_labels'`` and, in meta, ``b'fine_label_names'``.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from hdqt.data.base import Dataset, DatasetSource, Located
from hdqt.data.errors import DatasetFormatError
from hdqt.data.paths import cached_arrays, fingerprint

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
PARTS = ("train", "test", "meta")
ARCHIVE = "cifar-100-python.tar.gz"
DESCRIPTION = "CIFAR-100: 50,000 train + 10,000 test colour 32x32 images, 100 fine classes."


def _probe(folder: Path) -> Located | str | None:
    for base in (folder, folder / "cifar-100-python"):
        present = [p for p in PARTS if (base / p).is_file()]
        if len(present) == len(PARTS):
            return Located(base, tuple(base / p for p in PARTS), "pickles")
        if present:
            missing = [p for p in PARTS if p not in present]
            return f"{base} has {', '.join(present)} but lacks {', '.join(missing)}"
    if (folder / ARCHIVE).is_file():
        return Located(folder, (folder / ARCHIVE,), "archive")
    return None


SOURCE = DatasetSource(
    name="cifar100",
    subfolders=("cifar-100-python", "cifar100", "."),
    expected=f"the pickles train, test and meta (folder cifar-100-python/), or {ARCHIVE}",
    url=URL,
    probe=_probe,
)


def load(root=None, features: bool = True, **kwargs) -> Dataset:
    """CIFAR-100 as uint8 (60000, 3, 32, 32) images, train rows first; ``features`` is ignored."""
    if kwargs:
        raise TypeError(f"cifar100: unexpected arguments {sorted(kwargs)}")
    found = SOURCE.locate(root)
    arrays = cached_arrays("cifar100", fingerprint(found.files, found.layout), lambda: parse(found))
    return Dataset(
        name="cifar100",
        x=arrays["x"],
        y=arrays["y"],
        class_names=[str(n) for n in arrays["class_names"]],
        description=DESCRIPTION,
        split=arrays["split"],
    )


def parse(found: Located) -> dict[str, np.ndarray]:
    blobs = _read_parts(found)
    meta = _unpickle(*blobs["meta"])
    names = _key(meta, b"fine_label_names", blobs["meta"][0])
    xs, ys, splits = [], [], []
    for part in ("train", "test"):
        label, blob = blobs[part]
        record = _unpickle(label, blob)
        data = np.asarray(_key(record, b"data", label))
        labels = np.asarray(_key(record, b"fine_labels", label), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DatasetFormatError(
                label, f"b'data' must be (N, 3072) with N fine_labels, got {data.shape} and {len(labels)}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DatasetFormatError(label, f"fine_labels must lie in 0..{len(names) - 1}")
        xs.append(data.astype(np.uint8).reshape(-1, 3, 32, 32))
        ys.append(labels)
        splits.append(np.full(len(labels), part))
    return {
        "x": np.concatenate(xs),
        "y": np.concatenate(ys),
        "split": np.concatenate(splits),
        "class_names": np.array([n.decode() if isinstance(n, bytes) else str(n) for n in names]),
    }


def _read_parts(found: Located) -> dict[str, tuple[str, bytes]]:
    if found.layout == "pickles":
        return {p: (str(path), path.read_bytes()) for p, path in zip(PARTS, found.files)}
    archive = found.files[0]
    try:
        with tarfile.open(archive) as tf:
            members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
            missing = [p for p in PARTS if p not in members]
            if missing:
                raise DatasetFormatError(archive, f"the archive lacks {', '.join(missing)}")
            return {p: (f"{archive}:{members[p].name}", tf.extractfile(members[p]).read()) for p in PARTS}
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DatasetFormatError(archive, f"cannot read the archive ({exc})") from None


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle can run arbitrary code,
    and a dataset file has no reason to reference anything else."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(label: str, blob: bytes) -> dict:
    try:
        record = _ArrayOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types on damaged input
        raise DatasetFormatError(label, f"truncated or corrupted pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict):
        raise DatasetFormatError(label, f"expected a pickled dict, got {type(record).__name__}")
    return record


def _key(record: dict, key: bytes, label: str):
    if key in record:
        return record[key]
    if key.decode() in record:  # pickles re-saved under Python 3 use str keys
        return record[key.decode()]
    raise DatasetFormatError(label, f"missing key {key!r}; found {sorted(map(repr, record))}")
