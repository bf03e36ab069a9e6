"""Quantizer level use: how many levels of a grid a tensor's codes hit, and the entropy
of their histogram.

A b-bit signed symmetric grid has 2^b - 1 levels (-(2^(b-1)-1) .. 2^(b-1)-1), an
unsigned one 2^b (0 .. 2^b-1). Max-scaled per tensor, a heavy-tailed gradient puts
almost every entry on the few levels around zero: few levels hit, low entropy. The
Hadamard transform spreads an outlier over its block, which is what HDQT relies on;
``operand_level_use`` measures it on one backward operand, with or without the
transform.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from hdqt.quantization.formats import IntFormat
from hdqt.quantization.hadamard import BlockLayout, hadamard_transform
from hdqt.quantization.quantizer import Quantizer


@dataclass(frozen=True)
class LevelUse:
    """Level use of one quantized tensor."""

    levels: int  # levels of the grid the tensor was quantized to
    hit: int  # levels holding at least one code
    entropy_bits: float  # entropy of the level histogram, in bits (at most log2(levels))
    elements: int

    @property
    def max_entropy_bits(self) -> float:
        return math.log2(self.levels) if self.levels > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "max_entropy_bits": self.max_entropy_bits}


def level_use(codes: torch.Tensor, qmin: int, qmax: int) -> LevelUse:
    """Level use of integer ``codes`` (held in any dtype) on the grid ``qmin..qmax``."""
    if qmax < qmin:
        raise ValueError(f"empty grid: qmin={qmin} > qmax={qmax}")
    return grid_level_use(codes, torch.arange(qmin, qmax + 1, dtype=torch.float64))


def grid_level_use(values: torch.Tensor, grid: torch.Tensor) -> LevelUse:
    """Level use of ``values`` on the sorted, distinct representable values ``grid`` (an
    integer grid's codes, or a float or log format's values); every value must be on it."""
    grid = grid.detach().to(torch.float64).reshape(-1)
    flat = values.detach().reshape(-1).to("cpu", torch.float64)
    levels = grid.numel()
    if levels == 0:
        raise ValueError("empty grid")
    index = torch.searchsorted(grid, flat).clamp_(max=levels - 1)
    if flat.numel() and not torch.equal(grid[index], flat):
        raise ValueError(f"values must lie on the grid ({grid[0].item():g} .. {grid[-1].item():g}, "
                         f"{levels} levels)")
    counts = torch.bincount(index, minlength=levels).to(torch.float64)
    total = float(counts.sum())
    if total == 0:
        return LevelUse(levels, 0, 0.0, 0)
    p = counts[counts > 0] / total
    entropy = float(-(p * torch.log2(p)).sum())
    return LevelUse(levels, int((counts > 0).sum()), max(entropy, 0.0), int(total))


def format_grid(quantizer: Quantizer, signed: bool) -> torch.Tensor:
    """The values a quantizer's format can give: an integer format's codes (on its signed
    or unsigned range, as the data chose for ``auto``), another format's ``values()``."""
    fmt = quantizer.format
    if isinstance(fmt, IntFormat):
        signed = fmt.signed == "signed" or (fmt.signed == "auto" and signed)
        top = fmt.signed_max if signed else fmt.unsigned_max
        return torch.arange(-top if signed else 0, top + 1, dtype=torch.float64)
    values = getattr(fmt, "values", None)
    if values is None:
        raise ValueError(f"cannot enumerate the values of {type(fmt).__name__}")
    return torch.unique(values().to(torch.float64))  # sorted; +0 and -0 are one value


def operand_level_use(quantizer: Quantizer, tensor: torch.Tensor, dim: int, layout: BlockLayout | None,
                      generator: torch.Generator | None = None) -> LevelUse:
    """Level use of ``quantizer`` on ``tensor`` as a backward product quantizes it: first
    the Hadamard transform ``layout`` along ``dim`` (None: no transform), then the
    quantizer (stochastic rounding draws from ``generator``). Values that come out
    non-finite (a format that overflows to inf or NaN) are left out of the histogram."""
    tensor = tensor.detach().float()
    if layout is not None and not layout.is_identity:
        tensor = hadamard_transform(tensor, dim, layout)
    q = quantizer.quantize(tensor, generator, nonfinite="propagate")
    values = q.values[torch.isfinite(q.values)]
    negative = bool(tensor.numel()) and float(tensor.min()) < 0
    return grid_level_use(values, format_grid(quantizer, negative))
