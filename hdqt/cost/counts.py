"""Operation and memory counts of one training step, per layer, under a policy.

For every nn.Linear / nn.Conv2d (quantized or not) with reduction length K (conv:
C_in*kh*kw), N outputs and P positions per sample (conv: OH*OW; linear: 1, or the
flattened leading dimensions), a step of batch B runs three products:

* forward  Y  = X W^T:  B*P*N*K multiply-accumulates (MACs)
* dX       = G W:       B*P*K*N MACs (conv: counted as its im2col product)
* dW       = G^T X:     N*K*B*P MACs

Each MAC is one multiply at the two operands' widths (int for integer formats, float32
for an operand that stays float) and one add at the accumulator's width. With a
limited accumulator (``acc_bits``; the backward ones only with ``saturate_backward``)
the adds of a tile are at ``acc_bits`` and the adds that combine the tiles' sums,
ceil(K/tile) per output, at 32 bits; an unlimited accumulator adds at 32 bits (int)
or float32. The Hadamard transform of the backward operands (``hadamard``) costs
p*log2(p) float32 adds per block of size p of each transformed vector (``block_layout``
under the policy's rule): G and W along N for dX, G^T and X along the batch for dW (a
conv: along each sample's positions). Quantizing a tensor costs, per element, one
float32 comparison for its maximum (priced as an add), one float32 multiply (the
scale) and one float32 add (the rounding); stochastic rounding adds one 32-bit random
draw (a one-round counter hash, priced as an int32 multiply and add) and a float32 add.

A product of two binarized operands (``hadanet``: signs times per-group magnitudes beta)
is an XNOR and a popcount per MAC, priced as a 1-bit integer multiply and an integer add
as wide as a group's count (ceil(log2(g + 1)) bits for groups of g; one group per row:
g = K), and per output and group two float32 multiplies (the two betas and the count)
and a float32 add. Binarizing a tensor costs per element a comparison (its sign) and an
add (the sum of |x|), both priced as float32 adds, and a float32 multiply per group (the
mean); each group's beta is stored beside the signs at 32 bits.

Bytes moved: every operand read by a product at its stored width (quantized operands
at their bits, float ones at 32), and every product's output written at 32 bits (Y,
dX, dW). BatchNorm, activations, pooling and the optimizer are not counted: they are
the same for every policy.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from hdqt.cost.energy import EnergyTable
from hdqt.quantization.hadamard import block_layout
from hdqt.quantization.matmul import reduction_tile
from hdqt.quantization.policy import QuantPolicy

WIDE = 32  # the accumulator that combines tiles, and an "unlimited" one


@dataclass(frozen=True)
class LayerGeometry:
    """What a layer's products look like per sample."""

    name: str
    kind: str  # "linear" or "conv2d"
    k: int  # reduction length of the forward product
    n: int  # output features / channels
    positions: int  # outputs per sample and feature (conv: OH*OW)
    input_elements: int  # elements of one sample's input to the layer
    needs_input_grad: bool = True  # False for a layer fed the data itself: it has no dX


@dataclass
class LayerCost:
    """The counts of one layer for one training step."""

    name: str
    kind: str
    policy: str
    macs: dict[str, int]
    operations: Counter = field(default_factory=Counter)  # (part, number, op, bits, other_bits) -> count
    bytes: Counter = field(default_factory=Counter)  # "weights" | "activations" | "gradients" -> bytes

    def compute_pj(self, table: EnergyTable) -> float:
        return sum(count * table.operation(number, op, bits, other)
                   for (_, number, op, bits, other), count in self.operations.items())

    def memory_pj(self, table: EnergyTable) -> float:
        return sum(self.bytes.values()) * 8 / 64 * table.memory_access()

    def adds(self) -> int:
        return sum(c for (_, _, op, _, _), c in self.operations.items() if op == "add")

    def to_dict(self, table: EnergyTable) -> dict:
        return {
            "layer": self.name, "kind": self.kind, "policy": self.policy, "macs": dict(self.macs),
            "adds": self.adds(), "bytes": dict(self.bytes),
            "compute_pj": self.compute_pj(table), "memory_pj": self.memory_pj(table),
            "operations": [{"part": p, "number": n, "op": o, "bits": b, "other_bits": ob, "count": c}
                           for (p, n, o, b, ob), c in sorted(self.operations.items())],
        }


