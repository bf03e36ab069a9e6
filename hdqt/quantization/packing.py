"""Compact, lossless storage of what a backward pass keeps: quantized operands and masks.

The forward of a quantized layer keeps its quantized input and weight for the
backward products. Their values are codes on the format's grid, held in float32 for
the kernels; this module stores them in as few bytes as the format allows and gives
back the same float tensor (bit for bit, with the same strides) at the backward:

* integer formats of at most 4 bits (``IntFormat``, per-tensor scale): two codes per
  byte. The flat tensor (in memory order) is cut in two halves; byte ``i`` is
  ``code[i] + 16 * code[i + ceil(n/2)]`` modulo 256 (code ``i`` in its low nibble, in
  two's complement when signed). Halves rather than neighbours keep every pack and
  unpack operation on contiguous memory (a strided byte op is several times slower in
  torch), and the sum packs in one integer operation. Whether the nibbles are signed ([-7, 7]) or unsigned ([0, 15]) is the
  format's ``signed``, or for ``"auto"`` whether the tensor held a negative code;
* other integer formats: the smallest integer dtype that holds the codes (int8 or
  uint8 up to 8 bits, int16 or int32 above);
* float and log formats: the narrowest float dtype that holds every value of the
  format exactly (checked by enumerating them): ``float8_e5m2`` (FP8 e5m2, FP4 e2m1,
  4-bit log), else ``bfloat16`` (FP8 e4m3, FP134), else float32.
  ``float8_e4m3fn`` and ``float16`` would be narrower for some formats, but torch's CPU
  conversion from them back to float32 takes ~40x longer than bfloat16's;
* anything else (no quantizer, per-sample scales, whose products take dequantized
  values, or a NaN scale under ``nonfinite="propagate"``) is kept as it is.

``pack_bits`` / ``unpack_bits`` keep a boolean mask in one bit per element (8 per
byte), for ReLU's backward (``mask_relu.py``). The integer tricks rely on int64
multiplication wrapping modulo 2^64, as it does on every CPU and GPU torch runs on;
the tests check every byte value.

On CPU float32 tensors the native kernels (``csrc/packing.c``) pack and unpack the
nibbles and bytes in one pass each, with the same bytes and values as the torch
operations here, which stay the path on other devices and the tests' reference
(torch's 4-6 small integer kernels a tensor cost a small layer's step ~10% each).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from hdqt.quantization import native
from hdqt.quantization.formats import FloatFormat, IntFormat, LogFormat
from hdqt.quantization.quantizer import QTensor, Quantizer
from hdqt.quantization.scaling import DynamicScaling, ExponentBiasScaling, SAWBScaling

# bit j of a byte <- byte j of an int64 whose bytes are 0 or 1 (the sum lands in the top byte)
_GATHER_BITS = 0x0102040810204080
# a byte replicated into all 8 bytes of an int64 (no carries: each copy has its own byte)
_REPEAT_BYTE = 0x0101010101010101
# byte j keeps bit j only (0x8040201008040201 as a signed int64)
_SELECT_BITS = 0x8040201008040201 - 2**64


@dataclass(frozen=True)
class PackedLayout:
    """How one saved operand was stored: what ``unpack_operand`` needs besides its tensors."""

    kind: str  # "raw" (kept as it is), "nibbles", "int" (an integer dtype), "float" (a narrower float dtype)
    shape: tuple[int, ...] = ()
    order: tuple[int, ...] = ()  # the permutation that makes the original tensor contiguous
    dtype: torch.dtype = torch.float32  # the original's dtype
    signed: bool = True  # nibbles: two's complement (else unsigned)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """The permutation of ``t``'s dimensions from the largest stride to the smallest: ``t``
    permuted so is contiguous when ``t`` is dense (a transposed view, channels-last).
    Packing in memory order keeps the layout without copies, and the unpacked tensor
    gets the original's strides, so that the backward runs as it did on the original."""
    if t.is_contiguous():  # the common case, without the sort (this runs for every saved tensor)
        return tuple(range(t.dim()))
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))


