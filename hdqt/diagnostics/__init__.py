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

from hdqt.diagnostics.gradients import (BACKWARD_OPERANDS, Diagnostics, GradStats, LayerDiagnostics,
                                        backward_operand_tensors, cross_entropy_loss, diagnose,
                                        layer_level_use)
from hdqt.diagnostics.levels import LevelUse, format_grid, grid_level_use, level_use, operand_level_use

__all__ = ["BACKWARD_OPERANDS", "Diagnostics", "GradStats", "LayerDiagnostics", "LevelUse",
           "backward_operand_tensors", "cross_entropy_loss", "diagnose", "format_grid", "grid_level_use",
           "layer_level_use", "level_use", "operand_level_use"]
