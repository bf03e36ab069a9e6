"""Rounding modes. Rounding is a choice separate from the format and the scale.

Both functions round a temporary tensor in place: the caller owns ``values``.
"""
from __future__ import annotations

import torch

ROUNDING_MODES = ("nearest", "stochastic")


def check_rounding(mode: str) -> str:
    if mode not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {mode!r}")
    return mode


def round_nearest_(values: torch.Tensor) -> torch.Tensor:
    return values.round_()


def round_stochastic_(values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Unbiased stochastic rounding: floor(v + u), u ~ U[0, 1) from ``generator``.

    For v = n + f this is n + Bernoulli(f), so E[result] = v. It has the same
    distribution as sign(v) * (floor|v| + Bernoulli(frac|v|)) and costs one draw,
    one add and one floor.
    """
    noise = torch.rand(values.shape, generator=generator, device=values.device, dtype=values.dtype)
    return values.add_(noise).floor_()
