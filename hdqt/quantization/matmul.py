"""Integer matmuls with a tiled, saturating low-bit accumulator.

Operands hold integers in a float dtype. A float32 sum of integers is exact while
every partial sum stays below 2^24. Callers that know the operands are integers
pass ``bounds`` (the largest magnitude each operand can hold, from its format);
where the worst case of any partial sum (a tile's, and the running sum across
tiles) could reach 2^24, the product runs in float64 (exact to 2^53), so the
result is the exact integer sum rounded once to the operands' dtype. Without
``bounds`` the operands are taken as floats and multiplied in their own dtype.

``saturation`` (a ``SaturationStats``, or None) receives the counts of a tiled
product with a limited accumulator: how many tile sums it computed, how many of
them exceeded the limit and by how much. The native kernels count as they go,
the torch path from the partial sums it materialises anyway; whichever computed
the product records it, once.
"""
from __future__ import annotations

import ctypes
import math
from typing import TYPE_CHECKING

import torch

from hdqt.quantization import native
from hdqt.quantization.accumulate import FloatBounds, float_tiled_matmul, float_tiled_matmul_batched

if TYPE_CHECKING:
    from hdqt.quantization.runtime import SaturationStats

_FLOAT32_EXACT = 2**24
Bounds = tuple[float, float]  # the largest |value| of each operand of a product


def accumulator_limit(acc_bits: int) -> int:
    """Largest magnitude a signed ``acc_bits`` accumulator holds (symmetric range)."""
    return 2 ** (acc_bits - 1) - 1


def reduction_tile(tile: int | None, k: int) -> int:
    """The tile of a length-``k`` reduction: ``tile``, or ``k`` for None (one tile, the
    whole sum clamped once)."""
    return k if tile is None else tile


def sum_bound(k: int, bounds: Bounds, tile: int | None = None, acc_bits: int | None = None) -> float:
    """The largest |partial sum| a length-``k`` product of integers within ``bounds`` can
    reach: a tile's sum before it saturates, and the running sum of saturated tiles."""
    product = bounds[0] * bounds[1]
    if acc_bits is None or tile is None:
        return k * product
    length = min(tile, k)
    per_tile = length * product
    tiles = math.ceil(k / length)
    return max(per_tile, min(k * product, tiles * min(per_tile, accumulator_limit(acc_bits))))


# On a GPU, TF32 (cuDNN's convolutions by default, matmuls where the user allows it)
# reads float32 operands to 11 significant bits: integer codes above 2^11 (integer
# formats of 13+ bits) would be rounded before they are multiplied.
_TF32_EXACT = 2**11


def exact_dtype(bound: float, dtype: torch.dtype, *, operands: Bounds | None = None,
                device: torch.device | None = None) -> torch.dtype:
    """``dtype`` if every partial sum up to ``bound`` is exact in it, else float64; on
    CUDA also float64 where integer ``operands`` (their largest magnitudes) exceed what
    TF32 reads exactly (float formats' few significant bits always fit). The layers
    call the products in float32 or float64 only (precision.py)."""
    if dtype == torch.float64:
        return dtype
    if bound >= _FLOAT32_EXACT:
        return torch.float64
    tf32 = device is not None and device.type == "cuda" and dtype == torch.float32
    if tf32 and operands is not None and not isinstance(operands, FloatBounds) and max(operands) > _TF32_EXACT:
        return torch.float64
    return dtype


# Multiply-adds below which an exact product of integer codes (an unlimited accumulator)
# runs as torch's float32 GEMM, not on the int8 kernel: the same numbers, and on the AVX2
# VM the int8 kernel's fixed cost (~40 us: scanning, packing, two threads' start) lost
# to MKL up to ~1M multiply-adds (a 19-class head's dX 64 vs 21 us, dW 50 vs 33 us at
# two threads) and won from 21M (191 vs 283 us).
SMALL_EXACT_PRODUCT = 4_000_000


def tiled_matmul(x: torch.Tensor, w: torch.Tensor, tile: int | None, acc_bits: int | None, *,
                 bounds: Bounds | None = None, saturation: SaturationStats | None = None) -> torch.Tensor:
    """``x @ w.T`` for x (M, K), w (N, K), with each length-``tile`` chunk of the
    reduction summed into an accumulator that saturates at ±(2^(acc_bits-1)-1).

    The tiles' partial sums are added in float (the accumulator of the next level).
    ``acc_bits=None`` means an unlimited accumulator: one plain matmul, which runs on
    8-bit integer dot products when ``bounds`` says both operands are integers
    (and they fit in bytes: see ``tiled_matmul_kj``).
    """
    return tiled_matmul_kj(x, w.T, tile, acc_bits, bounds=bounds, saturation=saturation)


