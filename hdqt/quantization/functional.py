"""Autograd functions of quantized linear and conv2d training.

Forward: Y = Q(X) Q(W)^T with a tiled saturating accumulator. Backward, with the
Hadamard transform H along the reduction dimension of each product:

    dX = Q_sr(G H_N) Q_rtn(H_N W_q) / p_N
    dW = Q_sr(G^T H_B) Q_sr(H_B X_q) / p_B

The weight and input operands of the backward products are the *quantized*
forward operands (straight-through estimator).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hdqt.quantization.hadamard import block_layout, hadamard_transform
from hdqt.quantization.matmul import exact_dtype, tiled_matmul, tiled_matmul_batched
from hdqt.quantization.quantizer import QTensor, Quantizer
from hdqt.quantization.runtime import LayerRuntime


def _max_int(quantizer: Quantizer | None) -> float:
    return float("inf") if quantizer is None else quantizer.format.max_magnitude()


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
    policy = rt.policy
    extra = 1.0
    if policy.hadamard and (qa is not None or qb is not None):
        layout = block_layout(a.shape[a_dim], policy.hadamard_rule)
        if not layout.is_identity:
            a = hadamard_transform(a, a_dim, layout, rt.hadamard_cache)
            b = hadamard_transform(b, b_dim, layout, rt.hadamard_cache)
            extra = layout.product_scale
    return rt.quantize(qa, a, a_name), rt.quantize(qb, b, b_name), extra


class QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rt: LayerRuntime) -> torch.Tensor:
        policy = rt.policy
        xq = rt.quantize(policy.forward_input, x, "forward input")
        wq = rt.quantize(policy.forward_weight, weight, "forward weight")
        reduction = min(policy.tile, x.shape[1]) if policy.acc_bits is not None else x.shape[1]
        dtype = exact_dtype(reduction, _max_int(policy.forward_input), _max_int(policy.forward_weight), x.dtype)
        y = tiled_matmul(xq.values.to(dtype), wq.values.to(dtype), policy.tile, policy.acc_bits)
        ctx.save_for_backward(xq.values, wq.values)
        ctx.scales = (xq.scale, wq.scale)
        ctx.rt = rt
        return y.to(x.dtype).mul_(xq.scale * wq.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_values, w_values = ctx.saved_tensors
        x_scale, w_scale = ctx.scales
        rt: LayerRuntime = ctx.rt
        policy = rt.policy
        acc = policy.acc_bits if policy.saturate_backward else None
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # dX = G W: the reduction runs over the output features N.
            g, w, extra = backward_operands(
                rt, grad, 1, policy.grad_output_dx, "output gradient (dX)",
                w_values, 0, policy.backward_weight, "backward weight",
            )
            grad_x = tiled_matmul(g.values, w.values.T, policy.tile, acc)
            grad_x.mul_(g.scale * w.scale * w_scale * extra)
        if ctx.needs_input_grad[1]:
            # dW = G^T X: the reduction runs over the batch.
            g, x, extra = backward_operands(
                rt, grad, 0, policy.grad_output_dw, "output gradient (dW)",
                x_values, 0, policy.backward_input, "backward input",
            )
            grad_w = tiled_matmul(g.values.T, x.values.T, policy.tile, acc)
            grad_w.mul_(g.scale * x.scale * x_scale * extra)
        return grad_x, grad_w, None


class QuantConv2dFunction(torch.autograd.Function):
    """Conv2d as an im2col matmul: columns (B, K, L) with K = C_in*kh*kw, L = positions."""

    @staticmethod
    def forward(ctx, x, weight, rt: LayerRuntime, stride, padding, dilation):
        policy = rt.policy
        xq = rt.quantize(policy.forward_input, x, "forward input")
        wq = rt.quantize(policy.forward_weight, weight, "forward weight")
        n, c, kh, kw = weight.shape
        k = c * kh * kw
        reduction = min(policy.tile, k) if policy.acc_bits is not None else k
        dtype = exact_dtype(reduction, _max_int(policy.forward_input), _max_int(policy.forward_weight), x.dtype)
        cols = F.unfold(xq.values.to(dtype), (kh, kw), dilation=dilation, padding=padding, stride=stride)
        y = tiled_matmul_batched(wq.values.reshape(n, k).to(dtype), cols, policy.tile, policy.acc_bits)
        out_h = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        # The columns are kept for dW: unfolding again in backward costs more than the memory.
        ctx.save_for_backward(cols.to(x.dtype), wq.values)
        ctx.input_shape = x.shape
        ctx.scales = (xq.scale, wq.scale)
        ctx.rt = rt
        ctx.conv = (stride, padding, dilation)
        return y.to(x.dtype).mul_(xq.scale * wq.scale).reshape(x.shape[0], n, out_h, out_w)

    @staticmethod
    def backward(ctx, grad):
        cols, w_values = ctx.saved_tensors
        x_scale, w_scale = ctx.scales
        rt: LayerRuntime = ctx.rt
        policy = rt.policy
        stride, padding, dilation = ctx.conv
        input_shape = ctx.input_shape
        acc = policy.acc_bits if policy.saturate_backward else None
        b, n = grad.shape[:2]
        _, c, kh, kw = w_values.shape
        grad_cols = grad.reshape(b, n, -1).contiguous()  # (B, N, L)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # dX: reduction over output channels N; Hadamard along N of G and W.
            g, w, extra = backward_operands(
                rt, grad_cols, 1, policy.grad_output_dx, "output gradient (dX)",
                w_values.reshape(n, -1), 0, policy.backward_weight, "backward weight",
            )
            scale = g.scale * w.scale * w_scale * extra
            if acc is None:
                # Unlimited accumulators: the col2im of W^T G is exactly a transposed conv.
                grad_x = torch.nn.grad.conv2d_input(
                    input_shape, w.values.reshape(n, c, kh, kw), g.values.reshape(grad.shape),
                    stride=stride, padding=padding, dilation=dilation,
                )
            else:
                cols_dx = tiled_matmul_batched(w.values.T.contiguous(), g.values, policy.tile, acc)
                grad_x = F.fold(cols_dx, input_shape[2:], (kh, kw), dilation=dilation, padding=padding, stride=stride)
            grad_x.mul_(scale)
        if ctx.needs_input_grad[1]:
            # dW: reduction over each sample's positions (and the batch); the
            # Hadamard runs along the positions L of every sample at once.
            g, x, extra = backward_operands(
                rt, grad_cols, 2, policy.grad_output_dw, "output gradient (dW)",
                cols, 2, policy.backward_input, "backward input",
            )
            if acc is None:
                grad_w = torch.bmm(g.values, x.values.transpose(1, 2)).sum(0)
            else:
                flat_g = g.values.transpose(0, 1).reshape(n, -1)
                flat_x = x.values.transpose(0, 1).reshape(c * kh * kw, -1)
                grad_w = tiled_matmul(flat_g, flat_x, policy.tile, acc)
            grad_w = grad_w.mul_(g.scale * x.scale * x_scale * extra).reshape(n, c, kh, kw)
        return grad_x, grad_w, None, None, None, None