def flat_in_order(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """The elements of ``t`` permuted by ``order``, flat (a view when ``t`` is dense in that order)."""
    if order == tuple(range(t.dim())) and t.is_contiguous():
        return t.view(-1)
    return t.permute(order).reshape(-1)


def restore_order(flat: torch.Tensor, shape, order: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``flat_in_order``: ``flat`` viewed as ``shape`` (a contiguous
    tensor permuted back, i.e. with the strides the dense original had)."""
    if order == tuple(range(len(order))):
        return flat.view(shape)
    permuted = flat.view([shape[d] for d in order])
    inverse = [0] * len(order)
    for position, d in enumerate(order):
        inverse[d] = position
    return permuted.permute(inverse)


def native_lib(t: torch.Tensor):
    """The native kernels when they can run on ``t`` in place (CPU, float32, contiguous), else None."""
    return native.load() if native.usable(t) and t.is_contiguous() else None


def _native_pack(lib, kernel: str, flat: torch.Tensor, size: int) -> tuple[torch.Tensor, bool]:
    """``size`` bytes written by ``kernel`` from the float codes ``flat``, and whether a code was negative."""
    out = torch.empty(size, dtype=torch.uint8)
    negative = getattr(lib, kernel)(flat.data_ptr(), flat.numel(), out.data_ptr(), native.threads())
    return out, bool(negative)


def _native_unpack(lib, kernel: str, stored: torch.Tensor, n: int, signed: bool) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32)
    getattr(lib, kernel)(stored.data_ptr(), n, int(signed), out.data_ptr(), native.threads())
    return out


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: a flat int8 tensor of codes, all in [-8, 7] or all in
    [0, 15] -> uint8 of ceil(n/2) bytes, byte i = code i + 16 * code (i + ceil(n/2)),
    modulo 256 (one integer add: the low nibble is code i's, two's complement when signed)."""
    n = codes.numel()
    half = (n + 1) // 2
    if n == 2 * half:
        packed = torch.add(codes[:half], codes[half:], alpha=16)
    else:
        packed = torch.empty(half, dtype=codes.dtype, device=codes.device)
        torch.add(codes[: n - half], codes[half:], alpha=16, out=packed[: n - half])
        packed[n - half:] = codes[n - half: half]
    return packed.view(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, n: int, signed: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``n`` codes that ``pack_nibbles`` stored, as a flat tensor of ``dtype``
    (signed: codes in [-8, 7]; else [0, 15])."""
    half = packed.numel()
    out = torch.empty(n, dtype=dtype, device=packed.device)
    if signed:
        b = packed.view(torch.int8)
        low = (b << 4) >> 4  # arithmetic shifts sign-extend the low nibble
        out[:half].copy_(low)
        out[half:].copy_((b[: n - half] - low[: n - half]) >> 4)  # 16 * high code, in int8, / 16
    else:
        out[:half].copy_(packed & 15)
        out[half:].copy_(packed[: n - half] >> 4)
    return out


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """One bit per element: a bool tensor (any shape, read in row-major order of a
    contiguous copy) -> uint8 of ceil(n/8) bytes, element 8i+j in bit j of byte i."""
    flat = mask if mask.dim() == 1 else mask.reshape(-1)
    n = flat.numel()
    if n % 8 or flat.storage_offset() % 8:  # an int64 view needs whole, aligned words
        padded = torch.zeros(n + 8 - n % 8, dtype=torch.bool, device=flat.device)
        padded[:n] = flat
        flat = padded
    words = flat.view(torch.uint8).view(torch.int64)  # 8 bytes of 0/1 each
    return ((words * _GATHER_BITS) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The mask ``pack_bits`` stored, as a flat uint8 tensor of ``n`` elements: nonzero
    (1 << (i % 8), not 1) where the mask was True, 0 where it was False."""
    words = (packed.to(torch.int64) * _REPEAT_BYTE) & _SELECT_BITS
    return words.view(torch.uint8)[:n]


@functools.lru_cache(maxsize=None)
def compact_float_dtype(fmt) -> torch.dtype | None:
    """The narrowest float dtype (``float8_e5m2``, then ``bfloat16``) that holds every
    value of the float or log format ``fmt`` exactly, its infinities and NaNs included,
    or None. Decided by enumerating the format's values (formats of at most 16 bits).
    A pure function of a frozen format: the cache holds answers, not state."""
    if getattr(fmt, "bits", 32) > 16:
        return None
    values = fmt.values()
    specials = torch.tensor([math.inf, -math.inf, math.nan], dtype=torch.float64)
    for dtype in (torch.float8_e5m2, torch.bfloat16):
        back = values.to(dtype).to(torch.float64)
        if not torch.equal(back, values):
            continue
        if not getattr(fmt, "saturate", True):  # overflow gives inf (ieee) or NaN (fn)
            kept = specials.to(dtype).to(torch.float64)
            if not (torch.isinf(kept[:2]).all() and torch.isnan(kept[2])):
                continue
        return dtype
    return None


def _int_container(fmt: IntFormat, negative: bool) -> torch.dtype:
    top = fmt.signed_max if negative else fmt.unsigned_max
    low = -top if negative else 0
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= low and top <= info.max:
            return dtype
    return torch.int64


def _has_negative(fmt: IntFormat, values: torch.Tensor) -> bool:
    if fmt.signed != "auto":
        return fmt.signed == "signed"
    return values.numel() > 0 and bool(values.amin() < 0)


def holds_codes(quantizer: Quantizer | None) -> bool:
    """True when ``quantizer`` returns values on its format's grid, with one float scale per
    tensor or one per output channel (a weight's, kept by the caller): the formats and
    scalings this module knows. Any other quantizer (per-sample or per-group scales,
    whose values come back dequantized, or a format added later) is kept as it is, so
    that packing can never round a value."""
    return (quantizer is not None and quantizer.granularity in ("tensor", "channel")
            and type(quantizer.format) in (IntFormat, FloatFormat, LogFormat)
            and type(quantizer.scaling) in (DynamicScaling, SAWBScaling, ExponentBiasScaling))


def pack_operand(q: QTensor, quantizer: Quantizer | None) -> tuple[tuple[torch.Tensor, ...], PackedLayout]:
    """The tensors to save for ``q`` (a quantizer's output) and how to unpack them.

    Lossless: ``unpack_operand`` gives back ``q.values`` bit for bit (see the module
    docstring for the storage of each format); a layout it cannot shrink is kept."""
    values = q.values
    raw = (values,), PackedLayout("raw")
    scale = q.scale
    finite = bool(torch.isfinite(scale).all()) if isinstance(scale, torch.Tensor) else math.isfinite(scale)
    per_channel = isinstance(scale, torch.Tensor) and quantizer is not None and quantizer.granularity == "channel"
    if (not holds_codes(quantizer) or (isinstance(scale, torch.Tensor) and not per_channel) or not finite
            or not values.dtype.is_floating_point):
        return raw
    order = memory_order(values)
    flat = flat_in_order(values.detach(), order)
    shape, fmt = tuple(values.shape), quantizer.format
    if isinstance(fmt, IntFormat):
        lib = native_lib(flat)
        if fmt.bits <= 4:
            if lib is not None:  # one pass, which also tells whether a code is negative
                packed, negative = _native_pack(lib, "hdqt_pack_nibbles_f32", flat, (flat.numel() + 1) // 2)
            else:
                codes = flat.to(torch.int8)  # [-7, 7] or [0, 15]: both fit
                packed = pack_nibbles(codes)
                negative = fmt.signed == "auto" and codes.numel() > 0 and bool(codes.amin() < 0)
            return kept_codes(packed, fmt, negative, shape, order, values.dtype)
        if lib is not None and fmt.bits <= 8:  # int8 or uint8: the same bytes either way
            stored, negative = _native_pack(lib, "hdqt_pack_bytes_f32", flat, flat.numel())
            return kept_codes(stored, fmt, negative, shape, order, values.dtype)
        container = _int_container(fmt, _has_negative(fmt, flat))
        return (flat.to(container),), PackedLayout("int", shape, order, values.dtype)
    dtype = compact_float_dtype(fmt)
    if dtype is None or dtype.itemsize >= values.element_size():
        return raw
    return (flat.to(dtype),), PackedLayout("float", shape, order, values.dtype)


def kept_codes(packed: torch.Tensor, fmt: IntFormat, negative: bool, shape, order,
               dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], PackedLayout]:
    """What ``pack_operand`` saves for the codes of an integer format of at most 8 bits,
    given their packed bytes (two codes a byte up to 4 bits, one above) and whether one
    was negative (which decides the sign of an "auto" format's nibbles or container)."""
    signed = fmt.signed == "signed" or (fmt.signed == "auto" and bool(negative))
    if fmt.bits <= 4:
        return (packed,), PackedLayout("nibbles", tuple(shape), tuple(order), dtype, signed)
    return (packed.view(_int_container(fmt, signed)),), PackedLayout("int", tuple(shape), tuple(order), dtype)


def keep_operand(q: QTensor, quantizer: Quantizer | None) -> tuple[tuple[torch.Tensor, ...], PackedLayout]:
    """``pack_operand``'s signature, keeping ``q.values`` as they are (``HDQT_PACK=0``)."""
    return (q.values,), PackedLayout("raw")


def unpack_operand(tensors: tuple[torch.Tensor, ...], layout: PackedLayout) -> torch.Tensor:
    """The tensor ``pack_operand`` stored: the same values, dtype, shape and strides."""
    (stored,) = tensors
    if layout.kind == "raw":
        return stored
    lib = native.load() if layout.dtype == torch.float32 and stored.device.type == "cpu" else None
    if layout.kind == "nibbles":
        flat = (_native_unpack(lib, "hdqt_unpack_nibbles_f32", stored, layout.numel, layout.signed)
                if lib is not None else unpack_nibbles(stored, layout.numel, layout.signed, layout.dtype))
    elif lib is not None and stored.dtype in (torch.int8, torch.uint8):
        flat = _native_unpack(lib, "hdqt_unpack_bytes_f32", stored, layout.numel, stored.dtype == torch.int8)
    else:
        flat = stored.to(layout.dtype)
    return restore_order(flat, layout.shape, layout.order)
