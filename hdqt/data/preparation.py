"""``prepare``: load a dataset, split it into train/test and normalise it for training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from hdqt.data import DEFAULT_CLIP  # defined in the package, which loads without torch

from hdqt.data.augment import RandomCropFlip
from hdqt.data.base import Dataset

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
_MIN_STD = 1e-8  # features constant on the training part (e.g. digits' border pixels) are only centred


@dataclass(frozen=True)
class PreparedData:
    """Train/test arrays ready for a learner: float32 inputs, int64 labels 0..K-1.

    Inputs are normalised with ``mean``/``std`` fitted on the training part only
    (per feature for vectors, per channel for windows and images).
    ``test_subjects`` lists the held-out subjects of a HAR dataset, and ``subject_train``
    / ``subject_test`` give the subject of every row (None for datasets without subjects).
    """

    name: str
    description: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    input_shape: tuple[int, ...]
    default_backbone: str
    augment: Augment | None = None
    mean: np.ndarray = field(default=None, repr=False)
    std: np.ndarray = field(default=None, repr=False)
    test_subjects: tuple[int, ...] | None = None
    subject_train: np.ndarray | None = field(default=None, repr=False)
    subject_test: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)




def prepare_dataset(
    ds: Dataset, default_backbone: str, seed: int = 0, test_fraction: float = 0.2, augment: bool = False,
    clip: float | None = DEFAULT_CLIP, padding: int = 4, train_per_class: int | None = None,
) -> PreparedData:
    """Split (by subject, own split, or stratified) and normalise a loaded ``Dataset``.

    ``train_per_class`` keeps at most that many training samples of each class (a seeded
    choice, in the data's order), for quick runs on big datasets; the test part is
    whole, and the normalisation statistics come from the samples kept.

    ``augment=True`` attaches ``RandomCropFlip(padding=padding)``; images only (ValueError
    otherwise: crops and flips make no sense for feature vectors or sensor windows).
    ``clip`` bounds the normalised inputs of non-image datasets to [-clip, clip]
    (None: unbounded); images are left as they are.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be None or > 0 (standard deviations), got {clip!r}")
    images = ds.x.ndim == 4
    if augment and not images:
        raise ValueError(f"augment=True needs an image dataset; {ds.name!r} inputs have shape {ds.x.shape[1:]}")
    if augment and (isinstance(padding, bool) or not isinstance(padding, int) or padding < 0):
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    if train_per_class is not None and (isinstance(train_per_class, bool) or not isinstance(
            train_per_class, (int, np.integer)) or train_per_class < 1):
        raise ValueError(f"train_per_class must be None (all) or an integer >= 1, "
                         f"got {train_per_class!r}")
    test_subjects = None
    if ds.subject is not None:
        test_subjects = held_out_subjects(ds.subject, seed, test_fraction)
        is_test = np.isin(ds.subject, test_subjects)
    elif ds.split is not None:
        is_test = np.asarray(ds.split) == "test"
    else:
        is_test = stratified_test_mask(ds.y, seed, test_fraction)
    x = ds.x
    if images and x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32, copy=False)
    is_train = ~is_test
    if train_per_class is not None:
        is_train = is_train & per_class_mask(ds.y, is_train, seed, train_per_class)
    x_train, x_test = x[is_train], x[is_test]
    # statistics over every axis except the feature/channel one
    axes = (0, 2, 3) if images else tuple(range(x.ndim - 1))
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std = np.where(std < _MIN_STD, 1.0, std)
    bound = None if images else clip

    def normalise(a: np.ndarray) -> np.ndarray:
        z = ((a - mean) / std).astype(np.float32)
        return z if bound is None else np.clip(z, -bound, bound, out=z)
    return PreparedData(
        name=ds.name,
        description=ds.description,
        x_train=normalise(x_train),
        y_train=ds.y[is_train].astype(np.int64),
        x_test=normalise(x_test),
        y_test=ds.y[is_test].astype(np.int64),
        class_names=list(ds.class_names),
        input_shape=tuple(int(d) for d in x.shape[1:]),
        default_backbone=default_backbone,
        augment=RandomCropFlip(padding=padding) if augment else None,
        mean=mean.squeeze(0).astype(np.float32),
        std=std.squeeze(0).astype(np.float32),
        test_subjects=None if test_subjects is None else tuple(int(s) for s in test_subjects),
        subject_train=None if ds.subject is None else ds.subject[is_train],
        subject_test=None if ds.subject is None else ds.subject[is_test],
    )


def per_class_mask(y: np.ndarray, candidates: np.ndarray, seed: int, per_class: int) -> np.ndarray:
    """A seeded choice of at most ``per_class`` of the ``candidates`` of each class."""
    rng = np.random.default_rng([seed, per_class])
    keep = np.zeros(len(y), dtype=bool)
    for label in np.unique(y[candidates]):
        indices = np.flatnonzero(candidates & (y == label))
        if len(indices) > per_class:
            indices = np.sort(rng.choice(indices, size=per_class, replace=False))
        keep[indices] = True
    return keep


def held_out_subjects(subject: np.ndarray, seed: int, test_fraction: float) -> np.ndarray:
    """A seeded choice of round(test_fraction x #subjects) subjects (at least 1, never all)."""
    subjects = np.unique(subject)
    if len(subjects) < 2:
        raise ValueError(f"a subject split needs at least 2 subjects, found {len(subjects)}")
    n_test = int(np.clip(round(test_fraction * len(subjects)), 1, len(subjects) - 1))
    return np.sort(np.random.default_rng(seed).choice(subjects, size=n_test, replace=False))


def stratified_test_mask(y: np.ndarray, seed: int, test_fraction: float) -> np.ndarray:
    """A seeded stratified test mask holding ~test_fraction of each class."""
    from sklearn.model_selection import train_test_split  # deferred: heavy import

    _, test_index = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    mask = np.zeros(len(y), dtype=bool)
    mask[test_index] = True
    return mask
