"""quantize_model: swap nn.Linear / nn.Conv2d for their quantized versions in place.

What is converted, kept or refused is decided first, as a ``QuantizationPlan`` the
user can print (``plan_quantization``), then applied. A module whose matrix
multiplications hdqt cannot run is refused with a named error rather than left
silently in float: a quantized model either trains every product under its policy
or says which layers it does not. A policy with ``float_first_last`` (HadaNets) keeps
the model's first and last layers float32 (action "float"; ``boundary.py``).

With ``pack_activations=True`` (the default) every plain ``nn.ReLU`` and
``nn.BatchNorm2d`` under a quantized policy is swapped for ``PackedMaskReLU`` (keeps a
1-bit mask for its backward instead of its float output) and ``CompactBatchNorm2d``
(keeps a quantized convolution's output as its int16 integer sums instead of float32):
both compute the same values and gradients bit for bit. FQT is about the memory of
training, and the swap changes no number. It is an argument
of the conversion rather than a policy field because it says how a model keeps its
activations, not how a product is quantized (a policy's JSON, name and checkpoints
stay as they were). Functional ``F.relu``/``torch.relu`` calls inside a ``forward``
cannot be swapped; hdqt's own models use ``nn.ReLU`` modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch.nn as nn

from hdqt.quantization.boundary import boundary_layers
from hdqt.quantization.compact_bn import CompactBatchNorm2d
from hdqt.quantization.layers import QuantConv2d, QuantLinear
from hdqt.quantization.mask_relu import PackedMaskReLU
from hdqt.quantization.policy import QuantPolicy
from hdqt.quantization.runtime import derive_seed

QUANT_LAYERS = (QuantLinear, QuantConv2d)

# pack_activations: float module (exactly this type) -> its version that keeps less for the backward
PACKED_ACTIVATIONS = {nn.ReLU: PackedMaskReLU, nn.BatchNorm2d: CompactBatchNorm2d}

# Layers with matrix products that hdqt has no quantized version of. Each would
# otherwise stay float without a word.
_UNSUPPORTED = (
    (nn.MultiheadAttention, "computes its projections with F.multi_head_attention_forward, which reads "
                            "in_proj_weight and out_proj.weight directly and never calls out_proj's forward"),
    (nn.Bilinear, "a bilinear product (no quantized version)"),
    (nn.RNNBase, "recurrent cells multiply their weights inside a fused kernel (no quantized version)"),
    (nn.modules.conv._ConvTransposeNd, "a transposed convolution (no quantized version)"),
    (nn.Conv1d, "a 1-d convolution (no quantized version; only nn.Conv2d is supported)"),
    (nn.Conv3d, "a 3-d convolution (no quantized version; only nn.Conv2d is supported)"),
)


class UnsupportedLayerError(ValueError):
    """quantize_model met layers it cannot quantize; the message lists each with why."""


@dataclass(frozen=True)
class LayerDecision:
    """What quantize_model does with one module."""

    name: str  # module path in the model ("" for the model itself)
    kind: str  # the module's class name
    action: str  # "convert", "keep" (already quantized), "exclude" (asked), "float" (first/last) or "refuse"
    policy: str | None = None  # the name of the policy it gets (convert, keep)
    reason: str = ""
    chosen: QuantPolicy | None = field(default=None, repr=False, compare=False)  # the policy itself (convert)


@dataclass(frozen=True)
class QuantizationPlan:
    """The decisions of quantize_model for every module that holds a matrix product."""

    decisions: tuple[LayerDecision, ...]
    # the activations swapped for their memory-saving versions (action "swap"; pack_activations)
    swaps: tuple[LayerDecision, ...] = ()

    def by_action(self, action: str) -> list[LayerDecision]:
        return [d for d in self.decisions if d.action == action]

    @property
    def refused(self) -> list[LayerDecision]:
        return self.by_action("refuse")

    def __str__(self) -> str:
        if not self.decisions:
            return "quantize_model: no nn.Linear or nn.Conv2d layer found"
        rows = [("layer", "type", "action", "policy / reason")]
        rows += [(d.name or "(model)", d.kind, d.action, d.reason or d.policy or "") for d in self.decisions]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        counts = ", ".join(f"{len(self.by_action(a))} {a}" for a in ("convert", "keep", "exclude", "float", "refuse")
                           if self.by_action(a))
        return "\n".join([*lines, f"({counts})", *self._swap_lines()])

    def _swap_lines(self) -> list[str]:
        if not self.swaps:
            return []
        lines = []
        for kind, packed in ((k.__name__, v.__name__) for k, v in PACKED_ACTIVATIONS.items()):
            names = [d.name or "(model)" for d in self.swaps if d.kind == kind]
            if names:
                lines.append(f"{len(names)} nn.{kind} swapped for {packed} (keeps less for the backward): "
                             f"{', '.join(names)}")
        return lines


def _policy_for(name: str, policy: QuantPolicy, layer_policies: Mapping[str, QuantPolicy]) -> QuantPolicy:
    # The longest matching module-name prefix wins, so "head" can override "".
    best, best_len = policy, -1
    for prefix, p in layer_policies.items():
        if _under(name, prefix) and len(prefix) > best_len:
            best, best_len = p, len(prefix)
    return best


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _check_arguments(policy, layer_policies, exclude) -> tuple[dict, tuple[str, ...]]:
    if not isinstance(policy, QuantPolicy):
        raise ValueError(f"policy must be a QuantPolicy (see hdqt.recipe), got {type(policy).__name__}")
    layer_policies = dict(layer_policies or {})
    for prefix, p in layer_policies.items():
        if not isinstance(p, QuantPolicy):
            raise ValueError(f"layer_policies[{prefix!r}] must be a QuantPolicy, got {type(p).__name__}")
    if isinstance(exclude, str):
        raise ValueError(f"exclude must be a list of module names, got the string {exclude!r}")
    exclude = tuple(exclude)
    for prefix in exclude:
        if not isinstance(prefix, str):
            raise ValueError(f"exclude must hold module names (str), got {prefix!r}")
    return layer_policies, exclude


def _decide(module: nn.Module, name: str, policy: QuantPolicy, layer_policies, exclude) -> LayerDecision | None:
    """The decision for one module, or None when it holds no product of its own."""
    kind = type(module).__name__
    if isinstance(module, QUANT_LAYERS):
        return LayerDecision(name, kind, "keep", module.policy.name)
    unsupported = next((why for base, why in _UNSUPPORTED if isinstance(module, base)), None)
    linear_or_conv = isinstance(module, (nn.Linear, nn.Conv2d))
    if unsupported is None and not linear_or_conv:
        return None
    if any(_under(name, prefix) for prefix in exclude):
        return LayerDecision(name, kind, "exclude", reason="excluded: stays float")
    if unsupported is not None:
        return LayerDecision(name, kind, "refuse", reason=unsupported)
    why = _unsafe_subclass(module)
    if why is None and isinstance(module, nn.Conv2d):
        why = QuantConv2d.unsupported_reason(module)
    if why is not None:
        return LayerDecision(name, kind, "refuse", reason=why)
    chosen = _policy_for(name, policy, layer_policies)
    note = "" if type(module) in (nn.Linear, nn.Conv2d) else f"{chosen.name} (a {kind} without its own forward)"
    return LayerDecision(name, kind, "convert", chosen.name, note, chosen)


def _unsafe_subclass(module: nn.Module) -> str | None:
    """Why a subclass of nn.Linear / nn.Conv2d cannot be swapped for a quantized layer, or None.

    A subclass that keeps the float layer's forward and holds nothing beyond its weight
    and bias computes what the float layer does (attention's out_proj is one), so the
    quantized layer computes it too. One that overrides forward may compute anything.
    """
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if type(module) is base:
        return None
    overridden = [m for m in ("forward", "_conv_forward") if getattr(type(module), m, None) is not getattr(base, m, None)]
    if overridden:
        return f"a subclass of nn.{base.__name__} that overrides {overridden[0]}(): hdqt cannot know what it computes"
    extra = [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
    extra += [n for n, _ in module.named_buffers(recurse=False)] + [n for n, _ in module.named_children()]
    if extra:
        return f"a subclass of nn.{base.__name__} with parameters, buffers or modules of its own ({', '.join(extra)})"
    return None


def plan_quantization(
    model: nn.Module,
    policy: QuantPolicy,
    *,
    layer_policies: Mapping[str, QuantPolicy] | None = None,
    exclude: Iterable[str] = (),
    pack_activations: bool = True,
) -> QuantizationPlan:
    """What ``quantize_model`` would do with each module of ``model``, without changing it.

    ``print(plan_quantization(model, policy))`` shows one row per layer: converted
    (and under which policy), kept (already quantized), excluded, or refused and why,
    then the activations it swaps (``pack_activations``).
    """
    layer_policies, exclude = _check_arguments(policy, layer_policies, exclude)
    if not isinstance(pack_activations, bool):
        raise ValueError(f"pack_activations must be True or False, got {pack_activations!r}")
    decisions, swaps = [], []

    def visit(module: nn.Module, name: str) -> None:
        packed = PACKED_ACTIVATIONS.get(type(module)) if pack_activations else None
        if packed is not None:
            if not any(_under(name, prefix) for prefix in exclude) and \
                    not _policy_for(name, policy, layer_policies).is_float:
                swaps.append(LayerDecision(name, type(module).__name__, "swap", packed.__name__))
            return
        decision = _decide(module, name, policy, layer_policies, exclude)
        if decision is not None:  # decided as a whole: its children are its own business
            decisions.append(decision)
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return QuantizationPlan(_float_boundary(model, tuple(decisions)), tuple(swaps))


def _float_boundary(model: nn.Module, decisions: tuple[LayerDecision, ...]) -> tuple[LayerDecision, ...]:
    """Conversions whose policy keeps the first and last layers float32 become "float" there."""
    if not any(d.action == "convert" and d.chosen.float_first_last for d in decisions):
        return decisions
    first, last, how = boundary_layers(model)
    out = []
    for d in decisions:
        if d.action == "convert" and d.chosen.float_first_last and (d.name in first or d.name in last):
            which = " and ".join(w for w, names in (("first", first), ("last", last)) if d.name in names)
            d = LayerDecision(d.name, d.kind, "float", reason=f"the {which} layer ({how}): stays float32 "
                                                              f"under {d.chosen.name} (float_first_last)")
        out.append(d)
    return tuple(out)


def quantize_model(
    model: nn.Module,
    policy: QuantPolicy,
    *,
    layer_policies: Mapping[str, QuantPolicy] | None = None,
    exclude: Iterable[str] = (),
    verbose: bool = False,
    pack_activations: bool = True,
) -> nn.Module:
    """Convert every nn.Linear and nn.Conv2d in ``model`` (in place) and return it.

    Subclasses that keep the float layer's forward (attention's ``out_proj``, say) are
    converted too. Modules whose products hdqt cannot run (``nn.MultiheadAttention``,
    recurrent layers, transposed, 1-d and 3-d or grouped convolutions, subclasses that
    override ``forward``) raise ``UnsupportedLayerError``, naming each; list them in
    ``exclude`` (module-name prefixes) to keep them float on purpose.

    Idempotent: layers that are already quantized keep their policy and state, so a
    learner can call it again after growing a head or adding a branch. A bare
    nn.Linear / nn.Conv2d passed as ``model`` is returned converted.
    ``layer_policies`` maps module-name prefixes to policies that override ``policy``
    for those layers (for example a higher-precision classifier). ``verbose=True``
    prints the plan (see ``plan_quantization``).

    ``pack_activations=True`` also swaps every plain ``nn.ReLU`` and ``nn.BatchNorm2d``
    (not excluded, under a policy that quantizes) for ``PackedMaskReLU`` and
    ``CompactBatchNorm2d``: the same values and gradients, with less kept for the
    backward (a 1-bit mask; int16 sums of a quantized convolution; module docstring).
    """
    plan = plan_quantization(model, policy, layer_policies=layer_policies, exclude=exclude,
                             pack_activations=pack_activations)
    if plan.refused:
        rows = "\n".join(f"  {d.name or '(model)'} ({d.kind}): {d.reason}" for d in plan.refused)
        raise UnsupportedLayerError(
            f"quantize_model cannot quantize {len(plan.refused)} layer(s):\n{rows}\n"
            f"Pass exclude={[d.name for d in plan.refused]!r} to keep them float on purpose."
        )
    if verbose:
        print(plan)
    for decision in plan.swaps:
        if decision.name == "":
            return PACKED_ACTIVATIONS[type(model)].from_float(model)
        parent_name, _, child_name = decision.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, child_name)
        setattr(parent, child_name, PACKED_ACTIVATIONS[type(child)].from_float(child))
    for decision in plan.by_action("convert"):
        if decision.name == "":
            return _converted(model, decision.chosen, "")
        parent_name, _, child_name = decision.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, _converted(getattr(parent, child_name), decision.chosen, decision.name))
    return model


def _converted(module: nn.Module, policy: QuantPolicy, name: str) -> nn.Module:
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(module, policy, name)
    return QuantConv2d.from_float(module, policy, name)


def quant_layers(model: nn.Module):
    """(name, layer) for every quantized layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


def reseed_quantizers(model: nn.Module, seed: int) -> None:
    """Reseed the stochastic-rounding generators of every quantized layer.

    Each layer's seed derives from ``seed`` and the layer's name, so adding a layer
    does not change the streams of the others.
    """
    for name, layer in quant_layers(model):
        layer.reseed(derive_seed(seed, name))


def policy_from_state_dict(state_dict: Mapping) -> QuantPolicy | None:
    """The policy saved with a quantized model's state_dict (the first layer's), if any."""
    for key, value in state_dict.items():
        if key.endswith("_extra_state") and isinstance(value, dict) and "policy" in value:
            return QuantPolicy.from_dict(value["policy"])
    return None
