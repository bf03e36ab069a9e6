"""Tiny separable synthetic data for the continual-learning tests."""
from __future__ import annotations

import pytest

from hdqt.cl.scenario import ClassIncrementalScenario

from helpers import make_blobs


@pytest.fixture(scope="session")
def blobs():
    return make_blobs()


@pytest.fixture(scope="session")
def scenario(blobs):
    """Three tasks of two classes each."""
    return ClassIncrementalScenario(*blobs, init_classes=2, increment=2, seed=0)
