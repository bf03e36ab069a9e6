"""Named recipes: ``recipe("hdqt", bits=4, acc_bits=8, tile=32)`` -> QuantPolicy.

A recipe is a function of a few knobs that returns a policy; overrides given by
name replace fields of the result, so any policy field can be set from a recipe.

* ``fp32``: nothing quantized.
* ``hdqt`` / ``int``: integer FQT with / without the backward Hadamard transform.
* ``luq`` (Chmiel et al. 2021): forward weights and inputs on a ``bits``-bit integer
  grid with SAWB clipping, rounded to nearest; the output gradient of both backward
  products in a ``bits``-bit log format, max-scaled, with LUQ's stochastic
  underflow and unbiased log rounding; the backward products take the forward's
  quantized weights and inputs as they are (as the official code's autograd does).
* ``fp134`` (Sun et al. 2020, as the paper's official code runs it): every operand
  in the 1-3-4 float format with a tracked per-tensor exponent bias
  (``ExponentBiasScaling``); forward operands round to nearest, the output
  gradients stochastically.
* ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1``: generic float FQT in that format,
  max-scaled per tensor; forward round to nearest, gradients stochastic.

* ``hadanet`` (Akhauri 2019, HadaNets): both forward operands binarized, sign(x) times
  beta = mean |x| over groups of ``group`` consecutive values along the reduction
  (None, the default: one group per row, XNOR-Net), one beta per row of the weight
  and of the (im2col) input and group; float gradients through a straight-through
  estimator clipped to |x| <= 1 and through beta (``binary.py``). The first and the
  last layer stay float32 (``float_first_last``; override it with False to binarize
  them too). ``acc_bits`` must be None: the binary products are exact popcounts.

``acc_bits`` of a float recipe is a float accumulator (``accumulate.py``: 16 = IEEE
half, 12 = e5m6, 8 = e5m2), into which each tile's partial sum is added and rounded.
Defaults: ``fp134`` 8 bits, the setting of the paper's comparison (every method at
8-bit accumulators); the FP8/FP4 recipes 16 bits, the FP16 chunk accumulation of the
FP8 training papers (Wang et al. 2018, Sun et al. 2019). ``acc_bits=None`` sums in
float32. ``bits`` of a float recipe is its format's width (8 or 4); giving another is
an error.
"""
from __future__ import annotations

import inspect
from dataclasses import fields, replace
from typing import Callable

from hdqt.quantization.formats import (
    FP4_E2M1, FP8_E4M3, FP8_E5M2, FP134, BinaryFormat, FloatFormat, IntFormat, LogFormat, check_bits,
)
from hdqt.quantization.policy import QuantPolicy
from hdqt.quantization.quantizer import Quantizer, int_quantizer
from hdqt.quantization.scaling import (
    DynamicScaling, ExponentBiasScaling, GroupMeanScaling, SAWBScaling, sawb_coefficients,
)

FORWARD_CLIP_RATIO = 0.975  # the paper's forward clip: c = 0.975 * max|t|


def _fp32() -> QuantPolicy:
    return QuantPolicy(name="fp32")


def _integer_fqt(bits: int, acc_bits: int | None, tile: int | None, hadamard: bool, name: str, clip_ratio: float) -> QuantPolicy:
    check_bits(bits)
    return QuantPolicy(
        # Forward: round to nearest with a clipped per-tensor scale. Inputs take the
        # unsigned range when they have no negatives (after ReLU); weights are signed.
        forward_input=int_quantizer(bits, signed="auto", clip_ratio=clip_ratio),
        forward_weight=int_quantizer(bits, signed="signed", clip_ratio=clip_ratio),
        # Backward: the weight operand of dX is rounded to nearest; gradients and the
        # input operand of dW use stochastic rounding, where bias would accumulate.
        backward_weight=int_quantizer(bits, rounding="nearest"),
        backward_input=int_quantizer(bits, rounding="stochastic"),
        grad_output_dx=int_quantizer(bits, rounding="stochastic"),
        grad_output_dw=int_quantizer(bits, rounding="stochastic"),
        acc_bits=acc_bits,
        tile=tile,
        hadamard=hadamard,
        name=name,
    )


def _hdqt(bits: int = 4, acc_bits: int | None = 8, tile: int | None = 32, clip_ratio: float = FORWARD_CLIP_RATIO) -> QuantPolicy:
    return _integer_fqt(bits, acc_bits, tile, True, "hdqt", clip_ratio)


def _int(bits: int = 4, acc_bits: int | None = 8, tile: int | None = 32, clip_ratio: float = FORWARD_CLIP_RATIO) -> QuantPolicy:
    return _integer_fqt(bits, acc_bits, tile, False, "int", clip_ratio)


