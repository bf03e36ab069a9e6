"""Autograd functions of quantized linear and conv2d training.

Forward: Y = Q(X) Q(W)^T with a tiled saturating accumulator. Backward, with the
Hadamard transform H along the reduction dimension of each product:

    dX = Q_sr(G H_N) Q_rtn(H_N W_q) / p_N
    dW = Q_sr(G^T H_B) Q_sr(H_B X_q) / p_B

The weight and input operands of the backward products are the *quantized*
forward operands (straight-through estimator). Operands are laid out with the
reduction dimension last where that is cheap, so that the transform runs along
contiguous rows (the native kernel's fast case).

What the forward keeps for the backward goes through ``ctx.save_for_backward`` (so
``saved_tensors_hooks``, offloading and checkpointing tools see it) and only what the
backward will use: the quantized input when the weight needs a gradient, the
quantized weight when the input does. Both are stored compactly and losslessly
(``packing.py``: two 4-bit codes per byte at <= 4 bits); the scales stay beside them
as Python floats. A convolution's output that is an exact integer sum times one scale
is marked so, for a ``CompactBatchNorm2d`` after it to keep the sums (``compact_bn.py``).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from hdqt.quantization import fused_linear
from hdqt.quantization.accumulate import FloatBounds, float_conv2d
from hdqt.quantization.compact_bn import mark_integer_output
from hdqt.quantization.formats import IntFormat
from hdqt.quantization.hadamard import BlockLayout, block_layout, hadamard_transform_amax
from hdqt.quantization.im2col import exact_input_grad, fused_weight_grad, tiled_conv2d, unfold_channel_major
from hdqt.quantization.matmul import Bounds, exact_dtype, sum_bound, tiled_matmul, tiled_matmul_batched, tiled_matmul_kj
from hdqt.quantization.packing import holds_codes, keep_operand, pack_operand, unpack_operand
from hdqt.quantization.precision import backward_without_autocast
from hdqt.quantization.quantizer import QTensor, Quantizer
from hdqt.quantization.runtime import LayerRuntime
from hdqt.quantization.selection import relative_rounding_error, transform_helps


def integer_bounds(qa: Quantizer | None, qb: Quantizer | None) -> Bounds | None:
    """The largest magnitudes of a product's two operands when both are quantized, else
    None (an unquantized operand: the product runs in its own dtype). With a float or
    log format among them they come as ``FloatBounds``: a limited accumulator of that
    product is a float accumulator (``accumulate.py``)."""
    if qa is None or qb is None:
        return None
    bounds = (qa.format.max_magnitude(), qb.format.max_magnitude())
    # float or log operands: a limited accumulator is a float one (accumulate.py)
    return bounds if qa.format.is_integer and qb.format.is_integer else FloatBounds(bounds)


def _float_bounds(policy) -> FloatBounds | None:
    """The forward product's bounds when its limited accumulator is a float one, else None."""
    bounds = integer_bounds(policy.forward_input, policy.forward_weight)
    return bounds if isinstance(bounds, FloatBounds) else None


def _forward_dtype(policy, reduction: int, x: torch.Tensor) -> torch.dtype:
    """The operands' dtype when the forward product is exact in it (its partial sums, and
    on a GPU its operands under TF32), else float64."""
    bounds = integer_bounds(policy.forward_input, policy.forward_weight)
    if bounds is None:
        return x.dtype
    return exact_dtype(sum_bound(reduction, bounds, policy.tile, policy.acc_bits), x.dtype,
                       operands=bounds, device=x.device)


def backward_layout(rt: LayerRuntime, size: int, qa: Quantizer | None, qb: Quantizer | None) -> BlockLayout | None:
    """The Hadamard blocks along a backward reduction of ``size``, or None when no transform applies."""
    policy = rt.policy
    if not policy.hadamard or (qa is None and qb is None):
        return None
    layout = block_layout(size, policy.hadamard_rule)
    return None if layout.is_identity else layout


