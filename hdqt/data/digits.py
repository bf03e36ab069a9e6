"""scikit-learn's bundled 8x8 handwritten digits: the embedded default, no files needed."""
from __future__ import annotations

import numpy as np

from hdqt.data.base import Dataset

DESCRIPTION = (
    "scikit-learn digits (UCI optical recognition, bundled): 1,797 grey 8x8 images, "
    "10 classes, pixel values 0..16."
)


def load(root=None, features: bool = True, **kwargs) -> Dataset:
    """Digits as float32 (1797, 64) flattened pixels, or (1797, 1, 8, 8) images if not ``features``.

    ``root`` is accepted for a uniform call signature and ignored: the data ships with scikit-learn.
    """
    if kwargs:
        raise TypeError(f"digits: unexpected arguments {sorted(kwargs)}")
    from sklearn.datasets import load_digits  # deferred: importing sklearn takes ~1 s

    bunch = load_digits()
    images = bunch.images.astype(np.float32)
    return Dataset(
        name="digits",
        x=images.reshape(len(images), -1) if features else images[:, None],
        y=bunch.target.astype(np.int64),
        class_names=[str(d) for d in range(10)],
        description=DESCRIPTION,
    )
