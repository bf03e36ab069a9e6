"""A quantizer is a format, a scaling rule and a rounding mode (QPyTorch style),
plus the granularity of its scale (per tensor, per sample, or per output channel of a weight).

``Quantizer.quantize`` returns a ``QTensor``: ``values`` on the format's grid (kept
in a float dtype: integer codes for an ``IntFormat``, so that BLAS multiplies them
exactly; the float or log format's own values otherwise) and a ``scale`` such that
``values * scale`` approximates the input. The scale is a float per tensor, or a
tensor broadcastable to the values (per sample: the sample dimension keeps its
size, the others are 1; per channel: dimension 0, a weight's output features or
channels, keeps its size).

An integer format with per-tensor dynamic scaling runs on the native kernels where
they apply (one fused pass); every other combination runs on torch operations
(``_quantize_general``), which work on any device. ``BinaryFormat`` with
``GroupMeanScaling`` (HadaNets) gives values +-1 and a scale of the values' shape
(each element's group beta; ``binarize.py``); the layers of a binary policy run
their own products (``binary.py``) rather than through this call.
"""
from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from hdqt.quantization import native
from hdqt.quantization.formats import BinaryFormat, FloatFormat, Format, IntFormat, LogFormat, format_from_dict
from hdqt.quantization.rounding import check_rounding, round_nearest_, round_stochastic_
from hdqt.quantization.scaling import (  # noqa: F401  (DynamicScaling, scaling_from_dict: re-exported)
    DynamicScaling, ExponentBiasScaling, GroupMeanScaling, SAWBScaling, Scaling, scaling_from_dict,
)

NONFINITE_MODES = ("raise", "propagate")


class NonFiniteError(ValueError):
    """A tensor that is about to be quantized holds NaN or Inf."""


class QTensor(NamedTuple):
    values: torch.Tensor  # on the format's grid (integer codes for IntFormat), float dtype
    scale: float | torch.Tensor  # dequantized tensor = values * scale (a tensor: broadcastable, per sample)

    def dequantize(self) -> torch.Tensor:
        return self.values * self.scale


GRANULARITIES = ("tensor", "sample", "channel")


