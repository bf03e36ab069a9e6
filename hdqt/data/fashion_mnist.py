"""Fashion-MNIST, the four original IDX files.

Looks in ``<root>/fashion-mnist/``, ``<root>/fashion_mnist/``, then Debian's
``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``), for
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each gzip-compressed (``.gz``) or not.
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


def parse(found: Located) -> dict[str, np.ndarray]:
    train_x, train_y, test_x, test_y = found.files
    xs, ys, splits = [], [], []
    for part, images_path, labels_path in (("train", train_x, train_y), ("test", test_x, test_y)):
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1).astype(np.int64)
        if len(images) != len(labels):
            raise DatasetFormatError(labels_path, f"{len(labels)} labels for {len(images)} images in {images_path}")
        if len(labels) and labels.max() >= len(CLASS_NAMES):
            raise DatasetFormatError(labels_path, f"labels must lie in 0..{len(CLASS_NAMES) - 1}")
        xs.append(images[:, None])
        ys.append(labels)
        splits.append(np.full(len(labels), part))
    return {"x": np.concatenate(xs), "y": np.concatenate(ys), "split": np.concatenate(splits)}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzip or raw) with ``ndim`` dimensions."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(path, f"truncated or corrupted gzip file ({exc})") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(path, f"only {len(data)} bytes: shorter than the {header}-byte IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != _MAGIC[ndim]:
        raise DatasetFormatError(path, f"IDX magic number {magic}, expected {_MAGIC[ndim]} ({ndim}-d unsigned bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise DatasetFormatError(
            path, f"header announces {shape} = {size} bytes of data, the file holds {len(data) - header} (truncated?)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()