def layer_geometries(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerGeometry]:
    """Every nn.Linear / nn.Conv2d of ``model`` with its per-sample sizes, found by one
    forward of two zero samples (in eval mode, without gradients; the model is unchanged)."""
    found: list[LayerGeometry] = []
    names = {module: name for name, module in model.named_modules()}
    parameter = next(model.parameters(), None)  # the samples go where the model is (a GPU's too)
    data = torch.zeros(2, *input_shape, device=None if parameter is None else parameter.device)

    def record(module, inputs, output):
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            k = module.in_channels // module.groups * kh * kw
            positions = output.shape[-1] * output.shape[-2]
            kind = "conv2d"
        else:
            k, positions, kind = module.in_features, x[..., 0].numel() // x.shape[0], "linear"
        found.append(LayerGeometry(names[module], kind, k, output.shape[1] if kind == "conv2d" else
                                   module.out_features, positions, x[0].numel(), x is not data))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(data)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return found


def _operand(quantizer) -> tuple[str, int]:
    """(number kind, bits) of a product operand under ``quantizer`` (None: float32)."""
    if quantizer is None:
        return ("float", 32)
    fmt = quantizer.format
    return (fmt.kind if fmt.kind in ("int", "binary") else "float", fmt.bits)


def _group(quantizer, k: int) -> int:
    """Values per beta of a binarized operand along a reduction of ``k``."""
    return quantizer.scaling.group_size(k)


