"""CompactBatchNorm2d: a BatchNorm2d that keeps its input for the backward as int16 codes.

BatchNorm's backward needs its input, and ``nn.BatchNorm2d`` keeps it in float32: in a
quantized ResNet that is most of what a step keeps (the convolutions keep 4-bit codes,
the ReLUs bits). But the output of a quantized convolution is an integer sum times one
scale, ``y = float32(c) * s``: the forward product of integer codes is exact (see
``functional.py``). ``QuantConv2dFunction`` marks such an output with its scale and a
bound on |c| (``mark_integer_output``); this BatchNorm, fed a marked tensor whose codes
fit in int16, keeps ``c`` (2 bytes an element) and rebuilds ``y`` bit for bit in the
backward (the same ``float32(c) * s`` operation). Everything else is torch's own batch
norm: the forward and the backward are ``aten._batch_norm_impl_index`` and its backward,
the functions ``F.batch_norm`` runs on (cuDNN on CUDA), so outputs, running statistics
and gradients are bit for bit those of ``nn.BatchNorm2d``; the tests compare them.

Recovering ``c`` from ``y``: ``y / s`` is within |c| * 2^-22 of ``c``, so rounding it
gives ``c`` exactly for |c| < 2^21 (int16 codes are far inside). An input that is not
marked (a float layer's output, a conv with a bias or a forward rotation after the
product), that was changed in place since, whose codes may not fit in int16, or a
BatchNorm in eval mode, runs ``nn.BatchNorm2d.forward`` unchanged.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

_INT16_MAX = 32767
_MARK = "_hdqt_integer_output"  # the attribute a marked tensor carries


class IntegerOutput(NamedTuple):
    scale: float  # the tensor is float32(codes) * scale, computed as codes.to(dtype).mul_(scale)
    bound: float  # |codes| <= bound
    version: int  # the tensor's _version when marked: an in-place change since voids the mark


def mark_integer_output(t: torch.Tensor, scale: float, bound: float) -> torch.Tensor:
    """Record on ``t`` (just computed as ``codes.to(t.dtype).mul_(scale)`` from exact
    integer ``codes`` with |codes| <= ``bound``) that it can be rebuilt from its codes."""
    setattr(t, _MARK, IntegerOutput(float(scale), float(bound), t._version))
    return t


def integer_scale(t: torch.Tensor) -> float | None:
    """The scale of a marked tensor whose codes fit in int16 and that is unchanged since
    it was marked, else None."""
    mark = getattr(t, _MARK, None)
    if mark is None or mark.version != t._version or mark.bound > _INT16_MAX or t.dtype != torch.float32:
        return None
    return mark.scale


class CompactBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, scale: float):
        out, save_mean, save_invstd, reserve, impl = torch.ops.aten._batch_norm_impl_index(
            x, weight, bias, running_mean, running_var, True, momentum, eps, torch.backends.cudnn.enabled)
        codes = torch.div(x, scale).round_().to(torch.int16)
        ctx.save_for_backward(codes, weight, save_mean, save_invstd, reserve)
        ctx.args = (impl, scale, eps, x.dtype)
        ctx.stats = (running_mean, running_var)  # unused by a training-mode backward; passed as torch does
        return out

    @staticmethod
    def backward(ctx, grad):
        codes, weight, save_mean, save_invstd, reserve = ctx.saved_tensors
        impl, scale, eps, dtype = ctx.args
        x = codes.to(dtype).mul_(scale)  # the convolution's own operation: the same bits
        mask = list(ctx.needs_input_grad[:3])
        grad_x, grad_w, grad_b = torch.ops.aten._batch_norm_impl_index_backward(
            impl, x, grad, weight, *ctx.stats, save_mean, save_invstd, True, eps, mask, reserve)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class CompactBatchNorm2d(nn.BatchNorm2d):
    """Drop-in ``nn.BatchNorm2d`` (a subclass) that keeps a quantized convolution's
    output as int16 codes for its backward (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = integer_scale(x) if self.training and self.affine and torch.is_grad_enabled() else None
        if scale is None or not x.requires_grad:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:  # as nn.BatchNorm2d
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mean, var = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return CompactBatchNormFunction.apply(x, self.weight, self.bias, mean, var, factor, self.eps, scale)

    @classmethod
    def from_float(cls, bn: nn.BatchNorm2d) -> "CompactBatchNorm2d":
        """A CompactBatchNorm2d sharing ``bn``'s parameters and buffers (optimizers and
        state_dict keys keep working)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(module, attr, getattr(bn, attr))
        module.weight, module.bias = bn.weight, bn.bias  # the same Parameters (or None)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            module.register_buffer(name, getattr(bn, name))
        module.train(bn.training)
        return module