def backward_operands(
    rt: LayerRuntime,
    a: torch.Tensor,
    a_dim: int,
    qa: Quantizer | None,
    a_name: str,
    b: torch.Tensor,
    b_dim: int,
    qb: Quantizer | None,
    b_name: str,
) -> tuple[QTensor, QTensor, float]:
    """Move both operands of a backward product into the Hadamard domain along
    their shared reduction dimension, then quantize them.

    Returns the two quantized operands and the factor that undoes H·H.
    """
    layout = backward_layout(rt, a.shape[a_dim], qa, qb)
    amax_a = amax_b = None
    extra = 1.0
    if layout is not None and _fuses_transform(rt, layout, (a, a_dim, qa), (b, b_dim, qb)):
        # transform and quantizer in one native call per operand, seeds drawn in the same order
        p = layout.blocks[0]
        return (rt.quantize_row_transform(qa, a, p, a_name), rt.quantize_row_transform(qb, b, p, b_name),
                layout.product_scale)
    if layout is not None:
        ta, tmax_a = hadamard_transform_amax(a, a_dim, layout, rt.hadamard_cache)
        tb, tmax_b = hadamard_transform_amax(b, b_dim, layout, rt.hadamard_cache)
        if rt.policy.hadamard_select == "always" or transform_helps(
            (relative_rounding_error(a, qa), relative_rounding_error(b, qb)),
            (relative_rounding_error(ta, qa, tmax_a), relative_rounding_error(tb, qb, tmax_b)),
        ):
            a, b, amax_a, amax_b, extra = ta, tb, tmax_a, tmax_b, layout.product_scale
    return rt.quantize(qa, a, a_name, amax_a), rt.quantize(qb, b, b_name, amax_b), extra


def _fuses_transform(rt: LayerRuntime, layout: BlockLayout, *operands) -> bool:
    """Whether every (tensor, dim, quantizer) of a backward product can be transformed and
    quantized in one native call: uniform blocks along the last dimension, the transform
    always applied, and quantizers that fuse it (``Quantizer.fuses_row_transform``). Decided
    for all operands before any is quantized, so a fallback draws no seed twice."""
    if rt.policy.hadamard_select != "always" or not layout.uniform:
        return False
    return all(q is not None and dim % t.dim() == t.dim() - 1 and q.fuses_row_transform(t) for t, dim, q in operands)


def _integer_output_bound(policy, reduction: int, xq: QTensor, wq: QTensor) -> float | None:
    """A bound on |Y / scale| when the forward output is an exact integer sum times one
    scale (integer codes, per-tensor scales), else None."""
    operands = (policy.forward_input, policy.forward_weight)
    if not all(holds_codes(q) and isinstance(q.format, IntFormat) for q in operands):
        return None
    bounds = integer_bounds(*operands)
    scale = xq.scale * wq.scale
    if isinstance(scale, torch.Tensor) or not math.isfinite(scale):
        return None
    return sum_bound(reduction, bounds, policy.tile, policy.acc_bits)


def output_scale(xq: QTensor, wq: QTensor) -> float | torch.Tensor:
    """The scale of the forward product's integer sums: one float, or with per-channel
    weight scales (one per output feature, dimension 0 of the weight) a tensor over the
    output's dimension 1, (1, N) for a linear layer and (1, N, 1, 1) for a conv."""
    if not isinstance(wq.scale, torch.Tensor):
        return xq.scale * wq.scale
    channels = wq.scale.reshape(1, -1, *([1] * (wq.values.dim() - 2)))
    return channels * xq.scale


def per_tensor_weight(w_values: torch.Tensor | None, w_scale):
    """The saved weight for the backward with one scale: per-channel weights come
    dequantized (scale 1). Their scales do not factor out of dX, a sum over the output
    features (in the Hadamard domain, mixed along them), so the backward weight's own
    quantizer takes the forward's quantized values, as it takes codes times a scale."""
    if w_values is None or not isinstance(w_scale, torch.Tensor):
        return w_values, w_scale
    return w_values * w_scale, 1.0


