"""Continual-learning metrics: pure functions on numpy arrays, all in percent.

Notation: T tasks, ``A[t, j]`` = accuracy after training task t on the test
samples of the classes of task j (NaN for j > t, nothing learnt yet), and
``a_t`` = accuracy after task t on the test samples of ALL classes seen so far
(weighted by samples, so not the row mean of A when tasks differ in size).

* average incremental accuracy  = (1/T) * sum_t a_t            (Rebuffi et al., 2017)
* last accuracy                 = a_{T-1}
* average forgetting            = (1/(T-1)) * sum_{j<T-1} max_{l<T-1} (A[l, j] - A[T-1, j])
                                                                 (Chaudhry et al., 2018)
* backward transfer             = (1/(T-1)) * sum_{j<T-1} (A[T-1, j] - A[j, j])
                                                                 (Lopez-Paz & Ranzato, 2017)

Forgetting and backward transfer are undefined (NaN) with a single task.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def accuracy(y_true, y_pred) -> float:
    """Percentage of ``y_pred`` equal to ``y_true``; NaN for no samples."""
    y_true, y_pred = _pair(y_true, y_pred)
    if y_true.size == 0:
        return float("nan")
    return 100.0 * float(np.mean(y_true == y_pred))


def task_accuracies(y_true, y_pred, class_to_task, num_tasks: int) -> np.ndarray:
    """One row of the accuracy matrix: accuracy on the samples of each task's classes.

    ``class_to_task[label]`` is the task a label belongs to. Tasks with no test
    sample (not reached yet) get NaN.
    """
    y_true, y_pred = _pair(y_true, y_pred)
    class_to_task = np.asarray(class_to_task)
    tasks = class_to_task[y_true]
    row = np.full(num_tasks, np.nan)
    for j in range(num_tasks):
        mask = tasks == j
        if mask.any():
            row[j] = 100.0 * float(np.mean(y_true[mask] == y_pred[mask]))
    return row


def accuracy_matrix(y_true_per_task: Sequence, y_pred_per_task: Sequence,
                    class_to_task) -> np.ndarray:
    """``A[t, j]`` from the test labels and predictions made after each task t.

    The matrix is square with one row per evaluation; entries for tasks not
    reached yet (j > t) are NaN.
    """
    if len(y_true_per_task) != len(y_pred_per_task):
        raise ValueError(f"got {len(y_true_per_task)} label arrays but "
                         f"{len(y_pred_per_task)} prediction arrays")
    size = len(y_true_per_task)
    matrix = np.vstack([task_accuracies(t, p, class_to_task, size)
                        for t, p in zip(y_true_per_task, y_pred_per_task)]) if size else \
        np.zeros((0, 0))
    matrix[np.triu_indices(size, k=1)] = np.nan
    return matrix


def average_incremental_accuracy(seen_accuracies) -> float:
    """Mean over tasks of the accuracy on all classes seen so far."""
    values = _vector(seen_accuracies, "seen_accuracies")
    return float(np.mean(values))


def last_accuracy(seen_accuracies) -> float:
    """Accuracy on all classes after the last task."""
    return float(_vector(seen_accuracies, "seen_accuracies")[-1])


def forgetting(matrix) -> float:
    """Average forgetting of the tasks before the last one (NaN with one task)."""
    a = _square(matrix)
    last = a.shape[0] - 1
    if last < 1:
        return float("nan")
    best = np.nanmax(a[:last, :last], axis=0)  # best accuracy of task j before the end
    return float(np.mean(best - a[last, :last]))


def backward_transfer(matrix) -> float:
    """How much learning later tasks changed earlier ones (negative = forgetting)."""
    a = _square(matrix)
    last = a.shape[0] - 1
    if last < 1:
        return float("nan")
    return float(np.mean(a[last, :last] - np.diag(a)[:last]))


def summary(matrix, seen_accuracies) -> dict[str, float]:
    """All scalar metrics at once."""
    return {
        "avg_incremental_accuracy": average_incremental_accuracy(seen_accuracies),
        "last_accuracy": last_accuracy(seen_accuracies),
        "forgetting": forgetting(matrix),
        "backward_transfer": backward_transfer(matrix),
    }


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    return y_true, y_pred


def _vector(values, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=float).reshape(-1)
    if values.size == 0:
        raise ValueError(f"{name} is empty: need the accuracy after at least one task")
    return values


def _square(matrix) -> np.ndarray:
    a = np.asarray(matrix, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square (tasks x tasks), got shape {a.shape}")
    return a
