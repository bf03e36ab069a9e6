"""Exemplar memory with a fixed total budget, iCaRL herding and nearest-mean-of-exemplars.

The budget is shared equally by the seen classes (``budget // num_classes``
each), so every class's share shrinks as classes arrive. Exemplars of a class
are stored in selection order; shrinking keeps the first ``m`` (iCaRL's
ReduceExemplarSet), which for herding keeps the best approximation of the class
mean that ``m`` samples give.

Features passed in are L2-normalised here before herding and before computing
class means, as in iCaRL.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

SELECTIONS = ("herding", "random")
_EPS = 1e-8

FeatureFn = Callable[[np.ndarray], np.ndarray]


def l2_normalize(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + _EPS)


def herding_order(features: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` samples picked greedily so that their running mean
    stays closest to the mean of all (normalised) ``features`` (iCaRL Alg. 4).

    A sample is picked at most once; ``count`` above the number of samples
    returns all of them, in herding order.
    """
    feats = l2_normalize(features)
    target = feats.mean(axis=0)
    count = min(int(count), len(feats))
    chosen: list[int] = []
    available = np.ones(len(feats), dtype=bool)
    running_sum = np.zeros_like(target)
    for k in range(1, count + 1):
        candidate_means = (running_sum + feats) / k
        distances = np.linalg.norm(target - candidate_means, axis=1)
        distances[~available] = np.inf
        pick = int(np.argmin(distances))
        chosen.append(pick)
        available[pick] = False
        running_sum += feats[pick]
    return np.asarray(chosen, dtype=np.int64)


class ExemplarMemory:
    """Stores up to ``budget`` training samples in total, split evenly over classes.

    Args:
        budget: total number of exemplars (paper: 200 for HAR, 2000 for images).
        selection: "herding" (iCaRL) or "random".
    """

    def __init__(self, budget: int, selection: str = "herding"):
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self.budget = int(budget)
        self.selection = selection
        self._x: dict[int, np.ndarray] = {}  # label -> exemplars in selection order
        self._means: dict[int, np.ndarray] = {}  # label -> unit-norm class mean

    # ------------------------------------------------------------------ contents
    @property
    def classes(self) -> list[int]:
        return sorted(self._x)

    @property
    def num_classes(self) -> int:
        return len(self._x)

    def __len__(self) -> int:
        return sum(len(v) for v in self._x.values())

    def per_class(self, num_classes: int) -> int:
        """Exemplars each class may keep when ``num_classes`` classes share the budget."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        return self.budget // num_classes

    def exemplars(self, label: int) -> np.ndarray:
        return self._x[int(label)]

    def data(self) -> tuple[np.ndarray | None, np.ndarray]:
        """All exemplars and their labels, grouped by class in label order."""
        if not self._x:
            return None, np.zeros(0, dtype=np.int64)
        labels = self.classes
        x = np.concatenate([self._x[c] for c in labels])
        y = np.concatenate([np.full(len(self._x[c]), c, dtype=np.int64) for c in labels])
        return x, y

    # ------------------------------------------------------------------ update
    def update(self, x_new: np.ndarray, y_new: np.ndarray, feature_fn: FeatureFn,
               seed: int) -> None:
        """Add the classes in ``y_new``, shrink the old ones, refresh class means.

        ``feature_fn`` maps a batch of inputs to features of the current network;
        ``seed`` drives random selection (unused by herding).
        """
        x_new = np.asarray(x_new)
        y_new = np.asarray(y_new)
        new_classes = [int(c) for c in np.unique(y_new)]
        clash = set(new_classes) & set(self._x)
        if clash:
            raise ValueError(f"classes {sorted(clash)} are already in memory")
        total = self.num_classes + len(new_classes)
        m = self.per_class(total)
        if m < 1:
            raise ValueError(f"a memory budget of {self.budget} cannot hold one exemplar for "
                             f"each of {total} classes; use a budget of at least {total}")
        for label in self._x:
            self._x[label] = self._x[label][:m]
        for label in new_classes:
            x_class = x_new[y_new == label]
            if self.selection == "herding":
                order = herding_order(feature_fn(x_class), m)
            else:
                rng = np.random.default_rng([int(seed), label])
                order = rng.permutation(len(x_class))[:m]
            self._x[label] = x_class[order].copy()
        self.compute_means(feature_fn)

    def compute_means(self, feature_fn: FeatureFn) -> None:
        """Unit-norm mean of the normalised exemplar features of each class (iCaRL)."""
        self._means = {}
        for label, x in self._x.items():
            mean = l2_normalize(feature_fn(x)).mean(axis=0)
            self._means[label] = mean / (np.linalg.norm(mean) + _EPS)

    # ------------------------------------------------------------------ NME
    @property
    def has_means(self) -> bool:
        return bool(self._means)

    def class_means(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, means) with one unit-norm row per class."""
        if not self._means:
            raise ValueError("no class means yet: call update() after the first task")
        labels = np.asarray(sorted(self._means), dtype=np.int64)
        return labels, np.stack([self._means[c] for c in labels])

    def nme_predict(self, features: np.ndarray) -> np.ndarray:
        """Label of the nearest class mean to each normalised feature vector."""
        labels, means = self.class_means()
        feats = l2_normalize(features)
        # ||f - mu||^2 = |f|^2 + 1 - 2 f.mu with unit-norm means: the nearest mean has the
        # largest dot product, which avoids an (N, classes, dim) difference tensor.
        return labels[np.argmax(feats @ means.T, axis=1)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Tensors and plain data only (a checkpoint is read with
        ``torch.load(..., weights_only=True)``): the arrays are stored as tensors of
        the same dtype and become arrays again in ``load_state_dict``."""
        return {"budget": self.budget, "selection": self.selection,
                "exemplars": {c: array_to_tensor(v) for c, v in self._x.items()},
                "means": {c: array_to_tensor(v) for c, v in self._means.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["budget"] != self.budget or state["selection"] != self.selection:
            raise ValueError(
                f"memory state was saved with budget={state['budget']}, "
                f"selection={state['selection']!r}; this memory has budget={self.budget}, "
                f"selection={self.selection!r}")
        self._x = {int(c): tensor_to_array(v) for c, v in state["exemplars"].items()}
        self._means = {int(c): tensor_to_array(v) for c, v in state["means"].items()}


def array_to_tensor(array: np.ndarray):
    """A tensor copy of ``array`` with the same dtype and values (for a state_dict)."""
    import torch

    return torch.from_numpy(np.array(array, copy=True))


def tensor_to_array(value) -> np.ndarray:
    """Back from ``array_to_tensor``; arrays (states saved before) pass through."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
