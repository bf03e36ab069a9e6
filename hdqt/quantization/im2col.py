"""im2col for the quantized convolution, in the layout its products want.

The columns of a whole batch are laid out channel-major, (K, B, L) with
K = C_in*kh*kw in torch's unfold order and L the output positions of a sample,
so that they form one (K, B*L) matrix: the forward product is then a single
tiled W (N, K) @ cols (K, B*L), and the weight gradient a single
G (N, B*L) @ cols^T. Every row is one sample's positions, contiguous, which is
the dimension the backward Hadamard transform runs along.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hdqt.quantization import native
from hdqt.quantization.hadamard import BlockLayout, hadamard_transform_amax
from hdqt.quantization.matmul import accumulator_limit, reduction_tile, tile_sums, tiled_matmul_kj

if TYPE_CHECKING:
    from hdqt.quantization.runtime import SaturationStats


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of a convolution of an input (B, C, H, W): its output size and the
    im2col sizes K = C*kh*kw (a column's length) and L = OH*OW (positions per sample)."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, x: torch.Tensor, kernel, stride, padding, dilation) -> "ConvGeometry":
        return cls(*x.shape, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))

    def _out(self, axis: int) -> int:
        size = (self.height, self.width)[axis]
        span = self.dilation[axis] * (self.kernel[axis] - 1) + 1
        return (size + 2 * self.padding[axis] - span) // self.stride[axis] + 1

    @property
    def out_h(self) -> int:
        return self._out(0)

    @property
    def out_w(self) -> int:
        return self._out(1)

    @property
    def k(self) -> int:
        return self.channels * self.kernel[0] * self.kernel[1]

    @property
    def positions(self) -> int:
        return self.out_h * self.out_w

    def native_args(self) -> tuple[int, ...]:
        """(B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW), the kernels' argument order."""
        return (self.batch, self.channels, self.height, self.width, *self.kernel, *self.stride, *self.padding,
                *self.dilation, self.out_h, self.out_w)


def unfold_channel_major(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    layout: BlockLayout | None = None,
    cache: dict | None = None,
) -> tuple[torch.Tensor, float | None]:
    """Columns of ``x`` (B, C, H, W) as (K, B, L), transformed along L by ``layout``.

    Returns the columns and max|columns| where it came for free (else None). On
    CPU float32 one native pass gathers each row and transforms it while it is in
    cache, so the untransformed columns are never written.
    """
    geo = ConvGeometry.of(x, kernel, stride, padding, dilation)
    transform = layout is not None and not layout.is_identity
    if native.usable(x) and (not transform or layout.uniform):
        lib = native.load()
        if lib is not None:
            src = x.contiguous()
            cols = torch.empty(geo.k, geo.batch, geo.positions, dtype=x.dtype)
            block = layout.blocks[0] if transform else 1
            amax = lib.hdqt_im2col_fwht_f32(src.data_ptr(), cols.data_ptr(), *geo.native_args(), block, 1,
                                            native.threads())
            return cols, (amax if transform else None)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, K, L)
    cols = cols.transpose(0, 1).contiguous()
    if not transform:
        return cols, None
    return hadamard_transform_amax(cols, 2, layout, cache)


def tiled_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    tile: int | None,
    acc_bits: int,
    saturation: SaturationStats | None = None,
) -> torch.Tensor:
    """The convolution of integer-valued ``x`` (B, C, H, W) and ``weight`` (N, C, kh, kw)
    as an im2col product whose reduction (K = C*kh*kw, unfold order) is tiled and
    saturated like ``tiled_matmul``. Returns (B, N, OH, OW). ``saturation`` receives
    the counts of its B*N*OH*OW*ceil(K/tile) tile sums (see ``tiled_matmul_kj``).

    On CPU float32 a native kernel never materialises the (K, B*L) column matrix:
    at width stride 1 it reads each run of 16 positions' columns in place from a
    zero-padded band of input rows, otherwise it gathers them into an L1 panel.
    At width stride 1, with operands that fit in bytes and AVX512-VNNI, it runs
    on 8-bit integer dot products (the same result).
    """
    n, _, kh, kw = weight.shape
    geo = ConvGeometry.of(x, (kh, kw), stride, padding, dilation)
    tile = reduction_tile(tile, geo.k)
    b, out_h, out_w = geo.batch, geo.out_h, geo.out_w
    out = _native_conv(x, weight, geo, tile, float(accumulator_limit(acc_bits)), saturation=saturation)
    if out is not None:
        return out
    cols, _ = unfold_channel_major(x, (kh, kw), stride, padding, dilation)
    y = tiled_matmul_kj(weight.reshape(n, -1), cols.reshape(cols.shape[0], -1), tile, acc_bits,
                        saturation=saturation)
    return y.reshape(n, b, out_h, out_w).transpose(0, 1).contiguous()


