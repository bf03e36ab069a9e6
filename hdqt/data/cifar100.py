"""CIFAR-100, the "python version" pickles.

Looks in ``<root>/cifar-100-python/`` then ``<root>/cifar100/`` and
``<root>/cifar100/cifar-100-python/`` for the three files ``train``, ``test`` and ``meta``,
then for the original archive ``cifar-100-python.tar.gz`` in ``<root>/`` or ``<root>/cifar100/``
(read in place). The probe checks that ``train`` and ``test`` begin like a pickled dict and
end with the pickle STOP opcode (a cut file does not), and reads ``meta`` whole, so a malformed
copy is skipped; ``train`` and ``test`` are unpickled only when loaded. Keys used:
``b'data'`` (N, 3072) uint8 (1024 red, 1024 green, 1024 blue values per image, row-major), ``b'fine_labels'`` and, in meta, ``b'fine_label_names'``.
Checked: data integers 0..255, labels whole numbers 0..99, meta exactly 100 names.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from hdqt.data.archives import archive_problem, iter_members
from hdqt.data.base import Dataset, DatasetSource, Located
from hdqt.data.errors import DatasetFormatError
from hdqt.data.paths import cached_arrays, fingerprint

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
PARTS = ("train", "test", "meta")
N_CLASSES = 100
ARCHIVE = "cifar-100-python.tar.gz"
DESCRIPTION = "CIFAR-100: 50,000 train + 10,000 test colour 32x32 images, 100 fine classes."


def _probe(folder: Path) -> Located | str | None:
    for base in (folder, folder / "cifar-100-python"):
        present = [p for p in PARTS if (base / p).is_file()]
        if len(present) == len(PARTS):
            for part in ("train", "test"):
                _check_pickle_ends(base / part)
            meta = base / "meta"  # small: read whole, with the restricted unpickler
            _fine_names(_unpickle(str(meta), meta.read_bytes()), str(meta))
            return Located(base, tuple(base / p for p in PARTS), "pickles")
        if present:
            missing = [p for p in PARTS if p not in present]
            return f"{base} has {', '.join(present)} but lacks {', '.join(missing)}"
    if (folder / ARCHIVE).is_file():
        problem = archive_problem("cifar100", folder / ARCHIVE, _archive_coverage)
        return problem or Located(folder, (folder / ARCHIVE,), "archive")
    return None


def _archive_coverage(archive: Path) -> str | None:
    names, meta = set(), None
    for name, data in iter_members(archive, lambda name: Path(name).name == "meta"):
        names.add(Path(name).name)
        if data is not None:
            meta = meta or (f"{archive}:{name}", data)
    missing = [p for p in PARTS if p not in names]
    if missing:
        return f"{archive} lacks {', '.join(missing)}"
    _fine_names(_unpickle(*meta), meta[0])  # a malformed meta: the verdict "malformed: ..."
    return None


def _check_pickle_ends(path: Path) -> None:
    """Cheap checks of a large pickle, without unpickling it: it must begin like a pickled dict
    (protocol header, then an empty dict) and end with the STOP opcode (a cut file does not)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(max(size - 1, 0))
        last = f.read(1)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # protocol 2+ header
        body = head[2:]
        if body[:1] == b"\x95":  # protocol 4+: a FRAME opcode with an 8-byte length
            body = body[9:]
        dict_start = body[:1] == b"}"  # EMPTY_DICT
    else:  # protocol 1 (EMPTY_DICT) or 0 (MARK, DICT)
        dict_start = head[:1] == b"}" or head[:2] == b"(d"
    if not dict_start:
        raise DatasetFormatError(
            path, f"truncated or corrupted pickle (it does not begin like a pickled dict: {head[:8]!r})"
        )
    if last != b".":
        raise DatasetFormatError(
            path, "truncated or corrupted pickle (it does not end with the pickle STOP opcode '.': cut short?)"
        )


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
    names = _fine_names(_unpickle(*blobs["meta"]), blobs["meta"][0])
    xs, ys, splits = [], [], []
    for part in ("train", "test"):
        label, blob = blobs[part]
        record = _unpickle(label, blob)
        data = np.asarray(_key(record, b"data", label))
        labels = np.asarray(_key(record, b"fine_labels", label))
        if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
            raise DatasetFormatError(
                label, f"b'data' must be (N, 3072) with N fine_labels, got {data.shape} and {labels.shape}"
            )
        # astype would wrap 256 to 0 and truncate 3.7 to 3: check before converting
        if data.dtype.kind not in "ui" or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DatasetFormatError(label, f"b'data' must hold integers 0..255, got dtype {data.dtype}")
        if labels.size and (labels.dtype.kind not in "uif" or not np.all(np.isin(labels, np.arange(len(names))))):
            raise DatasetFormatError(label, f"fine_labels must be whole numbers in 0..{len(names) - 1}")
        xs.append(data.astype(np.uint8).reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
        splits.append(np.full(len(labels), part))
    return {
        "x": np.concatenate(xs),
        "y": np.concatenate(ys),
        "split": np.concatenate(splits),
        "class_names": np.array(names),
    }


def _fine_names(meta: dict, label: str) -> list[str]:
    """The 100 class names of ``meta`` (a bare string would otherwise pass as 'names')."""
    names = _key(meta, b"fine_label_names", label)
    if (
        isinstance(names, (str, bytes))
        or not isinstance(names, (list, tuple, np.ndarray))
        or len(names) != N_CLASSES
        or not all(isinstance(n, (str, bytes, np.str_, np.bytes_)) for n in names)
    ):
        raise DatasetFormatError(label, f"b'fine_label_names' must be a list of {N_CLASSES} strings")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


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

    _ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    })

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
