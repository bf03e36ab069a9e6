"""Turn the per-task history of a run into the metrics written to ``metrics.json``."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# The classifier a method is judged by in its paper: iCaRL classifies with the
# nearest mean of exemplars, the others with their network's head.
_PRIMARY_CLASSIFIER = {"icarl": "nme"}
METRIC_NAMES = ("avg_incremental_accuracy", "last_accuracy", "forgetting", "backward_transfer")


def primary_classifier(method: str, available: Sequence[str]) -> str:
    preferred = _PRIMARY_CLASSIFIER.get(method, "cnn")
    return preferred if preferred in available else sorted(available)[0]


def accuracy_matrix(history: Sequence[dict[str, Any]], classifier: str) -> np.ndarray:
    """A[t, j]: accuracy (percent) after task t on the classes of task j; NaN for j > t."""
    size = len(history)
    matrix = np.full((size, size), np.nan)
    for t, record in enumerate(history):
        row = record["accuracy"][classifier]["per_task"]
        matrix[t, : len(row)] = row
    return matrix


def classifier_metrics(history: Sequence[dict[str, Any]], classifier: str) -> dict[str, Any]:
    from hdqt.cl import metrics

    matrix = accuracy_matrix(history, classifier)
    incremental = [record["accuracy"][classifier]["seen"] for record in history]
    scalars = metrics.summary(matrix, incremental)
    return {**{key: _none_if_nan(scalars[key]) for key in METRIC_NAMES},
            "incremental_accuracy": incremental,
            "accuracy_matrix": [[_none_if_nan(v) for v in row] for row in matrix.tolist()]}


def _none_if_nan(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def summarize(history: Sequence[dict[str, Any]], num_tasks: int, method: str) -> dict[str, Any]:
    """Metrics for every classifier, with the primary one repeated at the top level."""
    summary: dict[str, Any] = {"num_tasks": num_tasks, "finished_tasks": len(history),
                               "complete": len(history) == num_tasks}
    if not history:
        return summary
    # A classifier counts only if every task reported it (NME needs exemplars).
    classifiers = sorted(set.intersection(*(set(r["accuracy"]) for r in history)))
    per_classifier = {name: classifier_metrics(history, name) for name in classifiers}
    primary = primary_classifier(method, classifiers)
    summary["primary_classifier"] = primary
    summary.update({key: per_classifier[primary][key]
                    for key in (*METRIC_NAMES, "accuracy_matrix")})
    summary.update(per_classifier)
    return summary
