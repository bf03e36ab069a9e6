"""quantize_model: swap nn.Linear / nn.Conv2d for their quantized versions in place."""
from __future__ import annotations

from typing import Mapping

import torch.nn as nn

from hdqt.quantization.layers import QuantConv2d, QuantLinear
from hdqt.quantization.policy import QuantPolicy
from hdqt.quantization.runtime import derive_seed

QUANT_LAYERS = (QuantLinear, QuantConv2d)


def _policy_for(name: str, policy: QuantPolicy, layer_policies: Mapping[str, QuantPolicy]) -> QuantPolicy:
    # The longest matching module-name prefix wins, so "head" can override "".
    best, best_len = policy, -1
    for prefix, p in layer_policies.items():
        if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) > best_len:
            best, best_len = p, len(prefix)
    return best


def quantize_model(
    model: nn.Module,
    policy: QuantPolicy,
    *,
    layer_policies: Mapping[str, QuantPolicy] | None = None,
) -> nn.Module:
    """Convert every float nn.Linear and nn.Conv2d in ``model`` (in place) and return it.

    Idempotent: layers that are already quantized keep their policy and state, so a
    learner can call it again after growing a head or adding a branch. A bare
    nn.Linear / nn.Conv2d passed as ``model`` is returned converted.
    ``layer_policies`` maps module-name prefixes to policies that override ``policy``
    for those layers (for example a higher-precision classifier).
    """
    if not isinstance(policy, QuantPolicy):
        raise ValueError(f"policy must be a QuantPolicy (see hdqt.recipe), got {type(policy).__name__}")
    layer_policies = dict(layer_policies or {})
    for prefix, p in layer_policies.items():
        if not isinstance(p, QuantPolicy):
            raise ValueError(f"layer_policies[{prefix!r}] must be a QuantPolicy, got {type(p).__name__}")
    root = _convert(model, "", policy, layer_policies)
    if root is not None:
        return root
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            converted = _convert(child, full, policy, layer_policies)
            if converted is not None:
                setattr(module, child_name, converted)
    return model


def _convert(module: nn.Module, name: str, policy: QuantPolicy, layer_policies) -> nn.Module | None:
    if isinstance(module, QUANT_LAYERS):
        return None
    chosen = _policy_for(name, policy, layer_policies)
    if type(module) is nn.Linear:
        return QuantLinear.from_float(module, chosen, name)
    if type(module) is nn.Conv2d:
        return QuantConv2d.from_float(module, chosen, name)
    return None


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
