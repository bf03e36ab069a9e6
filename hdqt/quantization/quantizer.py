"""A quantizer is a format, a scaling rule and a rounding mode (QPyTorch style).

``Quantizer.quantize`` returns a ``QTensor``: integer-valued ``values`` (kept in a
float dtype so that BLAS can multiply them exactly) and a per-tensor ``scale``
such that ``values * scale`` approximates the input.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from hdqt.quantization import native
from hdqt.quantization.formats import IntFormat, format_from_dict
from hdqt.quantization.rounding import check_rounding, round_nearest_, round_stochastic_

NONFINITE_MODES = ("raise", "propagate")


class NonFiniteError(ValueError):
    """A tensor that is about to be quantized holds NaN or Inf."""


class QTensor(NamedTuple):
    values: torch.Tensor  # integer-valued, float dtype
    scale: float  # dequantized tensor = values * scale

    def dequantize(self) -> torch.Tensor:
        return self.values * self.scale


@dataclass(frozen=True)
class DynamicScaling:
    """Per-tensor scale recomputed at every call from the tensor's max magnitude.

    The clip value is ``clip_ratio * max|t|``: a ratio below 1 trades clipping of
    the few largest values for a finer grid for all others (the paper's forward
    quantizer uses 0.975).
    """

    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.clip_ratio, (int, float)) and 0.0 < self.clip_ratio <= 1.0):
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")

    def to_dict(self) -> dict:
        return {"kind": "dynamic", "clip_ratio": float(self.clip_ratio)}


def scaling_from_dict(data: dict) -> DynamicScaling:
    data = dict(data)
    kind = data.pop("kind", "dynamic")
    if kind != "dynamic":
        raise ValueError(f"scaling kind must be one of ('dynamic',), got {kind!r}")
    return DynamicScaling(**data)


@dataclass(frozen=True)
class Quantizer:
    format: IntFormat = field(default_factory=IntFormat)
    scaling: DynamicScaling = field(default_factory=DynamicScaling)
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        check_rounding(self.rounding)
        if not isinstance(self.format, IntFormat):
            raise ValueError(f"format must be an IntFormat, got {type(self.format).__name__}")
        if not isinstance(self.scaling, DynamicScaling):
            raise ValueError(f"scaling must be a DynamicScaling, got {type(self.scaling).__name__}")

    def quantize(
        self,
        tensor: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        nonfinite: str = "raise",
        role: str = "tensor",
        amax: float | None = None,
    ) -> QTensor:
        """Quantize ``tensor`` (not modified). ``role`` names it in error messages.

        ``amax`` is max|tensor| when the caller already knows it (a fused kernel
        computed it); a signed format then needs no extra pass over the tensor.
        """
        if native.usable(tensor) and (amax is None or self.format.signed == "auto"):
            lib = native.load()
            if lib is not None:  # one native call: range, grid and rounding
                return self._quantize_native_fused(tensor, generator, lib, nonfinite, role)
        if amax is None or self.format.signed == "auto":
            lo, hi = torch.aminmax(tensor.detach())
            lo, hi = lo.item(), hi.item()  # one host sync gives sign, magnitude and finiteness
            amax = max(-lo, hi)
        else:
            lo = -amax
        if not math.isfinite(amax):
            return _nonfinite(tensor, nonfinite, role)
        scale, qmin, qmax = self.grid(amax, lo)
        if native.usable(tensor):
            lib = native.load()
            if lib is not None:
                return self._quantize_native(tensor, generator, lib, scale, qmin, qmax)
        values = tensor.detach() / scale
        if self.rounding == "nearest":
            values = round_nearest_(values).clamp_(qmin, qmax)
        else:
            # Clamped before (clipping is part of the scaling) and after: max|t| / scale
            # can come out a rounding error above qmax in float32 (7.0000005 for 4 bits),
            # and v + u can round up to the next integer, so floor(v + u) of an in-range v
            # can still land one step outside the format.
            values = round_stochastic_(values.clamp_(qmin, qmax), generator).clamp_(qmin, qmax)
        return QTensor(values, scale)

    def grid(self, amax: float, lo: float) -> tuple[float, int, int]:
        """(scale, qmin, qmax) for a finite tensor with max|t| = ``amax`` and minimum ``lo``."""
        fmt = self.format
        signed = fmt.signed == "signed" or (fmt.signed == "auto" and lo < 0)
        qmax = fmt.signed_max if signed else fmt.unsigned_max
        qmin = -qmax if signed else 0
        clip = self.scaling.clip_ratio * amax
        # An all-zero tensor gets scale 1 so that it maps to zeros, not NaN.
        return (clip / qmax if clip > 0 else 1.0), qmin, qmax

    @staticmethod
    def stream_seed(generator: torch.Generator | None) -> int:
        """The 63-bit key of a native counter-based random stream, drawn from ``generator``."""
        return int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())

    def _quantize_native_fused(self, tensor, generator, lib, nonfinite, role) -> QTensor:
        """Range, grid (as ``grid``) and rounding in one native call."""
        src, out = _native_buffers(tensor)
        seed = self.stream_seed(generator) if self.rounding == "stochastic" else 0
        sign_mode = ("signed", "unsigned", "auto").index(self.format.signed)
        scale = ctypes.c_double()
        status = lib.hdqt_quantize_f32(
            src.data_ptr(), out.data_ptr(), src.numel(), self.rounding == "stochastic", sign_mode,
            self.scaling.clip_ratio, self.format.signed_max, self.format.unsigned_max, seed, ctypes.byref(scale),
            native.threads(),
        )
        if status != 0:
            return _nonfinite(tensor, nonfinite, role)
        return QTensor(out, scale.value)

    def _quantize_native(self, tensor, generator, lib, scale, qmin, qmax) -> QTensor:
        """One fused, threaded pass (scale, clamp, round); stochastic draws are seeded from ``generator``."""
        src, out = _native_buffers(tensor)
        if self.rounding == "nearest":
            lib.hdqt_rtn_quantize_f32(src.data_ptr(), out.data_ptr(), src.numel(), scale, qmin, qmax,
                                      native.threads())
        else:
            seed = self.stream_seed(generator)
            lib.hdqt_sr_quantize_f32(src.data_ptr(), out.data_ptr(), src.numel(), scale, qmin, qmax, seed,
                                     native.threads())
        return QTensor(out, scale)

    def to_dict(self) -> dict:
        return {
            "format": self.format.to_dict(),
            "scaling": self.scaling.to_dict(),
            "rounding": self.rounding,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Quantizer":
        unknown = set(data) - {"format", "scaling", "rounding"}
        if unknown:
            raise ValueError(f"unknown quantizer field(s) {sorted(unknown)}; valid: format, scaling, rounding")
        return cls(
            format=format_from_dict(data.get("format", {})),
            scaling=scaling_from_dict(data.get("scaling", {})),
            rounding=data.get("rounding", "nearest"),
        )


def _nonfinite(tensor: torch.Tensor, nonfinite: str, role: str) -> QTensor:
    if nonfinite == "raise":
        raise NonFiniteError(
            f"{role} contains NaN or Inf; set the policy's nonfinite='propagate' to let it flow through instead"
        )
    return QTensor(tensor * math.nan, math.nan)


def _native_buffers(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input as a dense tensor and an output of the same layout. empty_like keeps a
    dense tensor's strides, so a transposed view is rounded in memory order and comes
    back with the same layout, without a copy."""
    src = tensor.detach()
    if native.dense_order(src) is None:
        src = src.contiguous()
    return src, torch.empty_like(src)


def int_quantizer(bits: int, *, signed: str = "signed", clip_ratio: float = 1.0, rounding: str = "nearest") -> Quantizer:
    """Shorthand for the common case: an integer grid with dynamic per-tensor scaling."""
    return Quantizer(IntFormat(bits, signed), DynamicScaling(clip_ratio), rounding)
