"""Class-incremental scenario: a seeded class order cut into tasks.

Labels are remapped so that ``class_order[i]`` becomes label ``i``; task 0 then
holds labels ``0..init_classes-1``, task 1 the next ``increment`` labels, and so
on. Learners rely on this: the classes of task t are always the contiguous block
after the classes already seen, so heads grow by appending rows.

The data is sorted by remapped label once, which makes every task's training set
and every "all classes seen so far" test set a contiguous slice (a view, not a
copy): CIFAR-100 does not get duplicated per task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Task:
    """One step of the scenario.

    ``classes``: the labels that are new in this task; ``seen_classes``: every
    label seen so far, this task's included. ``x_train``/``y_train`` hold the
    new classes only; ``x_test``/``y_test`` hold ALL seen classes.
    """

    index: int
    classes: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    seen_classes: np.ndarray

    @property
    def num_known_classes(self) -> int:
        """Classes learnt before this task (the first label of ``classes``)."""
        return len(self.seen_classes) - len(self.classes)


def valid_increments(num_classes: int, init_classes: int) -> list[int]:
    """The increments that split the classes left after the first task evenly."""
    rest = num_classes - init_classes
    if rest <= 0:
        return []
    return [d for d in range(1, rest + 1) if rest % d == 0]


def check_task_size(name: str, value) -> int:
    """``init_classes`` or ``increment`` (``name``) must be a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_split(num_classes: int, init_classes: int, increment: int) -> int:
    """Validate a split and return its number of tasks; ValueError says what is valid."""
    check_task_size("init_classes", init_classes)
    check_task_size("increment", increment)
    if init_classes > num_classes:
        raise ValueError(
            f"init_classes={init_classes} is more than the {num_classes} classes of the "
            f"dataset; valid values are 1..{num_classes}")
    rest = num_classes - init_classes
    if rest % increment != 0:
        raise ValueError(
            f"init_classes={init_classes} + k*increment must equal the {num_classes} classes, "
            f"but {rest} remaining classes are not a multiple of increment={increment}; "
            f"with init_classes={init_classes} valid increments are "
            f"{valid_increments(num_classes, init_classes)}")
    return 1 + rest // increment


class ClassIncrementalScenario:
    """Split a labelled dataset into class-incremental tasks.

    Args:
        x_train, y_train, x_test, y_test: arrays; labels are integers 0..K-1 and
            every class must have training samples.
        init_classes: number of classes in the first task.
        increment: number of classes in every later task.
        seed: shuffles the class order (``np.random.default_rng(seed)``).
    """

    def __init__(self, x_train, y_train, x_test, y_test, init_classes: int,
                 increment: int, seed: int):
        x_train, y_train = _check_pair(x_train, y_train, "train")
        x_test, y_test = _check_pair(x_test, y_test, "test")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ValueError(f"x_train samples have shape {x_train.shape[1:]} but x_test "
                             f"samples have shape {x_test.shape[1:]}")
        num_classes = int(y_train.max()) + 1
        missing = np.setdiff1d(np.arange(num_classes), y_train)
        if missing.size:
            raise ValueError(f"labels must be 0..K-1 with training samples for every class; "
                             f"classes {missing.tolist()} have none")
        if y_test.size and int(y_test.max()) >= num_classes:
            raise ValueError(f"y_test has label {int(y_test.max())} but y_train only has "
                             f"classes 0..{num_classes - 1}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")

        self.num_classes = num_classes
        self.init_classes = int(init_classes)
        self.increment = int(increment)
        self.num_tasks = check_split(num_classes, init_classes, increment)
        self.seed = int(seed)
        self.class_order = np.random.default_rng(self.seed).permutation(num_classes)

        # to_new[original label] = remapped label
        to_new = np.empty(num_classes, dtype=np.int64)
        to_new[self.class_order] = np.arange(num_classes)
        self._x_train, self._y_train = _sorted_by_label(x_train, to_new[y_train])
        self._x_test, self._y_test = _sorted_by_label(x_test, to_new[y_test])
        self._class_to_task = np.concatenate(
            [np.zeros(self.init_classes, dtype=np.int64)]
            + [np.full(self.increment, t, dtype=np.int64) for t in range(1, self.num_tasks)])
        self.tasks: list[Task] = [self._make_task(t) for t in range(self.num_tasks)]

    def task_classes(self, index: int) -> np.ndarray:
        """Remapped labels that are new in task ``index``."""
        start = 0 if index == 0 else self.init_classes + (index - 1) * self.increment
        stop = self.init_classes + index * self.increment
        return np.arange(start, stop, dtype=np.int64)

    def task_of_class(self, label):
        """Task index in which a remapped label arrives (works on arrays too)."""
        labels = np.asarray(label)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got {label!r}")
        result = self._class_to_task[labels]
        return int(result) if result.ndim == 0 else result

    def _make_task(self, index: int) -> Task:
        classes = self.task_classes(index)
        seen = np.arange(classes[-1] + 1, dtype=np.int64)
        lo, hi = np.searchsorted(self._y_train, [classes[0], classes[-1] + 1])
        test_hi = np.searchsorted(self._y_test, classes[-1] + 1)
        return Task(index=index, classes=classes,
                    x_train=self._x_train[lo:hi], y_train=self._y_train[lo:hi],
                    x_test=self._x_test[:test_hi], y_test=self._y_test[:test_hi],
                    seen_classes=seen)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return self.num_tasks

    def __repr__(self) -> str:
        return (f"ClassIncrementalScenario(num_classes={self.num_classes}, "
                f"init_classes={self.init_classes}, increment={self.increment}, "
                f"num_tasks={self.num_tasks}, seed={self.seed})")


def _check_pair(x, y, split: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y_{split} must be a 1-D array of labels, got shape {y.shape}")
    if x.ndim < 2 or len(x) != len(y):
        raise ValueError(f"x_{split} must have one row per label: got x_{split} shape "
                         f"{x.shape} and {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_{split} must hold integer labels, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"y_{split} labels must be >= 0, got {int(y.min())}")
    if split == "train" and y.size == 0:
        raise ValueError("y_train is empty")
    return x, y.astype(np.int64)


def _sorted_by_label(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Stable: samples of a class keep their original relative order.
    order = np.argsort(y, kind="stable")
    return x[order], y[order]
