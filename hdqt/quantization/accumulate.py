"""Float accumulators: a product's tiles summed into an ``acc_bits``-bit float.

The integer recipes limit each tile's sum to a saturating integer accumulator
(``matmul.py``). Operands in a float or log format have no integer unit; their
products are summed in a float accumulator instead (chunk-based accumulation,
Wang et al. 2018): each tile's partial sum (``tile`` products, summed exactly or
in float32) is added to the running sum, and the running sum is rounded to the
accumulator's format (to nearest, ties to even, saturating) after every addition.
``tile=None`` (or a tile as long as the reduction) rounds the whole sum once.

The accumulator formats keep IEEE half's 5 exponent bits (its range) and spend the
rest on the mantissa: 16 bits = e5m10 (IEEE half), 12 = e5m6, 8 = e5m2 (FP8 e5m2),
7 = e5m1, all with half's largest value 2^15 (the top exponent code reserved);
narrower ones have one mantissa bit and the rest exponent (6 = e4m1, 4 = e2m1).
32 bits is IEEE single.
Narrowing the accumulator then costs precision (swamping: a small tile sum added
to a large running sum is rounded away), which is the effect the paper's
accumulator sweep measures, and not range. The accumulator saturates at its
largest value (an integer accumulator does the same) instead of going infinite.

Units: the accumulator holds the sum divided by ``unit``, a power of two chosen from
the operands' largest magnitudes so that one product of the two largest values
lies in [1, 2): a 16-bit accumulator then holds up to 2^15 such products, and
products below 2^-24 of the largest one underflow, as in a half-precision MAC
without loss scaling.
"""
from __future__ import annotations

import math

import torch

from hdqt.quantization.formats import FloatFormat


def float_accumulator(acc_bits: int) -> FloatFormat:
    """The float format of an ``acc_bits``-bit accumulator (module docstring)."""
    if isinstance(acc_bits, bool) or not isinstance(acc_bits, int) or not 4 <= acc_bits <= 32:
        raise ValueError(f"a float accumulator needs acc_bits in 4..32, got {acc_bits!r}")
    if acc_bits == 32:
        return FloatFormat(8, 23, specials="ieee")
    exp_bits = 5 if acc_bits >= 7 else acc_bits - 2
    return FloatFormat(exp_bits, acc_bits - 1 - exp_bits, specials="ieee" if exp_bits == 5 else "none")


def accumulator_unit(bounds: tuple[float, float]) -> float:
    """2^floor(log2(largest product)): one product of the two largest values is in [1, 2) units."""
    largest = bounds[0] * bounds[1]
    return math.ldexp(1.0, math.frexp(largest)[1] - 1) if largest > 0 else 1.0


def accumulate(partials: torch.Tensor, acc: FloatFormat, unit: float = 1.0) -> torch.Tensor:
    """Add ``partials`` (tiles along dim 0, in product units) into an ``acc`` accumulator,
    rounding after each addition; returns the final sum in product units."""
    total = torch.zeros_like(partials[0])
    for part in partials:
        total = acc.round_(total.add_(part, alpha=1.0 / unit), "nearest")
    return total.mul_(unit)


class FloatBounds(tuple):
    """The largest magnitudes of a product's two operands when one of them is in a float
    or log format: the product's limited accumulator is then a float accumulator."""


def float_tiled_matmul(a: torch.Tensor, b: torch.Tensor, tile: int | None, acc_bits: int,
                       bounds: tuple[float, float]) -> torch.Tensor:
    """``a @ b`` (a (M, K), b (K, J)) with each tile's float32 partial sum added into an
    ``acc_bits``-bit float accumulator; ``tile=None``: the whole reduction is one tile."""
    acc = float_accumulator(acc_bits)
    unit = accumulator_unit(bounds)
    m, k = a.shape
    tile = k if tile is None else min(tile, k)
    full = k // tile
    parts = []
    if full:
        a_tiles = a[:, : full * tile].reshape(m, full, tile).transpose(0, 1)
        b_tiles = b[: full * tile].reshape(full, tile, b.shape[1])
        parts.append(torch.bmm(a_tiles, b_tiles))
    if k % tile:
        parts.append((a[:, full * tile:] @ b[full * tile:]).unsqueeze(0))
    return accumulate(torch.cat(parts) if len(parts) > 1 else parts[0], acc, unit)


def float_tiled_matmul_batched(w: torch.Tensor, x: torch.Tensor, tile: int | None, acc_bits: int,
                               bounds: tuple[float, float]) -> torch.Tensor:
    """``w @ x`` for w (N, K) and a batch x (B, K, L) -> (B, N, L), tiled along K into an
    ``acc_bits``-bit float accumulator (the im2col product of a convolution)."""
    acc = float_accumulator(acc_bits)
    unit = accumulator_unit(bounds)
    k = w.shape[1]
    tile = k if tile is None else min(tile, k)
    parts = [torch.matmul(w[:, s:s + tile], x[:, s:s + tile]) for s in range(0, k, tile)]
    return accumulate(torch.stack(parts), acc, unit)


def float_conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, tile: int | None, acc_bits: int,
                 bounds: tuple[float, float]) -> torch.Tensor:
    """conv2d(x, w) as an im2col product (K = C_in*kh*kw, torch's unfold order) with a
    float accumulator along K."""
    n, _, kh, kw = w.shape
    b, _, h, wd = x.shape
    cols = torch.nn.functional.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = float_tiled_matmul_batched(w.reshape(n, -1), cols, tile, acc_bits, bounds)
    return y.reshape(b, n, out_h, out_w)
