"""Tiny separable synthetic data for the continual-learning tests."""
from __future__ import annotations

import numpy as np
import pytest

from hdqt.cl.scenario import ClassIncrementalScenario

NUM_CLASSES = 6
DIM = 16


def make_blobs(num_classes: int = NUM_CLASSES, dim: int = DIM, train_per_class: int = 40,
               test_per_class: int = 10, seed: int = 0):
    """Gaussian blobs around well-separated centres: any learner that learns beats chance."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 3.0

    def draw(per_class):
        y = np.repeat(np.arange(num_classes), per_class)
        x = centres[y] + rng.normal(size=(len(y), dim))
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = draw(train_per_class)
    x_test, y_test = draw(test_per_class)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="session")
def blobs():
    return make_blobs()


@pytest.fixture(scope="session")
def scenario(blobs):
    """Three tasks of two classes each."""
    return ClassIncrementalScenario(*blobs, init_classes=2, increment=2, seed=0)
