"""Scalings: how a tensor is mapped onto a format (``values = tensor / scale``).

* ``DynamicScaling(clip_ratio)``: per tensor (or per sample), ``clip_ratio * max|t|``
  maps to the format's largest magnitude. The integer recipes' rule, and the
  generic float recipes' (max-scaled per tensor).
* ``SAWBScaling(c1, c2)``: statistics-aware weight binning (Choi et al. 2018), the
  clip ``c1 * sqrt(E[t^2]) - c2 * E|t|`` maps to the largest magnitude; LUQ's
  forward rule. ``sawb_coefficients(bits)`` gives the coefficients: at 4 bits LUQ's
  (12.1, 12.2); for other widths our own fit by the SAWB paper's procedure (the
  MSE-optimal clip of a symmetric ``bits``-bit integer grid, +-(2^(b-1)-1), found by
  search for unit-variance normal, Laplace, uniform, logistic, Student-t(5) and a
  two-scale normal mixture, then least squares of clip* on (sqrt(E t^2), -E|t|)).
  The same fit at 4 bits gives (11.35, 11.12), close to LUQ's constants (fit on
  their +-8 grid). A clip that comes out non-positive (a near-constant tensor) or
  above max|t| is replaced by max|t|: the official code would divide by a
  non-positive scale, or waste levels beyond the largest value.
* ``ExponentBiasScaling(room)``: FP134's per-tensor exponent bias. The scale is a
  power of two 2^(s - emax) that puts the binade [2^s, 2^(s+1)) at the format's top
  binade; ``s`` starts at floor(log2 max|t|) + room and is then tracked across calls
  with lptorch's hysteresis: after each call, if max|t| reached the top ``room``
  binades (>= 2^(s+1-room)) s grows by 1, else if it stayed below the top room+1
  binades (< 2^(s-room)) s shrinks by 1. With ``room=1`` (our default) one empty
  binade is kept above the tensor's maximum, so a tensor that grows by less than
  2x a step never saturates; ``room=0`` is lptorch's default (the maximum fills the
  top binade; growth saturates for a step). The exponent is state: it lives in the
  layer's runtime, one per operand, and is saved with the layer's state_dict
  (never in a module-level variable, as lptorch's is). Without a state (a bare
  ``Quantizer.quantize`` call) it is chosen afresh from the tensor, every call.
  lptorch flags overflow on the quantized values and we on max|t|: the same but for
  a maximum within rounding of a binade boundary.

* ``GroupMeanScaling(group)``: HadaNets' magnitudes for ``BinaryFormat``. A tensor is
  read as rows (its first dimension) of K values (the rest, flattened: the reduction
  dimension of a weight or of an im2col input); each row is cut into groups of
  ``group`` consecutive values (the last group holds the K mod group left over; None:
  one group per row, as in XNOR-Net) and each group's scale beta is its mean |t|.
  The scale is then a tensor, one value per row and group (``betas``).

Granularity (``Quantizer.granularity``) says over what a scale is computed: the
whole tensor, or each sample (``"sample"``, a scale per index of the operand's
sample dimension; ``DynamicScaling`` and ``SAWBScaling``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hdqt.quantization.formats import from_kind_dict

# (c1, c2) by bit width; 4 bits is LUQ's official constant, the others our fit (see above).
SAWB_COEFFICIENTS = {2: (2.648, 1.764), 3: (6.673, 5.948), 4: (12.1, 12.2), 5: (16.403, 16.828),
                     6: (22.143, 23.366), 8: (35.498, 38.671)}


def sawb_coefficients(bits: int) -> tuple[float, float]:
    if bits not in SAWB_COEFFICIENTS:
        raise ValueError(f"no SAWB coefficients for {bits} bits (known: {sorted(SAWB_COEFFICIENTS)}); "
                         "give SAWBScaling(c1, c2) explicitly")
    return SAWB_COEFFICIENTS[bits]


def _positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class DynamicScaling:
    """Per-tensor scale recomputed at every call from the tensor's max magnitude.

    The clip value is ``clip_ratio * max|t|``: a ratio below 1 trades clipping of
    the few largest values for a finer grid for all others (the paper's forward
    quantizer uses 0.975).
    """

    clip_ratio: float = 1.0

    kind = "dynamic"

    def __post_init__(self) -> None:
        if not (isinstance(self.clip_ratio, (int, float)) and 0.0 < self.clip_ratio <= 1.0):
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")

    def clip(self, t: torch.Tensor, amax: torch.Tensor, dims) -> torch.Tensor:
        return amax * self.clip_ratio

    def to_dict(self) -> dict:
        return {"kind": "dynamic", "clip_ratio": float(self.clip_ratio)}


@dataclass(frozen=True)
class SAWBScaling:
    """clip = c1 * sqrt(E[t^2]) - c2 * E|t| (over the tensor or the sample), at most max|t|."""

    c1: float = 12.1
    c2: float = 12.2

    kind = "sawb"

    def __post_init__(self) -> None:
        _positive_float("c1", self.c1)
        _positive_float("c2", self.c2)

    def clip(self, t: torch.Tensor, amax: torch.Tensor, dims) -> torch.Tensor:
        t = t.detach()
        if dims is None:
            rms, mean_abs = t.square().mean().sqrt(), t.abs().mean()
        else:
            rms = t.square().mean(dims, keepdim=True).sqrt()
            mean_abs = t.abs().mean(dims, keepdim=True)
        clip = rms.mul_(self.c1).sub_(mean_abs.mul_(self.c2))
        return torch.where((clip > 0) & (clip < amax), clip, amax)

    def to_dict(self) -> dict:
        return {"kind": "sawb", "c1": float(self.c1), "c2": float(self.c2)}


@dataclass(frozen=True)
class ExponentBiasScaling:
    """FP134's tracked per-tensor exponent bias (module docstring)."""

    room: int = 1

    kind = "exponent_bias"

    def __post_init__(self) -> None:
        if isinstance(self.room, bool) or not isinstance(self.room, int) or not 0 <= self.room <= 4:
            raise ValueError(f"room must be an integer in 0..4, got {self.room!r}")

    def initial_exponent(self, amax: float) -> int:
        return (math.frexp(amax)[1] - 1 if amax > 0 else 0) + self.room

    def next_exponent(self, exponent: int, amax: float) -> int:
        """lptorch's hysteresis: one binade up on overflow into the top ``room`` binades,
        one down when nothing reached the top room+1 binades."""
        if amax >= math.ldexp(1.0, exponent + 1 - self.room):
            return exponent + 1
        if amax < math.ldexp(1.0, exponent - self.room):
            return exponent - 1
        return exponent

    def to_dict(self) -> dict:
        return {"kind": "exponent_bias", "room": self.room}