def exact_input_grad(
    grad_q: torch.Tensor,
    weight_q: torch.Tensor,
    input_shape: torch.Size,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor | None:
    """dX of a convolution with unlimited accumulators, ``conv2d_input(input_shape,
    weight_q, grad_q)``, on 8-bit integer dot products: at stride 1 the transposed
    convolution is a convolution of the gradient with the flipped, transposed
    weight and padding d*(k-1)-p. Exact int32 sums, so the same result as the
    float computation wherever that is exact (sums below 2^24).

    Returns None where this does not apply (no VNNI, a stride above 1, padding
    beyond d*(k-1), operands that are not bytes): the caller then takes the float path.
    """
    if not (native.usable(grad_q) and native.usable(weight_q)) or tuple(stride) != (1, 1):
        return None
    kh, kw = weight_q.shape[2:]
    pad = (dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1])
    if min(pad) < 0:
        return None
    geo = ConvGeometry.of(grad_q, (kh, kw), (1, 1), pad, dilation)
    if (geo.out_h, geo.out_w) != tuple(input_shape[2:]):
        return None
    flipped = weight_q.flip(2, 3).transpose(0, 1)  # (C, N, kh, kw): out and in channels swap
    # one tile of the whole reduction and no clamp: the exact, unsaturated product
    return _native_conv(grad_q, flipped, geo, geo.k, float(2**31 - 1), int8_only=True)


def _native_conv(x: torch.Tensor, weight: torch.Tensor, geo: ConvGeometry, tile: int, limit: float, *,
                 int8_only: bool = False, saturation: SaturationStats | None = None) -> torch.Tensor | None:
    """The tiled conv by a native kernel: int8 where it applies (width stride 1,
    operands that fit in bytes, VNNI), else float32 (unless ``int8_only``); None
    without the kernels or, with ``int8_only``, where int8 does not apply.
    ``saturation`` receives the counts when a kernel computed the product."""
    if not (native.usable(x) and native.usable(weight)):
        return None
    lib = native.load()
    if lib is None or (int8_only and not native.int8_dot(lib)):
        return None
    n = weight.shape[0]
    src, wt = x.contiguous(), weight.reshape(n, -1).T.contiguous()
    out = torch.empty(geo.batch, n, geo.out_h, geo.out_w, dtype=x.dtype)
    counts = None if saturation is None else (ctypes.c_double * 2)()  # [saturated, excess], written by the kernel
    args = (src.data_ptr(), wt.data_ptr(), out.data_ptr(), *geo.native_args(), n, tile, limit, counts,
            native.threads())
    status = lib.hdqt_conv_tiled_i8(*args) if native.int8_dot(lib) else 2
    if status > 0 and not int8_only:  # not bytes, a width stride above 1, or no VNNI: the float32 kernel
        status = lib.hdqt_conv_tiled_f32(*args)
    if status < 0:
        raise MemoryError("hdqt native convolution: could not allocate its buffers")
    if status != 0:
        return None
    if saturation is not None:
        saturation.add(tile_sums(geo.batch * n * geo.positions, geo.k, tile), counts[0], counts[1])
    return out


def fused_weight_grad(
    x: torch.Tensor,
    grad_q: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    layout: BlockLayout | None,
    quantizer,
    generator: torch.Generator,
    allow_int16: bool = True,
) -> tuple[torch.Tensor, float] | None:
    """``grad_q (N, B, L) @ Q_sr(H cols)^T`` without materialising the columns.

    Two native passes over the batch: the first finds max|H cols| (the scale), the
    second rebuilds the rows of a few channels in a small buffer, rounds them
    stochastically and multiplies them into dW at once (on bytes with AVX512-VNNI,
    the same result), so the backward of a convolution holds no (K, B*L) tensor. Returns (dW (N, K) in units of
    the columns' scale, that scale), or None where this path does not apply (no
    native kernels, a non-uniform layout, or a non-finite column: the general path
    then handles it and raises or propagates as the policy says).

    ``allow_int16``: where ``x`` holds small integers (the codes of a quantized input) the
    kernels build the transformed columns on int16, exactly, so with the same values as
    the float32 build (False: float32 only, for comparison).
    """
    if not (native.usable(x) and native.usable(grad_q)) or (layout is not None and not layout.uniform):
        return None
    lib = native.load()
    if lib is None:
        return None
    geo = ConvGeometry.of(x, kernel, stride, padding, dilation)
    block = 1 if layout is None else layout.blocks[0]
    src, gq = x.contiguous(), grad_q.contiguous()
    geometry = (*geo.native_args(), block)
    amax = lib.hdqt_conv_cols_amax_f32(src.data_ptr(), *geometry, allow_int16, native.threads())
    if amax < 0:
        raise MemoryError("hdqt native weight gradient: could not allocate its row buffers")
    if not math.isfinite(amax):
        return None
    scale, qmin, qmax = quantizer.grid(amax, -amax)
    n = gq.shape[0]
    grad_w = torch.empty(n, geo.k, dtype=x.dtype)
    status = lib.hdqt_conv_dw_sr_f32(
        src.data_ptr(), gq.data_ptr(), grad_w.data_ptr(), n, *geometry, scale, qmin, qmax,
        quantizer.stream_seed(generator), native.int8_dot(lib), allow_int16, native.threads(),
    )  # how many samples it multiplied as bytes (the same result as floats), or -1
    if status < 0:
        raise MemoryError("hdqt native weight gradient: could not allocate its row buffers")
    return grad_w, scale
