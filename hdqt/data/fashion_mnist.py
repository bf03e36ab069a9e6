"""Fashion-MNIST, the four original IDX files.

Looks in ``<root>/fashion-mnist/``, ``<root>/fashion_mnist/``, then Debian's
``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``), for
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each gzip-compressed (``.gz``) or not. The probe reads each
header (and a ``.gz`` file's trailer) and the small label files, so a malformed copy is skipped.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from types import MappingProxyType

import numpy as np

from hdqt.data.base import Dataset, DatasetSource, Located, first_existing
from hdqt.data.errors import DatasetFormatError
from hdqt.data.paths import cached_arrays, fingerprint

URL = "https://github.com/zalandoresearch/fashion-mnist"
SYSTEM_FOLDER = "/usr/share/datasets/fashion-mnist"
FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DESCRIPTION = "Fashion-MNIST: 60,000 train + 10,000 test grey 28x28 images, 10 classes."
_MAGIC = MappingProxyType({1: 2049, 3: 2051})  # IDX magic numbers: unsigned bytes, 1 or 3 dimensions


def _probe(folder: Path) -> Located | str | None:
    found = [first_existing(folder, (f"{name}.gz", name)) for name in FILES]
    if all(found):
        _check_files(*found)
        return Located(folder, tuple(found), "idx")
    if any(found):
        missing = [n for n, f in zip(FILES, found) if f is None]
        return f"{folder} lacks {', '.join(missing)} (.gz or not)"
    return None


SOURCE = DatasetSource(
    name="fashion_mnist",
    subfolders=("fashion-mnist", "fashion_mnist"),
    expected=", ".join(f"{n}.gz" for n in FILES) + " (or uncompressed)",
    url=URL,
    probe=_probe,
    system_folders=(SYSTEM_FOLDER,),
)


def load(root=None, features: bool = True, **kwargs) -> Dataset:
    """Fashion-MNIST as uint8 (70000, 1, 28, 28) images, train rows first; ``features`` is ignored."""
    if kwargs:
        raise TypeError(f"fashion_mnist: unexpected arguments {sorted(kwargs)}")
    found = SOURCE.locate(root)
    arrays = cached_arrays("fashion_mnist", fingerprint(found.files), lambda: parse(found))
    return Dataset(
        name="fashion_mnist",
        x=arrays["x"],
        y=arrays["y"],
        class_names=list(CLASS_NAMES),
        description=DESCRIPTION,
        split=arrays["split"],
    )


def _check_files(train_x: Path, train_y: Path, test_x: Path, test_y: Path) -> None:
    """Cheap checks, for the probe: every IDX header (magic number, dimensions, and the data
    size it announces against the file's size or, gzipped, the size in the gzip trailer),
    28x28 images, as many labels as images, and the labels' values (the label files are small)."""
    for images_path, labels_path in ((train_x, train_y), (test_x, test_y)):
        shape = idx_header(images_path, ndim=3)
        if shape[1:] != (28, 28):
            raise DatasetFormatError(images_path, f"images are {shape[1]}x{shape[2]}, expected 28x28")
        _check_labels(read_idx(labels_path, ndim=1), shape[0], labels_path, images_path)


def _check_labels(labels: np.ndarray, n_images: int, labels_path: Path, images_path: Path) -> None:
    if len(labels) != n_images:
        raise DatasetFormatError(labels_path, f"{len(labels)} labels for {n_images} images in {images_path}")
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise DatasetFormatError(labels_path, f"labels must lie in 0..{len(CLASS_NAMES) - 1}")


def parse(found: Located) -> dict[str, np.ndarray]:
    train_x, train_y, test_x, test_y = found.files
    xs, ys, splits = [], [], []
    for part, images_path, labels_path in (("train", train_x, train_y), ("test", test_x, test_y)):
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
        _check_labels(labels, len(images), labels_path, images_path)
        xs.append(images[:, None])
        ys.append(labels.astype(np.int64))
        splits.append(np.full(len(labels), part))
    return {"x": np.concatenate(xs), "y": np.concatenate(ys), "split": np.concatenate(splits)}


def _gzip_problem(exc: Exception) -> str:
    return f"truncated or corrupted gzip file ({exc})"


def idx_header(path: Path, ndim: int) -> tuple[int, ...]:
    """The shape in an IDX file's header, checked against the file's size (for a ``.gz``, against
    the uncompressed size in its gzip trailer), reading only the header and the trailer."""
    header = 4 + 4 * ndim
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                head = f.read(header)
            with open(path, "rb") as f:
                f.seek(0, 2)
                if f.tell() < 18:  # a gzip member has a 10-byte header and an 8-byte trailer
                    raise EOFError(f"only {f.tell()} bytes")
                f.seek(-4, 2)
                stored = int.from_bytes(f.read(4), "little")  # ISIZE: uncompressed size mod 2**32
        else:
            with open(path, "rb") as f:
                head = f.read(header)
            stored = path.stat().st_size
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(path, _gzip_problem(exc)) from None
    shape = _parse_header(head, path, ndim)
    size = header + int(np.prod(shape))
    if path.name.endswith(".gz") and stored != size % 2**32:
        raise DatasetFormatError(
            path, _gzip_problem(f"its trailer gives {stored} bytes uncompressed, the IDX header announces {size}")
        )
    if not path.name.endswith(".gz") and stored != size:
        raise DatasetFormatError(path, _size_problem(shape, stored - header))
    return shape


def _parse_header(data: bytes, path: Path, ndim: int) -> tuple[int, ...]:
    header = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and magic != _MAGIC[ndim]:  # first: a file of another kind is named as such
        raise DatasetFormatError(path, f"IDX magic number {magic}, expected {_MAGIC[ndim]} ({ndim}-d unsigned bytes)")
    if len(data) < header:
        raise DatasetFormatError(path, f"only {len(data)} bytes: shorter than the {header}-byte IDX header")
    return tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))


def _size_problem(shape: tuple[int, ...], held: int) -> str:
    return f"the header announces {shape} = {int(np.prod(shape))} bytes of data, the file holds {held} (truncated?)"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzip or raw) with ``ndim`` dimensions."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(path, _gzip_problem(exc)) from None
    shape = _parse_header(data, path, ndim)
    header = 4 + 4 * ndim
    if len(data) - header != int(np.prod(shape)):
        raise DatasetFormatError(path, _size_problem(shape, len(data) - header))
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()
