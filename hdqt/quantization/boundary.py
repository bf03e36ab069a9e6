"""The first and the last layers of a model: those a policy with ``float_first_last``
keeps in float32 (HadaNets and XNOR-Net leave them unbinarized: the first sees the raw
input, whose few channels a binarization would wipe out, and the last gives the logits).

A layer (nn.Linear or nn.Conv2d, quantized or not) is *first* when its input comes
from a model input through no other such layer, and *last* when the model's output
comes from it through no other such layer. Which layers those are is read from the
model's data flow, traced symbolically with torch.fx (layers and modules without
children are leaves): every branch
of a network that reads the input has a first layer (DER's extractors), a residual
network's classifier is last. Layers that ``forward`` does not call (an auxiliary head
used only by a training loss) are neither. A model that fx cannot trace (data-dependent
control flow) falls back to module order: the first and the last such layer there.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn


class _LayerTracer(fx.Tracer):
    """Layers and every module without children are leaves: a leaf cannot hold a layer,
    and its forward (a packed ReLU, a bias correction) may branch on its input's flags."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Linear, nn.Conv2d)) or next(module.children(), None) is None


def _is_layer(model: nn.Module, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(model.get_submodule(node.target), (nn.Linear, nn.Conv2d))


def boundary_layers(model: nn.Module) -> tuple[set[str], set[str], str]:
    """(first layer names, last layer names, how they were found: "data flow" or "module order")."""
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        return {""}, {""}, "data flow"
    try:
        graph = _LayerTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to module order
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        return set(names[:1]), set(names[-1:]), "module order"
    first, last = set(), set()
    reaches_input: dict[fx.Node, bool] = {}  # through no layer
    for node in graph.nodes:  # topological order
        if node.op == "placeholder":
            reaches_input[node] = True
            continue
        fed = any(reaches_input.get(arg, False) for arg in node.all_input_nodes)
        if _is_layer(model, node):
            if fed:
                first.add(node.target)
            reaches_input[node] = False
        else:
            reaches_input[node] = fed
    reaches_output: dict[fx.Node, bool] = {}
    for node in reversed(graph.nodes):
        feeds = node.op == "output" or any(reaches_output.get(user, False) for user in node.users)
        if _is_layer(model, node):
            if feeds:
                last.add(node.target)
            reaches_output[node] = False
        else:
            reaches_output[node] = feeds
    return first, last, "data flow"


def float_boundary(model: nn.Module) -> set[str]:
    """The names of the first and last layers (module docstring)."""
    first, last, _ = boundary_layers(model)
    return first | last
