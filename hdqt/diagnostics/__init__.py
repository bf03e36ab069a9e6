"""Gradient diagnostics: how far the quantized gradients of each layer are from float32
autograd on the same weights and batch, and how well the backward operands use the
quantizer's levels, with and without the Hadamard transform.

    from hdqt.diagnostics import diagnose
    result = diagnose(model, x, y, hdqt.recipe("hdqt"), draws=8)
    print(result.table())          # Markdown, per layer
    result.to_dict()               # for machines (``hdqt diagnose --json``)

``hdqt run --diagnose-every N`` records them during a run (``tracking``); ``hdqt report``
plots them. See docs/reports.md.
"""
from __future__ import annotations

import importlib

# Public name -> defining module, loaded on first use (PEP 562): they import torch, and
# `hdqt diagnose --help` should answer without it.
_LAZY_NAMES = {
    **dict.fromkeys(("BACKWARD_OPERANDS", "Diagnostics", "GradStats", "LayerDiagnostics", "backward_operand_tensors",
                     "cross_entropy_loss", "diagnose", "layer_level_use"), "hdqt.diagnostics.gradients"),
    **dict.fromkeys(("LevelUse", "format_grid", "grid_level_use", "level_use", "operand_level_use"),
                    "hdqt.diagnostics.levels"),
}
__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'hdqt.diagnostics' has no attribute {name!r}")