def _binary_product(ops: Counter, part: str, macs: int, k: int, qa, qb) -> None:
    """XNOR-popcount MACs, then each group's count times the two betas, summed."""
    g = min(_group(qa, k), _group(qb, k))  # the finer grouping sets the groups of the sum
    groups = (macs // k) * math.ceil(k / g)
    ops[(part, "int", "mul", 1, 1)] += macs
    ops[(part, "int", "add", max(1, math.ceil(math.log2(g + 1))), None)] += macs
    ops[(part, "float", "mul", 32, 32)] += 2 * groups
    ops[(part, "float", "add", 32, None)] += groups


def _product(ops: Counter, part: str, macs: int, k: int, qa, qb, acc_bits: int | None, tile: int | None) -> None:
    """The multiplies and adds of a product of ``macs`` MACs with reduction length ``k``."""
    (na, ba), (nb, bb) = _operand(qa), _operand(qb)
    if na == nb == "binary":
        _binary_product(ops, part, macs, k, qa, qb)
        return
    na, nb = ("float" if n == "binary" else n for n in (na, nb))  # one side binarized only
    number = "int" if na == nb == "int" else "float"
    if number == "float":
        ba, bb = 32, 32
    ops[(part, number, "mul", ba, bb)] += macs
    if number == "int" and acc_bits is not None:
        tile = reduction_tile(tile, k)
        outputs = macs // k
        ops[(part, "int", "add", acc_bits, None)] += macs
        ops[(part, "int", "add", WIDE, None)] += outputs * math.ceil(k / min(tile, k))
    else:
        ops[(part, number, "add", WIDE, None)] += macs


def _transform_adds(size: int, vectors: int, rule: str) -> int:
    """float32 adds of the fast Walsh-Hadamard transform of ``vectors`` vectors of ``size``."""
    return vectors * sum(p * int(math.log2(p)) for p in block_layout(size, rule).blocks)


def _quantize(ops: Counter, part: str, quantizer, elements: int, k: int = 1) -> None:
    """Quantizing ``elements`` values in rows of ``k`` (the reduction; it sets a binarized
    operand's groups)."""
    if quantizer is None:
        return
    if _is_binary(quantizer):
        ops[(part, "float", "add", 32, None)] += 2 * elements  # sign, sum of |x|
        ops[(part, "float", "mul", 32, 32)] += _betas(quantizer, elements, k)  # the means
        return
    ops[(part, "float", "add", 32, None)] += 2 * elements  # max search, rounding
    ops[(part, "float", "mul", 32, 32)] += elements  # scale
    if quantizer.rounding == "stochastic":
        ops[(part, "int", "mul", 32, 32)] += elements  # the random draw
        ops[(part, "int", "add", 32, None)] += elements
        ops[(part, "float", "add", 32, None)] += elements


def _bits(quantizer) -> int:
    return 32 if quantizer is None else quantizer.format.bits


def _betas(quantizer, elements: int, k: int) -> int:
    """Betas of a binarized operand of ``elements`` values in rows of ``k``."""
    return (elements // k) * math.ceil(k / _group(quantizer, k))


def _stored_bytes(quantizer, elements: int, k: int) -> float:
    """Bytes of an operand as a product reads it: its codes, and a binarized one's betas."""
    size = elements * _bits(quantizer) / 8
    if _is_binary(quantizer):
        size += _betas(quantizer, elements, k) * 4
    return size


def _is_binary(quantizer) -> bool:
    return quantizer is not None and quantizer.format.kind == "binary"


def layer_cost(geo: LayerGeometry, policy: QuantPolicy, batch: int) -> LayerCost:
    """The counts of one layer for one training step of ``batch`` samples."""
    p = policy
    rows = batch * geo.positions  # output rows of the forward product (the dW reduction)
    macs = rows * geo.n * geo.k
    dx_macs = macs if geo.needs_input_grad else 0
    cost = LayerCost(geo.name, geo.kind, p.name, {"forward": macs, "dx": dx_macs, "dw": macs})
    ops = cost.operations
    back_acc = p.acc_bits if p.saturate_backward else None
    _product(ops, "forward", macs, geo.k, p.forward_input, p.forward_weight, p.acc_bits, p.tile)
    if geo.needs_input_grad:
        _product(ops, "dx", macs, geo.n, p.grad_output_dx, p.backward_weight, back_acc, p.tile)
    _product(ops, "dw", macs, rows, p.grad_output_dw, p.backward_input, back_acc, p.tile)
    if p.hadamard:
        dx_adds = 0
        if geo.needs_input_grad:
            dx_adds = _transform_adds(geo.n, rows, p.hadamard_rule) + _transform_adds(geo.n, geo.k, p.hadamard_rule)
        if geo.kind == "conv2d":  # along each sample's positions, for G's rows and the columns
            dw_adds = _transform_adds(geo.positions, batch * (geo.n + geo.k), p.hadamard_rule)
        else:  # along the batch
            dw_adds = _transform_adds(batch, geo.n + geo.k, p.hadamard_rule)
        ops[("hadamard", "float", "add", 32, None)] += dx_adds + dw_adds
    weights, outputs = geo.n * geo.k, rows * geo.n
    backward_columns = rows * geo.k  # dW's input operand: the (im2col) columns
    # The forward input's binarized rows are the (im2col) columns, rows * k values.
    forward_in = backward_columns if _is_binary(p.forward_input) else batch * geo.input_elements
    _quantize(ops, "quantize", p.forward_input, forward_in, geo.k)
    _quantize(ops, "quantize", p.forward_weight, weights, geo.k)
    if geo.needs_input_grad:
        _quantize(ops, "quantize", p.grad_output_dx, outputs)
        _quantize(ops, "quantize", p.backward_weight, weights)
    _quantize(ops, "quantize", p.grad_output_dw, outputs)
    _quantize(ops, "quantize", p.backward_input, backward_columns)
    b = cost.bytes
    dx = geo.needs_input_grad
    b["weights"] += (_stored_bytes(p.forward_weight, weights, geo.k)
                     + dx * weights * _bits(p.backward_weight) / 8)
    b["activations"] += _stored_bytes(p.forward_input, forward_in, geo.k)  # forward's X
    b["activations"] += backward_columns * _bits(p.backward_input) / 8 + outputs * 4  # dW's X, Y written
    b["gradients"] += outputs * (dx * _bits(p.grad_output_dx) + _bits(p.grad_output_dw)) / 8  # G read
    b["gradients"] += dx * batch * geo.input_elements * 4 + weights * 4  # dX and dW written
    return cost


def count_costs(model: nn.Module, input_shape: tuple[int, ...], policy: QuantPolicy | None = None,
                batch: int = 128) -> list[LayerCost]:
    """Per-layer counts of one training step. ``policy`` applies to every layer; None takes
    each quantized layer's own policy (and fp32 for float layers)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    modules = dict(model.named_modules())
    costs = []
    for geo in layer_geometries(model, tuple(input_shape)):
        chosen = policy or getattr(modules[geo.name], "policy", None) or QuantPolicy(name="fp32")
        costs.append(layer_cost(geo, chosen, batch))
    return costs
