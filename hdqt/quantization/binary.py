"""HadaNets layers (Akhauri 2019): the forward product of binarized operands, float
gradients, and the stored size of a binarized model.

Forward: Y = Xb Wb^T with Xb = sign(X) * beta_X, Wb = sign(W) * beta_W, beta the mean
|.| over groups of ``group`` consecutive values along the reduction (``binarize.py``):
one beta per weight row and group, one per input row and group. A convolution is
binarized on its im2col matrix: each output position's receptive field is a row
(C_in * kh * kw values, in the weight's order), so its betas are per position and
group. Zero padding is part of those rows: a padded zero is a value of the row, with
sign -1 and |0| in its group's mean, exactly as the bit-packed kernel sees it.

sign(0) = -1 (``binarize.signs``) matters: the layers of hdqt's models read ReLU
outputs, and with sign(0) = +1 all their inputs binarized to +1, so every output
channel of a convolution was one map (the betas of its input rows) times a constant;
BatchNorm then divided each channel by a spread proportional to that constant (0
for a weight row with as many - as + signs) and the gradients grew ~100x a layer
(1e20 at ResNet-32's stem at initialisation: issue 10's follow-up).

The product runs on the bit-packed kernel (``binary_kernel.py``: 64 signs a word,
``K_g - 2 * popcount(a XOR b)`` per group, times the two betas) for CPU float32
tensors, and as a float product of the dequantized operands elsewhere (GPU, other
dtypes, HDQT_NATIVE=0, HDQT_BINARY=torch): the same sums up to float rounding.

Backward: float. dXb = G Wb and dWb = G^T Xb, then each through its binarization:
the straight-through estimator clipped to |x| <= 1, plus the gradient through beta
(``binarize.binarized_grad``; equal to autograd of the float reference formula).

Why these layers have their own autograd functions rather than per-group scales
threaded through ``functional.py``: the integer paths' tiled, saturating, Hadamard
and int8 machinery assumes one scale per tensor (or per sample) factored out of an
integer product, and is tuned for it; a binary product has a scale per (row, group)
on BOTH operands, so no single factor leaves the sum, the accumulator is exact (no
saturation), and the backward is float. Sharing the code would have added a
per-group branch to every fast path; separate functions keep those paths as they are.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hdqt.quantization import binarize, binary_kernel
from hdqt.quantization.im2col import unfold_channel_major
from hdqt.quantization.precision import backward_without_autocast
from hdqt.quantization.quantizer import NonFiniteError
from hdqt.quantization.runtime import LayerRuntime


def _checked(betas: torch.Tensor, rt: LayerRuntime, role: str) -> torch.Tensor:
    if rt.policy.nonfinite == "raise" and not bool(torch.isfinite(betas).all()):
        raise NonFiniteError(f"{role} of layer {rt.name!r} contains NaN or Inf; set the policy's "
                             "nonfinite='propagate' to let it flow through instead")
    return betas


def _forward(a: torch.Tensor, b: torch.Tensor, group: int | None, rt: LayerRuntime):
    """(a's betas, b's betas, the product (..., J)) of a (M, K) or (B, L, K) and b (J, K).

    On the kernel, one native pass over each operand packs its signs and computes its
    betas (``binary_kernel.pack_with_betas``); elsewhere torch computes the betas and
    multiplies the dequantized operands."""
    if binary_kernel.applies(a, b):
        a_bits, a_betas = binary_kernel.pack_with_betas(a, group)
        b_bits, b_betas = binary_kernel.pack_with_betas(b, group)
        _checked(a_betas, rt, "forward input"), _checked(b_betas, rt, "forward weight")
        y = binary_kernel.product_packed(a_bits, a_betas, b_bits, b_betas, a.shape[-1], group)
        return a_betas, b_betas, y.reshape(*a.shape[:-1], b.shape[0])
    a_betas = _checked(binarize.group_betas(a, group), rt, "forward input")
    b_betas = _checked(binarize.group_betas(b, group), rt, "forward weight")
    return a_betas, b_betas, binary_product(a, a_betas, b, b_betas, group)


def binary_product(a: torch.Tensor, a_betas: torch.Tensor, b: torch.Tensor, b_betas: torch.Tensor,
                   group: int | None) -> torch.Tensor:
    """(M, J): sum over groups of a's and b's binarized rows' products, a (M, K), b (J, K).
    Rows of ``a`` may be strided (an im2col matrix read as rows): see ``binary_kernel``."""
    y = binary_kernel.product(a, a_betas, b, b_betas, group)
    if y is None:
        k = a.shape[-1]
        y = binarize.binarized(a, group, a_betas) @ binarize.binarized(b, group, b_betas).reshape(-1, k).T
    return y


class BinaryLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rt: LayerRuntime) -> torch.Tensor:
        group = rt.policy.binary_group
        bx, bw, y = _forward(x, weight, group, rt)
        ctx.save_for_backward(x, weight, bx, bw)
        ctx.group = group
        return y

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad: torch.Tensor):
        x, weight, bx, bw = ctx.saved_tensors
        group = ctx.group
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_xb = grad @ binarize.binarized(weight, group, bw)
            grad_x = binarize.binarized_grad(x, grad_xb, bx, group)
        if ctx.needs_input_grad[1]:
            grad_wb = grad.T @ binarize.binarized(x, group, bx)
            grad_w = binarize.binarized_grad(weight, grad_wb, bw, group)
        return grad_x, grad_w, None


def _columns(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """The im2col rows of ``x``: (B, L, K), a permuted view of the (K, B, L) columns
    (the native im2col where it applies: torch's unfold took 20x longer on CPU)."""
    cols, _ = unfold_channel_major(x, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))
    return cols.permute(1, 2, 0)


class BinaryConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, rt: LayerRuntime, stride, padding, dilation):
        group = rt.policy.binary_group
        n, c, kh, kw = weight.shape
        b = x.shape[0]
        oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        w2 = weight.reshape(n, -1)
        if binary_kernel.applies(x, weight):  # the rows packed straight from x, no column matrix
            x_bits, bx = binary_kernel.pack_conv_with_betas(x, (kh, kw), stride, padding, dilation, group)
            w_bits, bw = binary_kernel.pack_with_betas(w2, group)
            _checked(bx, rt, "forward input"), _checked(bw, rt, "forward weight")
            y = binary_kernel.product_packed(x_bits, bx, w_bits, bw, w2.shape[1], group).reshape(b, -1, n)
        else:
            rows = _columns(x, (kh, kw), stride, padding, dilation)  # (B, L, K)
            bx, bw, y = _forward(rows, w2, group, rt)  # betas (B, L, G) and (N, G); y (B, L, N)
        ctx.save_for_backward(x, weight, bx, bw)
        ctx.conv = (group, (kh, kw), stride, padding, dilation)
        # channels-last memory: (B, OH, OW, N) seen as (B, N, OH, OW), no copy
        return y.reshape(b, oh, ow, n).permute(0, 3, 1, 2)

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad):
        x, weight, bx, bw = ctx.saved_tensors
        group, kernel, stride, padding, dilation = ctx.conv
        n = weight.shape[0]
        w2 = weight.reshape(n, -1)
        g = grad.reshape(grad.shape[0], n, -1)  # (B, N, L)
        # recomputed (the input is smaller than its columns), and made contiguous: the
        # elementwise backward on the strided view read across K and ran ~20x slower
        rows = _columns(x, kernel, stride, padding, dilation).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_rows = g.transpose(1, 2) @ binarize.binarized(w2, group, bw)  # (B, L, K)
            grad_rows = binarize.binarized_grad(rows, grad_rows, bx, group)
            grad_x = F.fold(grad_rows.transpose(1, 2), x.shape[2:], kernel, dilation=dilation, padding=padding,
                            stride=stride)
        if ctx.needs_input_grad[1]:
            xb = binarize.binarized(rows, group, bx)  # (B, L, K)
            # K-major, as the strided rows gave it before: the product's summation order, so dW, is unchanged
            xb_k = xb.permute(2, 0, 1).reshape(xb.shape[-1], -1).contiguous()  # (K, B * L)
            grad_wb = g.permute(1, 0, 2).reshape(n, -1) @ xb_k.T
            grad_w = binarize.binarized_grad(w2, grad_wb, bw, group).reshape(weight.shape)
        return grad_x, grad_w, None, None, None, None


def binary_linear(x: torch.Tensor, weight: torch.Tensor, rt: LayerRuntime) -> torch.Tensor:
    """The product of a QuantLinear under a binary policy (x: (B, K)), bias not included."""
    return BinaryLinearFunction.apply(x, weight, rt)


def binary_conv2d(x, weight, rt: LayerRuntime, stride, padding, dilation) -> torch.Tensor:
    """The convolution of a QuantConv2d under a binary policy, bias not included."""
    return BinaryConv2dFunction.apply(x, weight, rt, tuple(stride), tuple(padding), tuple(dilation))


def model_size_bits(model: nn.Module, policy=None) -> dict[str, int]:
    """The bits that store ``model`` for inference, by kind, and their total.

    A layer under a binary policy stores one bit per weight (``binary_weights``) and a
    float32 beta per row and group (``betas``); the other parameters and buffers
    (float layers: by default the first and last, biases, BatchNorm's weight, bias and
    running statistics) count 32 bits a value (``float``); BatchNorm's batch counter
    and other integer buffers are not counted. ``policy`` (a binary policy) counts
    ``model`` as quantize_model would convert it (its float layers as the policy's
    binary layers, but for the first and last when ``float_first_last``); None counts
    the layers as they are.
    """
    from hdqt.quantization.boundary import float_boundary
    from hdqt.quantization.layers import QuantConv2d, QuantLinear

    binary: dict[str, int | None] = {}  # layer name -> group
    boundary = float_boundary(model) if policy is not None and policy.float_first_last else set()
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)) and module.policy.is_binary:
            binary[name] = module.policy.binary_group
        elif (policy is not None and policy.is_binary and isinstance(module, (nn.Linear, nn.Conv2d))
              and not isinstance(module, (QuantLinear, QuantConv2d)) and name not in boundary):
            binary[name] = policy.binary_group
    sizes = {"binary_weights": 0, "betas": 0, "float": 0}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if name in binary and pname == "weight":
                rows, k = param.shape[0], param[0].numel()
                sizes["binary_weights"] += param.numel()
                sizes["betas"] += 32 * rows * binarize.group_count(k, binary[name])
            else:
                sizes["float"] += 32 * param.numel()
        for _, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                sizes["float"] += 32 * buf.numel()
    sizes["total"] = sum(sizes.values())
    return sizes
