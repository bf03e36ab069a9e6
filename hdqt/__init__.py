"""hdqt: fully quantized training (HDQT) for class-incremental continual learning.

The engine's verbs are at the top level::

    import hdqt
    policy = hdqt.recipe("hdqt", bits=4, acc_bits=8, tile=32)
    model = hdqt.quantize_model(model, policy)

Sub-packages: ``hdqt.quantization`` (formats, Hadamard, matmul, layers, recipes),
``hdqt.data``, ``hdqt.models``, ``hdqt.cl`` (scenarios, memory, learners, metrics)
and ``hdqt.experiments`` (the ``hdqt run`` command).
"""
from __future__ import annotations

import importlib

from hdqt.quantization import (
    QuantConv2d,
    QuantLinear,
    QuantPolicy,
    list_recipes,
    quantize_model,
    recipe,
    reseed_quantizers,
)

__version__ = "0.1.0"

__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "QuantPolicy",
    "list_recipes",
    "quantize_model",
    "recipe",
    "reseed_quantizers",
    "__version__",
]

_LAZY_SUBPACKAGES = {"data", "models", "cl", "experiments", "quantization"}


def __getattr__(name: str):
    # Sub-packages load on first use so that `import hdqt` stays light.
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"hdqt.{name}")
    raise AttributeError(f"module 'hdqt' has no attribute {name!r}")