def _luq(bits: int = 4, acc_bits: int | None = 8, tile: int | None = 32) -> QuantPolicy:
    check_bits(bits)
    sawb = SAWBScaling(*sawb_coefficients(bits))
    grad = Quantizer(LogFormat(bits), DynamicScaling(), "stochastic")
    return QuantPolicy(
        forward_input=Quantizer(IntFormat(bits, "auto"), sawb, "nearest"),
        forward_weight=Quantizer(IntFormat(bits, "signed"), sawb, "nearest"),
        grad_output_dx=grad,
        grad_output_dw=grad,
        acc_bits=acc_bits,
        tile=tile,
        name="luq",
    )


def _float_fqt(fmt: FloatFormat, name: str, bits: int | None, acc_bits: int | None, tile: int | None,
               scaling) -> QuantPolicy:
    if bits is not None and bits != fmt.bits:
        check_bits(bits)
        raise ValueError(f"the {name} recipe's format has {fmt.bits} bits; bits={bits} does not apply to it")
    return QuantPolicy(
        forward_input=Quantizer(fmt, scaling, "nearest"),
        forward_weight=Quantizer(fmt, scaling, "nearest"),
        grad_output_dx=Quantizer(fmt, scaling, "stochastic"),
        grad_output_dw=Quantizer(fmt, scaling, "stochastic"),
        acc_bits=acc_bits,
        tile=tile,
        name=name,
    )


def _float_recipe(fmt: FloatFormat, name: str, scaling=DynamicScaling(), acc_default: int | None = 16
                  ) -> Callable[..., QuantPolicy]:
    def build(bits: int | None = None, acc_bits: int | None = acc_default, tile: int | None = 32) -> QuantPolicy:
        return _float_fqt(fmt, name, bits, acc_bits, tile, scaling)
    build.__name__ = f"_{name}"
    return build


def _hadanet(group: int | None = None, acc_bits: int | None = None) -> QuantPolicy:
    if acc_bits is not None:
        raise ValueError(f"the hadanet recipe's products are exact binary dot products (popcounts): acc_bits must be "
                         f"None (unlimited), got {acc_bits!r}")
    binary = Quantizer(BinaryFormat(), GroupMeanScaling(group), "nearest")
    return QuantPolicy(forward_input=binary, forward_weight=binary, float_first_last=True, name="hadanet")


_RECIPES: dict[str, Callable[..., QuantPolicy]] = {
    "fp32": _fp32, "hdqt": _hdqt, "int": _int, "luq": _luq,
    "fp134": _float_recipe(FP134, "fp134", ExponentBiasScaling(), acc_default=8),
    "fp8_e4m3": _float_recipe(FP8_E4M3, "fp8_e4m3"),
    "fp8_e5m2": _float_recipe(FP8_E5M2, "fp8_e5m2"),
    "fp4_e2m1": _float_recipe(FP4_E2M1, "fp4_e2m1"),
    "hadanet": _hadanet,
}
_KNOBS = ("bits", "acc_bits", "tile", "clip_ratio", "group")


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


# The backward operands that have a sample dimension (weights have none): what
# ``backward_scales="sample"`` gives one scale per sample.
_SAMPLE_OPERANDS = ("grad_output_dx", "grad_output_dw", "backward_input")
BACKWARD_SCALES = ("tensor", "sample")


def check_backward_scales(value: str) -> None:
    if value not in BACKWARD_SCALES:
        raise ValueError(f"backward_scales must be one of {', '.join(BACKWARD_SCALES)}, got {value!r}")


def backward_scales_of(policy: QuantPolicy) -> str:
    """"sample" when a backward gradient or input operand of ``policy`` is scaled per sample, else "tensor"."""
    operands = (getattr(policy, op) for op in _SAMPLE_OPERANDS)
    return "sample" if any(q is not None and q.granularity == "sample" for q in operands) else "tensor"


WEIGHT_SCALES = ("tensor", "channel")


def check_weight_scales(value: str) -> None:
    if value not in WEIGHT_SCALES:
        raise ValueError(f"weight_scales must be one of {', '.join(WEIGHT_SCALES)}, got {value!r}")


def weight_scales_of(policy: QuantPolicy) -> str:
    """"channel" when ``policy``'s forward weight has a scale per output feature, else "tensor"."""
    q = policy.forward_weight
    return "channel" if q is not None and q.granularity == "channel" else "tensor"