def save_operands(ctx, xq: QTensor, wq: QTensor, policy) -> None:
    """Keep, compactly, the forward operands the backward will need: the quantized
    input for dW (when the weight needs a gradient), the quantized weight for dX."""
    input_needs_grad, weight_needs_grad = ctx.needs_input_grad[:2]
    # HDQT_PACK=0 keeps the float codes (faster for small layers, 2-8x the memory; README)
    pack = pack_operand if os.environ.get("HDQT_PACK", "1") != "0" else keep_operand
    x_tensors, x_layout = pack(xq, policy.forward_input) if weight_needs_grad else ((), None)
    w_tensors, w_layout = pack(wq, policy.forward_weight) if input_needs_grad else ((), None)
    ctx.save_for_backward(*x_tensors, *w_tensors)
    ctx.layouts = (x_layout, len(x_tensors), w_layout)
    ctx.scales = (xq.scale, wq.scale)


def saved_operands(ctx) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The quantized input and weight ``save_operands`` kept (None where not kept)."""
    saved = ctx.saved_tensors
    x_layout, x_count, w_layout = ctx.layouts
    x = unpack_operand(saved[:x_count], x_layout) if x_layout is not None else None
    w = unpack_operand(saved[x_count:], w_layout) if w_layout is not None else None
    return x, w


class QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rt: LayerRuntime) -> torch.Tensor:
        ctx.rt = rt
        fused = fused_linear.forward(ctx, x, weight, rt)  # the common case in one native call
        if fused is not None:
            return fused
        policy = rt.policy
        xq = rt.quantize(policy.forward_input, x, "forward input")
        wq = rt.quantize(policy.forward_weight, weight, "forward weight")
        dtype = _forward_dtype(policy, x.shape[1], x)
        xv, wv = xq.values.to(dtype), wq.values.to(dtype)
        if policy.acc_bits is None:
            y = xv @ wv.T
        else:
            # Computed as Y^T = W X^T: the tiled product reads W in place and needs X^T
            # row-major, which the previous layer's output already is (Y^T is returned
            # as a transposed view, and elementwise layers keep that layout).
            counts = rt.saturation if rt.saturation.sample() else None  # one call in `every`
            y = tiled_matmul_kj(wv, xv.T, policy.tile, policy.acc_bits, saturation=counts,
                                bounds=_float_bounds(policy)).T
        save_operands(ctx, xq, wq, policy)
        ctx.input_transposed = not x.is_contiguous() and x.T.is_contiguous()
        return y.to(x.dtype).mul_(output_scale(xq, wq))

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad: torch.Tensor):
        fused = fused_linear.backward(ctx, grad)  # the common case in one native call
        if fused is not None:
            return fused
        x_values, w_values = saved_operands(ctx)
        x_scale, w_scale = ctx.scales
        w_values, w_scale = per_tensor_weight(w_values, w_scale)
        rt: LayerRuntime = ctx.rt
        policy = rt.policy
        acc = policy.acc_bits if policy.saturate_backward else None
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # dX = G W, reduced over the output features N: rows of G (B, N) and W^T (K, N)
            # (transposed views: the transform or the quantizer makes the one contiguous copy).
            g, w, extra = backward_operands(
                rt, grad, 1, policy.grad_output_dx, "output gradient (dX)",
                w_values.T, 1, policy.backward_weight, "backward weight",
            )
            bounds = integer_bounds(policy.grad_output_dx, policy.backward_weight)
            if ctx.input_transposed:
                # The input was the transposed view of a (K, B) tensor (a previous layer's
                # Y^T): dX^T = W G^T gives dX that layout too. Elementwise backwards such as
                # ReLU's then see one layout, which runs ~5x faster than mixed strides.
                grad_x = tiled_matmul(w.values, g.values, policy.tile, acc, bounds=bounds).T
            else:
                grad_x = tiled_matmul(g.values, w.values, policy.tile, acc, bounds=bounds)
            grad_x.mul_(g.scale * w.scale * w_scale * extra)
        if ctx.needs_input_grad[1]:
            # dW = G^T X, reduced over the batch: rows of G^T (N, B) and X^T (K, B).
            g, x, extra = backward_operands(
                rt, grad.T, 1, policy.grad_output_dw, "output gradient (dW)",
                x_values.T, 1, policy.backward_input, "backward input",
            )
            bounds = integer_bounds(policy.grad_output_dw, policy.backward_input)
            grad_w = tiled_matmul(g.values, x.values, policy.tile, acc, bounds=bounds)
            grad_w.mul_(g.scale * x.scale * x_scale * extra)
        return grad_x, grad_w, None


class QuantConv2dFunction(torch.autograd.Function):
    """Conv2d as an im2col matmul: columns (K, B*L) with K = C_in*kh*kw, L = positions."""

    @staticmethod
    def forward(ctx, x, weight, rt: LayerRuntime, stride, padding, dilation):
        policy = rt.policy
        xq = rt.quantize(policy.forward_input, x, "forward input")
        wq = rt.quantize(policy.forward_weight, weight, "forward weight")
        n, c, kh, kw = weight.shape
        dtype = _forward_dtype(policy, c * kh * kw, x)
        xv, wv = xq.values.to(dtype), wq.values.to(dtype)
        if policy.acc_bits is None:
            # Unlimited accumulator: a plain convolution of the integer operands (exact in dtype).
            y = F.conv2d(xv, wv, None, stride, padding, dilation)
        else:
            counts = rt.saturation if rt.saturation.sample() else None  # one call in `every`
            fb = _float_bounds(policy)
            y = (float_conv2d(xv, wv, stride, padding, dilation, policy.tile, policy.acc_bits, fb) if fb else
                 tiled_conv2d(xv, wv, stride, padding, dilation, policy.tile, policy.acc_bits, counts))
        # The quantized input is kept, not its columns: 1/(kh*kw) of the memory, and
        # the backward builds the columns it needs (transformed) in one pass anyway.
        save_operands(ctx, xq, wq, policy)
        ctx.rt = rt
        ctx.conv = (stride, padding, dilation)
        ctx.shapes = (x.shape, weight.shape)
        out = y.to(x.dtype).mul_(output_scale(xq, wq))
        bound = _integer_output_bound(policy, c * kh * kw, xq, wq)
        # a BatchNorm after it may keep the integer sums instead of this float tensor (compact_bn.py)
        return out if bound is None else mark_integer_output(out, xq.scale * wq.scale, bound)

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad):
        x_values, w_values = saved_operands(ctx)
        x_shape, w_shape = ctx.shapes
        x_scale, w_scale = ctx.scales
        w_values, w_scale = per_tensor_weight(w_values, w_scale)
        rt: LayerRuntime = ctx.rt
        policy = rt.policy
        stride, padding, dilation = ctx.conv
        acc = policy.acc_bits if policy.saturate_backward else None
        b, n = grad.shape[:2]
        _, c, kh, kw = w_shape
        grad_cols = grad.reshape(b, n, -1).contiguous()  # (B, N, L)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # dX: reduction over output channels N; Hadamard along N of G and W.
            g, w, extra = backward_operands(
                rt, grad_cols, 1, policy.grad_output_dx, "output gradient (dX)",
                w_values.reshape(n, -1), 0, policy.backward_weight, "backward weight",
            )
            scale = g.scale * w.scale * w_scale * extra
            bounds = integer_bounds(policy.grad_output_dx, policy.backward_weight)
            if acc is None:
                # Unlimited accumulators: the col2im of W^T G is exactly a transposed conv,
                # on int8 dot products where they apply, else on torch's float conv.
                w4, g4 = w.values.reshape(n, c, kh, kw), g.values.reshape(grad.shape)
                grad_x = exact_input_grad(g4, w4, x_shape, stride, padding, dilation) if bounds else None
                if grad_x is None:
                    # a position of dX sums at most N*kh*kw products
                    wide = (exact_dtype(sum_bound(n * kh * kw, bounds), g4.dtype, operands=bounds, device=g4.device)
                            if bounds else g4.dtype)
                    grad_x = torch.nn.grad.conv2d_input(x_shape, w4.to(wide), g4.to(wide), stride=stride,
                                                        padding=padding, dilation=dilation).to(g4.dtype)
            else:
                cols_dx = tiled_matmul_batched(w.values.T.contiguous(), g.values, policy.tile, acc, bounds=bounds)
                grad_x = F.fold(cols_dx, x_shape[2:], (kh, kw), dilation=dilation, padding=padding,
                                stride=stride)
            grad_x.mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_w = _conv_weight_grad(rt, grad_cols, x_values, (kh, kw), ctx.conv, acc)
            grad_w = grad_w.mul_(x_scale).reshape(n, c, kh, kw)
        return grad_x, grad_w, None, None, None, None


def _conv_transform_helps(rt: LayerRuntime, g, g_t, amax_t, x_values, kernel, conv, layout) -> bool:
    """hadamard_select="noise" for a conv's dW: the gradient rows in both domains, and the
    columns, whose raw rounding error is the input's (the same values, some repeated, and
    zeros) and whose transformed one needs them built (this option's extra cost)."""
    policy = rt.policy
    qg, qx = policy.grad_output_dw, policy.backward_input
    cols_t, amax_ct = unfold_channel_major(x_values, kernel, *conv, layout, rt.hadamard_cache)
    raw = (relative_rounding_error(g, qg), relative_rounding_error(x_values, qx))
    return transform_helps(raw, (relative_rounding_error(g_t, qg, amax_t), relative_rounding_error(cols_t, qx, amax_ct)))


def _conv_weight_grad(rt: LayerRuntime, grad_cols, x_values, kernel, conv, acc) -> torch.Tensor:
    """dW = G X^T reduced over every sample's positions (and the batch), with the
    Hadamard transform along each sample's positions L, for the whole batch at once.

    Returns dW (N, K) up to the forward input's scale."""
    policy = rt.policy
    b, n, positions = grad_cols.shape
    layout = backward_layout(rt, positions, policy.grad_output_dw, policy.backward_input)
    g = grad_cols.transpose(0, 1)  # (N, B, L): the same row layout as the columns
    qx = policy.backward_input
    amax_g, extra = None, 1.0
    if layout is not None and _fuses_transform(rt, layout, (g, 2, policy.grad_output_dw)):
        # the (N, B, L) copy, its transform and its rounding in one native call: two
        # passes and two (B, N, L)-sized buffers fewer, the same values and draws
        gq = rt.quantize_row_transform(policy.grad_output_dw, g, layout.blocks[0], "output gradient (dW)")
        extra = layout.product_scale
    else:
        g = g.contiguous()
        if layout is not None:
            g_t, amax_t = hadamard_transform_amax(g, 2, layout, rt.hadamard_cache)
            if policy.hadamard_select == "always" or _conv_transform_helps(rt, g, g_t, amax_t, x_values, kernel,
                                                                           conv, layout):
                g, amax_g, extra = g_t, amax_t, layout.product_scale
            else:
                layout = None
        gq = rt.quantize(policy.grad_output_dw, g, "output gradient (dW)", amax_g)
    if acc is None and qx is not None and qx.rounding == "stochastic" and qx.native_fast and qx.format.signed != "auto":
        fused = fused_weight_grad(x_values, gq.values, kernel, *conv, layout, qx, rt.generator(x_values.device))
        if fused is not None:
            grad_w, x_scale = fused
            return grad_w.mul_(gq.scale * x_scale * extra)
    cols, amax_x = unfold_channel_major(x_values, kernel, *conv, layout, rt.hadamard_cache)  # (K, B, L)
    xq = rt.quantize(qx, cols, "backward input", amax_x)
    flat_g, flat_x = gq.values.reshape(n, -1), xq.values.reshape(cols.shape[0], -1)
    bounds = integer_bounds(policy.grad_output_dw, qx)
    grad_w = tiled_matmul(flat_g, flat_x, policy.tile, acc, bounds=bounds)
    return grad_w.mul_(gq.scale * xq.scale * extra)
