"""QuantLinear and QuantConv2d: drop-in nn.Linear / nn.Conv2d whose training
matmuls (forward and backward) run under a QuantPolicy.

They subclass the float layers, so code that looks for nn.Linear heads keeps
working, and they share the float layer's Parameters when converted, so an
optimizer built before conversion still updates them. The policy and the
stochastic-rounding generator states are saved in the state_dict (extra state),
with the state of scalings that track tensors across steps (FP134's exponents).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hdqt.quantization.binary import binary_conv2d, binary_linear
from hdqt.quantization.functional import QuantConv2dFunction, QuantLinearFunction
from hdqt.quantization.hadamard import BlockLayout, block_layout, hadamard_transform
from hdqt.quantization.policy import QuantPolicy
from hdqt.quantization.precision import autocast_off, autocast_on, needs_float32
from hdqt.quantization.runtime import LayerRuntime, derive_seed


class _Rotate(torch.autograd.Function):
    """The block Hadamard transform along ``dim``, differentiable: every block (±1 entries,
    or orthonormal when blocks differ) is symmetric, so the backward is the same transform."""

    @staticmethod
    def forward(ctx, x, dim: int, layout: BlockLayout, cache: dict):
        ctx.args = (dim, layout, cache)
        return hadamard_transform(x, dim, layout, cache)

    @staticmethod
    def backward(ctx, grad):
        dim, layout, cache = ctx.args
        return hadamard_transform(grad, dim, layout, cache), None, None, None


def _forward_rotation(rt, x: torch.Tensor, weight: torch.Tensor, dim: int):
    """(x, weight, factor): both rotated along their reduction dimension ``dim`` when the
    policy's ``forward_hadamard`` is on (factor undoes H·H), else unchanged (factor None)."""
    policy = rt.policy
    if not policy.forward_hadamard:
        return x, weight, None
    layout = block_layout(x.shape[dim], policy.hadamard_rule)
    if layout.is_identity:
        return x, weight, None
    cache = rt.hadamard_cache
    return _Rotate.apply(x, dim, layout, cache), _Rotate.apply(weight, dim, layout, cache), layout.product_scale


def _initial_seed(policy: QuantPolicy, name: str) -> int:
    if policy.seed is not None:
        return derive_seed(policy.seed, name)
    # Without a policy seed, follow torch's global RNG so torch.manual_seed reproduces runs.
    return int(torch.randint(0, 2**62, (1,)).item())


class _QuantMixin:
    """Policy handling shared by the quantized layers."""

    _rt: LayerRuntime

    def _init_quant(self, policy: QuantPolicy, name: str) -> None:
        if not isinstance(policy, QuantPolicy):
            raise ValueError(f"policy must be a QuantPolicy, got {type(policy).__name__}")
        self._rt = LayerRuntime(policy, name, _initial_seed(policy, name))

    @property
    def policy(self) -> QuantPolicy:
        return self._rt.policy

    @property
    def layer_name(self) -> str:
        return self._rt.name

    def set_policy(self, policy: QuantPolicy) -> None:
        if not isinstance(policy, QuantPolicy):
            raise ValueError(f"policy must be a QuantPolicy, got {type(policy).__name__}")
        self._rt.policy = policy

    def reseed(self, seed: int) -> None:
        self._rt.reseed(seed)

    def get_extra_state(self) -> dict:
        return {
            "policy": self._rt.policy.to_dict(),
            "seed": self._rt.seed,
            "generator_states": self._rt.generator_states(),
            "scaling_states": self._rt.scaling_states(),
        }

    def set_extra_state(self, state: dict) -> None:
        self._rt.policy = QuantPolicy.from_dict(state["policy"])
        self._rt.seed = int(state["seed"])
        self._rt.restore_generator_states(state.get("generator_states", {}))
        self._rt.restore_scaling_states(state.get("scaling_states", {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        policy = self._rt.policy
        if policy.is_float:
            return self._float_forward(x)
        if not (autocast_on(x.device.type) or needs_float32(x, self.weight)):
            return self._quantized_forward(x, self.weight, self.bias)
        # precision.py: under autocast, or in a float16/bfloat16 model, the quantized
        # product runs as float32 (half sums of codes round and overflow); the casts are
        # differentiable, so the half parameters get their gradients in their own dtype.
        with autocast_off(x.device.type):
            bias = None if self.bias is None else self.bias.float()
            y = self._quantized_forward(x.float(), self.weight.float(), bias)
        return y if autocast_on(x.device.type) else y.to(x.dtype)

    def extra_repr(self) -> str:  # shown by print(model)
        return f"{super().extra_repr()}, policy={self._rt.policy.name!r}"


class QuantLinear(_QuantMixin, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, policy: QuantPolicy,
                 name: str = "", device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(policy, name)

    @classmethod
    def from_float(cls, linear: nn.Linear, policy: QuantPolicy, name: str = "") -> "QuantLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight  # shared Parameter: optimizers keep working
        layer.bias = linear.bias
        layer._init_quant(policy, name)
        layer.train(linear.training)
        return layer

    def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _quantized_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        if self._rt.policy.is_binary:  # HadaNets: its own product and float backward (binary.py)
            y = binary_linear(x.reshape(-1, x.shape[-1]), weight, self._rt).reshape(*lead, self.out_features)
            return y if bias is None else y + bias
        x2, weight, factor = _forward_rotation(self._rt, x.reshape(-1, x.shape[-1]), weight, 1)
        y = QuantLinearFunction.apply(x2, weight, self._rt)
        if factor is not None and factor != 1.0:
            y = y * factor
        y = y.reshape(*lead, self.out_features)
        return y if bias is None else y + bias  # the bias stays in float


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, policy: QuantPolicy, name: str = "",
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        self._check_supported()
        self._init_quant(policy, name)

    @staticmethod
    def unsupported_reason(conv: nn.Conv2d) -> str | None:
        """Why ``conv`` has no quantized version, or None when QuantConv2d computes it."""
        if conv.groups != 1:
            return f"a grouped convolution (groups={conv.groups}); QuantConv2d supports groups=1 only"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r}; QuantConv2d supports padding_mode='zeros' only"
        if conv.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
            return "padding='same' with an odd total padding; QuantConv2d needs explicit padding here"
        return None

    def _check_supported(self) -> None:
        why = self.unsupported_reason(self)
        if why is not None:
            raise ValueError(f"QuantConv2d: {why}")
        self._explicit_pad = _explicit_padding(self)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, policy: QuantPolicy, name: str = "") -> "QuantConv2d":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(layer, attr, getattr(conv, attr))
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._check_supported()
        layer._init_quant(policy, name)
        layer.train(conv.training)
        return layer

    def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self._explicit_pad, self.dilation)

    def _quantized_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._rt.policy.is_binary:  # HadaNets: its own product and float backward (binary.py)
            y = binary_conv2d(x, weight, self._rt, self.stride, self._explicit_pad, self.dilation)
            return y if bias is None else y + bias.view(1, -1, 1, 1)
        # the input channels are part of the reduction (C_in x kh x kw): rotating them in
        # both operands leaves every position's sum unchanged
        x, weight, factor = _forward_rotation(self._rt, x, weight, 1)
        y = QuantConv2dFunction.apply(x, weight, self._rt, tuple(self.stride), self._explicit_pad,
                                      tuple(self.dilation))
        if factor is not None and factor != 1.0:
            y = y * factor
        return y if bias is None else y + bias.view(1, -1, 1, 1)
