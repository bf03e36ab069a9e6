"""hdqt: fully quantized training (HDQT) for class-incremental continual learning.

The engine's verbs are at the top level::

    import hdqt
    policy = hdqt.recipe("hdqt", bits=4, acc_bits=8, tile=32)
    model = hdqt.quantize_model(model, policy)

Sub-packages: ``hdqt.quantization`` (formats, Hadamard, matmul, layers, recipes),
``hdqt.data``, ``hdqt.models``, ``hdqt.cl`` (scenarios, memory, learners, metrics),
``hdqt.cost`` (operations and energy of a training step) and ``hdqt.experiments``
(the ``hdqt run`` command).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Nothing is imported until a name is
# first used (PEP 562), so `import hdqt` (and with it `hdqt --help`) does not load
# torch; `hdqt.recipe`, `from hdqt import quantize_model` etc. work as before.
_LAZY_NAMES = {
    "QuantConv2d": "hdqt.quantization",
    "QuantLinear": "hdqt.quantization",
    "QuantPolicy": "hdqt.quantization",
    "list_recipes": "hdqt.quantization",
    "quantize_model": "hdqt.quantization",
    "recipe": "hdqt.quantization",
    "reseed_quantizers": "hdqt.quantization",
}
_LAZY_SUBPACKAGES = ("cl", "cost", "data", "experiments", "models", "quantization")

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


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"hdqt.{name}")
    raise AttributeError(f"module 'hdqt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES) | set(_LAZY_SUBPACKAGES))
