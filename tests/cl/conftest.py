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


@pytest.fixture(scope="session")
def odd_scenario():
    """Three tasks of two classes each, with 15 features: FCNet 15-15-15, odd widths."""
    from helpers import ODD_DIM

    return ClassIncrementalScenario(*make_blobs(dim=ODD_DIM), init_classes=2, increment=2,
                                    seed=0)