def check_group(group) -> int | None:
    """None (one group per row) or a power of two >= 2 (groups never straddle a 64-bit word
    of the packed signs, so the bit-packed kernel sums whole words or whole sub-words)."""
    if group is None:
        return None
    if isinstance(group, bool) or not isinstance(group, int) or group < 2 or group & (group - 1):
        raise ValueError(f"group must be None (one group per row) or a power of two >= 2, got {group!r}")
    return group


@dataclass(frozen=True)
class GroupMeanScaling:
    """One scale per row and group of ``group`` consecutive values: their mean |t| (module docstring)."""

    group: int | None = None

    kind = "group_mean"

    def __post_init__(self) -> None:
        check_group(self.group)

    def group_size(self, k: int) -> int:
        """The length of a full group in a row of ``k`` values."""
        return k if self.group is None or self.group >= k else self.group

    def to_dict(self) -> dict:
        return {"kind": self.kind, "group": self.group}


Scaling = DynamicScaling | SAWBScaling | ExponentBiasScaling | GroupMeanScaling
SCALING_KINDS = {"dynamic": DynamicScaling, "sawb": SAWBScaling, "exponent_bias": ExponentBiasScaling,
                 "group_mean": GroupMeanScaling}


def scaling_from_dict(data: dict) -> Scaling:
    return from_kind_dict(data, SCALING_KINDS, "dynamic", "scaling")