def tiled_matmul_kj(a: torch.Tensor, b: torch.Tensor, tile: int | None, acc_bits: int | None, *,
                    bounds: Bounds | None = None, saturation: SaturationStats | None = None) -> torch.Tensor:
    """``a @ b`` for a (M, K), b (K, J), tiled and saturated along K like ``tiled_matmul``.

    With ``bounds`` (the operands are integers of at most these magnitudes) the sums
    are exact: in float64 where float32 could round a partial sum (see ``sum_bound``),
    and the result is rounded once to ``a``'s dtype. On CPU float32 a native kernel
    keeps each tile's partial sums in registers; where the operands are integers that
    fit in bytes and the CPU has AVX512-VNNI, it multiplies 8-bit integers (4x the
    multiply-adds per instruction), with the same result. The torch path
    materialises all tiles' partial sums, (K/tile) x the output.

    ``saturation`` receives the product's counts, M*J*ceil(K/tile) tile sums (nothing
    with ``acc_bits=None``: an unlimited accumulator never saturates).
    """
    tile = reduction_tile(tile, a.shape[1])
    dtype = a.dtype
    if acc_bits is not None and isinstance(bounds, FloatBounds):  # float operands: a float accumulator
        return float_tiled_matmul(a, b, tile, acc_bits, bounds)
    if bounds is not None:
        wide = exact_dtype(sum_bound(a.shape[1], bounds, tile, acc_bits), dtype, operands=bounds, device=a.device)
        if wide != dtype:
            if acc_bits is None:  # int32 sums of bytes are exact far beyond 2^24
                exact = _native_product(a, b, a.shape[1], float(2**31 - 1), int8_only=True)
                if exact is not None:
                    return exact
            return _torch_tiled(a.to(wide), b.to(wide), tile, acc_bits, saturation).to(dtype)
    if acc_bits is None:
        # The exact product of integer operands: int32 sums on VNNI equal float32's
        # wherever float32 is exact (below 2^24), so either computes it; a small one
        # (a classifier head's) costs less as torch's float32 GEMM than the int8
        # kernel's scan, packing and threads.
        small = a.shape[0] * a.shape[1] * b.shape[1] < SMALL_EXACT_PRODUCT
        exact = _native_product(a, b, a.shape[1], float(2**31 - 1), int8_only=True) if bounds and not small else None
        return a @ b if exact is None else exact
    out = _native_product(a, b, tile, float(accumulator_limit(acc_bits)), saturation=saturation)
    return out if out is not None else _torch_tiled(a, b, tile, acc_bits, saturation)