def recipe(name: str, /, backward_scales: str = "tensor", weight_scales: str = "tensor",
           **overrides) -> QuantPolicy:
    """Build the named policy. Overrides: bits, acc_bits, tile, clip_ratio, group, or any QuantPolicy field.

    ``backward_scales="sample"`` gives the backward's gradient and input operands one
    scale per sample instead of one per tensor (the official code's conv backward); the
    policy is then renamed, e.g. ``hdqt[backward_scales='sample']``.
    ``weight_scales="channel"`` gives the forward weight one scale per output feature
    (a linear layer's rows, a conv's output channels) instead of one per tensor, so that
    one large row no longer rounds the small rows to zero; renamed likewise (hadanet,
    whose binarized weights have a beta per row or finer, is returned as it is).

    An override that changes what the recipe computes renames the policy after it
    (``recipe("hdqt", hadamard=False).name == "hdqt[hadamard=False]"``) unless ``name``
    is given; the knobs, ``seed`` and ``nonfinite`` keep the recipe's name."""
    if name not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(list_recipes())}")
    valid_fields = {f.name for f in fields(QuantPolicy)}
    unknown = set(overrides) - valid_fields - set(_KNOBS)
    if unknown:
        raise ValueError(
            f"unknown recipe override(s) {sorted(unknown)}; valid: {sorted(set(_KNOBS) | valid_fields)}"
        )
    knobs = {k: overrides.pop(k) for k in _KNOBS if k in overrides}
    if name != "fp32":
        takes = inspect.signature(_RECIPES[name]).parameters
        foreign = sorted(k for k in knobs if k not in takes)
        if foreign:
            raise ValueError(f"the {name} recipe takes no {', '.join(foreign)}; its knobs: {', '.join(takes)}")
    if name == "fp32":
        # fp32 quantizes nothing: the knobs are still validated (so a typo is caught
        # in a --compare run) but do not apply.
        if knobs.get("bits") is not None:
            check_bits(knobs["bits"])
        policy = _fp32()
    elif not overrides:
        policy = _RECIPES[name](**knobs)
    else:
        # The overrides apply to the recipe's policy as a whole: built first without its
        # accumulator, so that a check of the accumulator against the operands (which
        # the overrides may change) sees the final policy only.
        build = _RECIPES[name]
        acc_bits = knobs.pop("acc_bits", inspect.signature(build).parameters["acc_bits"].default)
        policy = build(**knobs, acc_bits=None)
        if "name" not in overrides:
            overrides["name"] = _overridden_name(policy, overrides)
        overrides.setdefault("acc_bits", acc_bits)
    policy = replace(policy, **overrides) if overrides else policy
    return _with_weight_scales(_with_backward_scales(policy, backward_scales), weight_scales)


def _with_weight_scales(policy: QuantPolicy, weight_scales: str) -> QuantPolicy:
    """``policy`` with its forward weight scaled per ``weight_scales``."""
    check_weight_scales(weight_scales)
    q = policy.forward_weight
    if weight_scales == "tensor" or q is None:  # fp32: nothing to scale
        return policy
    if policy.is_binary:
        # hadanet's weight magnitudes are betas per row, or per group along a row: at least
        # one per output feature already, so the policy is what was asked for, unchanged
        # (a CTMQ chain to a binary target then scales its wider integer steps per channel)
        return policy
    if q.scaling.kind == "exponent_bias":
        raise ValueError(f"weight_scales='channel' does not apply to {policy.name}: its forward weight's "
                         "exponent bias is tracked per tensor")
    return replace(policy, forward_weight=replace(q, granularity="channel"),
                   name=f"{policy.name}[weight_scales='channel']")


def _with_backward_scales(policy: QuantPolicy, backward_scales: str) -> QuantPolicy:
    """``policy`` with its backward gradient and input operands scaled per ``backward_scales``."""
    check_backward_scales(backward_scales)
    if backward_scales == "tensor":
        return policy
    changed = {op: replace(q, granularity="sample") for op in _SAMPLE_OPERANDS
               if (q := getattr(policy, op)) is not None and q.granularity != "sample"}
    if not changed:  # fp32, or nothing quantized in the backward: nothing to scale
        return policy
    # QuantPolicy's own checks refuse what per-sample scales cannot do (a limited backward accumulator)
    return replace(policy, **changed, name=f"{policy.name}[backward_scales='sample']")


# Fields that say how a run is checked and seeded, not what it computes: overriding
# them keeps the recipe's name.
_NAME_KEEPING = ("seed", "nonfinite", "name")


def _overridden_name(policy: QuantPolicy, overrides: dict) -> str:
    """The recipe's name, with the fields that change what it computes, e.g.
    ``hdqt[hadamard=False]``: a policy that is no longer the recipe must not be named as it."""
    changed = sorted(k for k, v in overrides.items() if k not in _NAME_KEEPING and getattr(policy, k) != v)
    if not changed:
        return policy.name
    shown = [k if hasattr(overrides[k], "to_dict") else f"{k}={overrides[k]!r}" for k in changed]
    return f"{policy.name}[{', '.join(shown)}]"
