"""PackedMaskReLU: a ReLU whose backward keeps one bit per element, not its output.

``nn.ReLU`` keeps its float output for the backward (4 bytes an element), although
the backward reads only where the output is positive. ``PackedMaskReLU`` computes the
same forward and the same gradient, bit for bit, and keeps that mask packed 8 to a
byte (``packing.pack_bits``): 1/32 of the memory. ``quantize_model`` swaps the
model's ``nn.ReLU`` modules for it by default (``pack_relu=True``).

Exactly as torch's ``threshold_backward(grad, output, 0)``: the gradient passes where
the output is not ``<= 0`` (positive, or NaN) and is +0 elsewhere. The mask is the
output cast to bool (nonzero: a ReLU's output is >= 0 or NaN, and -0 casts to False).
Without autograd (no grad mode, or an input that needs no gradient) it is plain
``torch.relu`` and keeps nothing. ``inplace=True`` is accepted and ignored: the output
is always a new tensor (an in-place ReLU keeps its output too, so nothing is lost).

On a dense CPU float32 input the native kernels (``csrc/packing.c``) write the output
and the mask in one pass, and the backward applies the mask in one pass when the
gradient has the input's layout; elsewhere the torch operations below run (the same
bits: the tests compare the two).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hdqt.quantization import native
from hdqt.quantization.packing import flat_in_order, memory_order, pack_bits, restore_order, unpack_bits


def _dense_in(t: torch.Tensor, order: tuple[int, ...]) -> bool:
    """Whether ``t``'s memory holds its elements in ``order`` (``t`` permuted so is contiguous)."""
    return t.is_contiguous() if order == tuple(range(t.dim())) else t.permute(order).is_contiguous()


class PackedMaskReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        # packed in memory order (a ReLU on a linear layer's transposed Y^T packs without a copy)
        order = memory_order(x)
        lib = native.load() if native.usable(x) else None
        if lib is not None and _dense_in(x, order):
            y = torch.empty_like(x)  # x's strides (a dense tensor's are kept)
            bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
            lib.hdqt_relu_mask_f32(x.data_ptr(), y.data_ptr(), x.numel(), bits.data_ptr(), native.threads())
        else:
            y = torch.relu(x)
            order = memory_order(y)
            bits = pack_bits(flat_in_order(y.to(torch.bool), order))
        ctx.save_for_backward(bits)
        ctx.shape, ctx.order = y.shape, order
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (packed,) = ctx.saved_tensors
        shape, order = ctx.shape, ctx.order
        lib = native.load() if native.usable(grad) else None
        if lib is not None and _dense_in(grad, order):
            out = torch.empty_like(grad)
            lib.hdqt_mask_grad_f32(grad.data_ptr(), packed.data_ptr(), grad.numel(), out.data_ptr(), native.threads())
            return out
        mask = restore_order(unpack_bits(packed, grad.numel()), shape, order)
        # uint8 against 0: the same comparison (and result dtype) as on the float output
        return torch.ops.aten.threshold_backward(grad, mask, 0)


def packed_mask_relu(x: torch.Tensor) -> torch.Tensor:
    """``torch.relu(x)`` that keeps a 1-bit mask for its backward (see the module docstring)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.relu(x)
    return PackedMaskReLUFunction.apply(x)


class PackedMaskReLU(nn.ReLU):
    """Drop-in ``nn.ReLU`` (a subclass, so ``isinstance(m, nn.ReLU)`` still holds) whose
    backward keeps a packed bit mask instead of the float output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_mask_relu(x)

    @classmethod
    def from_float(cls, relu: nn.ReLU) -> "PackedMaskReLU":
        module = cls()
        module.train(relu.training)
        return module