def tile_sums(outputs: int, k: int, tile: int) -> int:
    """How many tile sums ``outputs`` length-``k`` reductions in tiles of ``tile`` compute."""
    return outputs * -(-k // tile)


def _clamp_counted(partial: torch.Tensor, limit: float, counts: list[float] | None) -> torch.Tensor:
    """``partial`` (tile sums) clamped to [-limit, limit] in place; with ``counts``, first
    adds how many exceeded the limit and by how much (sum of |sum| - limit) to it."""
    if counts is not None:
        over = partial.abs().sub_(limit).clamp_(min=0)
        counts[0] += int(torch.count_nonzero(over))
        counts[1] += float(over.sum(dtype=torch.float64))
    return partial.clamp_(-limit, limit)


def _torch_tiled(a: torch.Tensor, b: torch.Tensor, tile: int, acc_bits: int | None,
                 saturation: SaturationStats | None = None) -> torch.Tensor:
    """``a @ b`` tiled and saturated along K with torch operations (any device and dtype)."""
    if acc_bits is None:
        return a @ b
    limit = accumulator_limit(acc_bits)
    m, k = a.shape
    full = k // tile
    counts = None if saturation is None else [0, 0.0]
    out = None
    if full:
        # (tiles, M, T) @ (tiles, T, J) -> every full tile's partial sums in one batched matmul
        a_tiles = a[:, : full * tile].reshape(m, full, tile).transpose(0, 1)
        b_tiles = b[: full * tile].reshape(full, tile, b.shape[1])
        out = _clamp_counted(torch.bmm(a_tiles, b_tiles), limit, counts).sum(0)
    if k % tile:  # the short last tile, without padding copies of the operands
        rest = _clamp_counted(a[:, full * tile :] @ b[full * tile :], limit, counts)
        out = rest if out is None else out.add_(rest)
    if saturation is not None:
        saturation.add(tile_sums(m * b.shape[1], k, tile), *counts)
    return out


def _native_product(a: torch.Tensor, b: torch.Tensor, tile: int, limit: float, *,
                    int8_only: bool = False, saturation: SaturationStats | None = None) -> torch.Tensor | None:
    """The tiled product by a native kernel: int8 where the operands fit in bytes (and
    the CPU has VNNI), else float32 (unless ``int8_only``); None without the kernels.
    ``saturation`` receives the counts when a kernel computed the product."""
    if not (native.usable(a) and native.usable(b)):
        return None
    lib = native.load()
    if lib is None or (int8_only and not native.int8_dot(lib)):
        return None
    (m, k), j = a.shape, b.shape[1]
    out = torch.empty(m, j, dtype=a.dtype)
    counts = None if saturation is None else (ctypes.c_double * 2)()  # [saturated, excess], written by the kernel
    shape = (m, k, j, tile, limit, counts, native.threads())
    if native.int8_dot(lib):
        # a is read through its strides, b as (K, J) or transposed (J, K): no copy
        transposed = not b.is_contiguous() and b.T.is_contiguous()
        dense = b if transposed else b.contiguous()
        status = lib.hdqt_tiled_matmul_i8(a.data_ptr(), a.stride(0), a.stride(1), dense.data_ptr(), int(transposed),
                                          out.data_ptr(), *shape)
        if status < 0:
            raise MemoryError("hdqt native int8 product: could not allocate its packed operands")
        if status == 0:
            return _record(out, saturation, tile_sums(m * j, k, tile), counts)
    if int8_only:
        return None
    b = b.contiguous()  # operands that are not bytes, or no VNNI: the float32 kernel
    lib.hdqt_tiled_matmul_f32(a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), out.data_ptr(), *shape)
    return _record(out, saturation, tile_sums(m * j, k, tile), counts)


def _record(out: torch.Tensor, saturation: SaturationStats | None, tiles: int, counts) -> torch.Tensor:
    """``out``, after adding a native kernel's counts ([saturated, excess]) to ``saturation``."""
    if saturation is not None:
        saturation.add(tiles, counts[0], counts[1])
    return out


def tiled_matmul_batched(w: torch.Tensor, x: torch.Tensor, tile: int | None, acc_bits: int | None, *,
                         bounds: Bounds | None = None, saturation: SaturationStats | None = None) -> torch.Tensor:
    """``w @ x`` for w (N, K) and a batch x (B, K, L) -> (B, N, L), tiled along K.

    This is the im2col product of a convolution: every output position is a
    length-K reduction, tiled and saturated exactly like ``tiled_matmul`` (and exact,
    in float64 where needed, when ``bounds`` is given). ``saturation`` receives its
    counts, B*N*L*ceil(K/tile) tile sums, as in ``tiled_matmul_kj``.
    """
    tile = reduction_tile(tile, x.shape[1])
    dtype = x.dtype
    if acc_bits is not None and isinstance(bounds, FloatBounds):
        return float_tiled_matmul_batched(w, x, tile, acc_bits, bounds)
    if bounds is not None:
        wide = exact_dtype(sum_bound(x.shape[1], bounds, tile, acc_bits), dtype, operands=bounds, device=x.device)
        if wide != dtype:
            return tiled_matmul_batched(w.to(wide), x.to(wide), tile, acc_bits, saturation=saturation).to(dtype)
    b, k, l = x.shape
    n = w.shape[0]
    if acc_bits is None:
        return torch.matmul(w, x)
    limit = accumulator_limit(acc_bits)
    full = k // tile
    counts = None if saturation is None else [0, 0.0]
    out = None
    if full:
        # (tiles, N, T) @ (B, tiles, T, L) -> (B, tiles, N, L); the K-slice of a
        # contiguous (B, K, L) tensor reshapes to tiles without a copy.
        ws = w[:, : full * tile].reshape(n, full, tile).transpose(0, 1)
        xs = x[:, : full * tile].reshape(b, full, tile, l)
        out = _clamp_counted(torch.matmul(ws, xs), limit, counts).sum(1)
    if k % tile:
        rest = _clamp_counted(torch.matmul(w[:, full * tile :], x[:, full * tile :]), limit, counts)
        out = rest if out is None else out.add_(rest)
    if saturation is not None:
        saturation.add(tile_sums(b * n * l, k, tile), *counts)
    return out