@dataclass(frozen=True)
class Quantizer:
    format: Format = field(default_factory=IntFormat)
    scaling: Scaling = field(default_factory=DynamicScaling)
    rounding: str = "nearest"
    # "tensor"; "sample": one scale per index of the sample dimension; "channel": one per
    # index of dimension 0 (a weight's output features: forward weights only, see QuantPolicy)
    granularity: str = "tensor"

    def __post_init__(self) -> None:
        check_rounding(self.rounding)
        if not isinstance(self.format, (IntFormat, FloatFormat, LogFormat, BinaryFormat)):
            raise ValueError("format must be an IntFormat, FloatFormat, LogFormat or BinaryFormat, "
                             f"got {type(self.format).__name__}")
        if not isinstance(self.scaling, (DynamicScaling, SAWBScaling, ExponentBiasScaling, GroupMeanScaling)):
            raise ValueError("scaling must be a DynamicScaling, SAWBScaling, ExponentBiasScaling or GroupMeanScaling, "
                             f"got {type(self.scaling).__name__}")
        if isinstance(self.format, BinaryFormat) != isinstance(self.scaling, GroupMeanScaling):
            raise ValueError("BinaryFormat and GroupMeanScaling go together (a sign per value, a mean magnitude per "
                             f"group): got {type(self.format).__name__} with {type(self.scaling).__name__}")
        if isinstance(self.format, BinaryFormat) and (self.rounding != "nearest" or self.granularity != "tensor"):
            raise ValueError("BinaryFormat takes rounding='nearest' (the sign) and granularity='tensor' (its groups "
                             f"are GroupMeanScaling's), got {self.rounding!r}, {self.granularity!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if isinstance(self.scaling, ExponentBiasScaling):
            if not isinstance(self.format, FloatFormat):
                raise ValueError("ExponentBiasScaling moves a float format's exponent bias: it needs a FloatFormat, "
                                 f"got {type(self.format).__name__}")
            if self.granularity != "tensor":
                raise ValueError("ExponentBiasScaling tracks one exponent per tensor: granularity must be 'tensor'")

    @functools.cached_property  # asked at every quantization; the fields are frozen
    def native_fast(self) -> bool:
        """True for the integer grid with per-tensor dynamic scaling: the native kernels'
        case (the rest runs on torch operations)."""
        return (isinstance(self.format, IntFormat) and isinstance(self.scaling, DynamicScaling)
                and self.granularity == "tensor")

    def quantize(
        self,
        tensor: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        nonfinite: str = "raise",
        role: str = "tensor",
        amax: float | None = None,
        state: dict | None = None,
        sample_dim: int = 0,
    ) -> QTensor:
        """Quantize ``tensor`` (not modified). ``role`` names it in error messages.

        ``amax`` is max|tensor| when the caller already knows it (a fused kernel
        computed it); a signed format then needs no extra pass over the tensor.
        ``state`` is the caller's dict for a scaling with state (``ExponentBiasScaling``
        reads and updates ``state["exponent"]``); ``sample_dim`` is the dimension that
        indexes samples, for ``granularity="sample"``.
        """
        if not self.native_fast:
            return self._quantize_general(tensor, generator, nonfinite, role, state, sample_dim)
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

    def fuses_row_transform(self, tensor: torch.Tensor) -> bool:
        """Whether ``quantize_row_transform`` takes ``tensor``: the integer grid with
        per-tensor dynamic scaling and a signed format, a CPU float32 tensor, and the
        native kernels loaded."""
        return self._row_transform_kernels(tensor) is not None

    def _row_transform_kernels(self, tensor: torch.Tensor):
        """The native library when ``fuses_row_transform(tensor)``, else None."""
        if not (self.native_fast and self.format.signed == "signed" and native.usable(tensor)):
            return None
        return native.load()

    def quantize_row_transform(self, tensor: torch.Tensor, p: int, generator: torch.Generator | None = None, *,
                               nonfinite: str = "raise", role: str = "tensor") -> QTensor:
        """The unnormalised Hadamard transform of every length-``p`` block along the last
        dimension of ``tensor`` (not modified), quantized: value for value
        ``quantize(t, generator, amax=amax)`` of ``t, amax = hadamard_transform_amax(...)``,
        the same random stream included, in one native call and one pass fewer. Only
        where ``fuses_row_transform(tensor)``."""
        lib = self._row_transform_kernels(tensor)
        if lib is None:
            raise ValueError(f"quantize_row_transform: not for this quantizer or tensor ({self.to_dict()}, "
                             f"{tensor.dtype} on {tensor.device}); check fuses_row_transform first")
        n = tensor.shape[-1] if tensor.dim() else 1
        if isinstance(p, bool) or not isinstance(p, int) or p < 1 or p & (p - 1) or n % p:
            raise ValueError(f"quantize_row_transform: p must be a power of two dividing the last dimension "
                             f"({n}), got {p!r}")
        src = tensor.detach()
        # The rows are read through the strides, with no copy first: a matrix's (a transposed
        # view too), or the (D0, D1, n) view's, whose rows come in groups of D1 (a conv's
        # gradient as (N, B, L), the transpose of its (B, N, L) memory). Other ranks: a copy.
        if src.dim() == 2:
            (row_stride, col_stride), group, group_stride = src.stride(), src.shape[0], 0
        elif src.dim() == 3:
            group_stride, row_stride, col_stride = src.stride()
            group = src.shape[1]
        else:
            src = src.contiguous()
            row_stride, col_stride, group, group_stride = n, 1, 1, n
        out = torch.empty(src.shape, dtype=src.dtype)  # the rows, contiguous, transformed and rounded
        seed = self.stream_seed(generator) if self.rounding == "stochastic" else 0
        scale = ctypes.c_double()
        status = lib.hdqt_fwht_quantize_f32(
            src.data_ptr(), row_stride, col_stride, group, group_stride, out.data_ptr(),
            out.numel() // n if n else 0, n, p,
            self.rounding == "stochastic", self.scaling.clip_ratio, self.format.signed_max, seed,
            ctypes.byref(scale), native.threads(),
        )
        if status != 0:
            return _nonfinite(out, nonfinite, role)
        return QTensor(out, scale.value)

    def _quantize_general(self, tensor, generator, nonfinite, role, state, sample_dim) -> QTensor:
        """Any format, scaling and granularity, on torch operations (any device)."""
        t = tensor.detach()
        fmt = self.format
        if isinstance(fmt, BinaryFormat):
            return self._binarize(t, nonfinite, role)
        dims = None
        if self.granularity != "tensor" and t.dim() > 1:
            kept = sample_dim % t.dim() if self.granularity == "sample" else 0
            dims = tuple(d for d in range(t.dim()) if d != kept)
            amax_t = t.abs().amax(dims, keepdim=True)
            top = float(amax_t.max()) if amax_t.numel() else 0.0
        else:
            amax_t = t.abs().max() if t.numel() else t.new_zeros(())
            top = float(amax_t)
        if not math.isfinite(top):
            return _nonfinite(tensor, nonfinite, role)
        signed = True
        if isinstance(fmt, IntFormat):
            signed = fmt.signed == "signed" or (fmt.signed == "auto" and t.numel() > 0 and float(t.min()) < 0)
            qmax = fmt.signed_max if signed else fmt.unsigned_max
        else:
            qmax = fmt.max_magnitude()
        if isinstance(self.scaling, ExponentBiasScaling):
            exponent = None if state is None else state.get("exponent")
            if exponent is None:
                exponent = self.scaling.initial_exponent(top)
            scale = math.ldexp(1.0, exponent - fmt.emax)
            if state is not None and top > 0:  # an all-zero tensor says nothing about the range
                state["exponent"] = self.scaling.next_exponent(exponent, top)
        else:
            clip = self.scaling.clip(t, amax_t, dims)
            if dims is None:
                clip = float(clip)
                scale = clip / qmax if clip > 0 else 1.0  # an all-zero tensor maps to zeros, not NaN
            else:
                scale = torch.where(clip > 0, clip / qmax, torch.ones_like(clip))
        values = fmt.round_(t / scale, self.rounding, generator, signed=signed)
        return QTensor(values, scale)

    def _binarize(self, t: torch.Tensor, nonfinite: str, role: str) -> QTensor:
        """Signs and each element's group beta, rows along the first dimension (``binarize.py``)."""
        from hdqt.quantization import binarize

        rows = t.reshape(t.shape[0] if t.dim() > 1 else 1, -1)
        betas = binarize.group_betas(rows, self.scaling.group)
        if not bool(torch.isfinite(betas).all()):
            return _nonfinite(t, nonfinite, role)
        scale = binarize.expand(betas, self.scaling.group, rows.shape[1]).reshape(t.shape)
        return QTensor(self.format.round_(t, "nearest"), scale)

    def grid(self, amax: float, lo: float) -> tuple[float, int, int]:
        """(scale, qmin, qmax) for a finite tensor with max|t| = ``amax`` and minimum ``lo``
        (the integer grid with per-tensor dynamic scaling only: ``native_fast``)."""
        if not self.native_fast:
            raise ValueError(f"grid() is the integer per-tensor grid; this quantizer is {self.to_dict()}")
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
        scale = ctypes.c_double()
        status = lib.hdqt_quantize_f32(
            src.data_ptr(), out.data_ptr(), src.numel(), self.rounding == "stochastic", self.format.sign_mode,
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
        out = {
            "format": self.format.to_dict(),
            "scaling": self.scaling.to_dict(),
            "rounding": self.rounding,
        }
        if self.granularity != "tensor":  # the default is left out: older policies read the same
            out["granularity"] = self.granularity
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Quantizer":
        unknown = set(data) - {"format", "scaling", "rounding", "granularity"}
        if unknown:
            raise ValueError(f"unknown quantizer field(s) {sorted(unknown)}; valid: format, scaling, rounding, "
                             "granularity")
        return cls(
            format=format_from_dict(data.get("format", {})),
            scaling=scaling_from_dict(data.get("scaling", {})),
            rounding=data.get("rounding", "nearest"),
            granularity=data.get("granularity", "tensor"),
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
