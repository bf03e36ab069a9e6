"""Per-layer gradient diagnostics of quantized training against float32 autograd.

``diagnose(model, x, y, policy)`` runs one training step's forward and backward
(no optimizer step) on copies of ``model``, the caller's model is left untouched:

* float32: a copy whose quantized layers take the fp32 policy (plain autograd),
  on the same weights and batch: the reference gradients g;
* quantized: a copy under ``policy``, ``draws`` times, the layers' stochastic-rounding
  generators reseeded for every draw (``hdqt.reseed_quantizers``): gradients q_1..q_D.

Per quantized layer, for dX (its input gradient; none for a layer fed the data,
as in training) and dW (its weight gradient):

* ``cosine``: mean over draws of cos(q_d, g); ``cosine_min`` the smallest;
* ``rel_bias``: ||mean_d q_d - g|| / ||g||, which includes the forward pass's
  deterministic rounding, not only the backward's;
* ``rel_variance``: sum_d ||q_d - mean||^2 / ((D - 1) ||g||^2), the spread of one
  draw around the mean, relative to the reference's squared norm (None for D = 1);
* ``norm_ratio``: mean_d ||q_d|| / ||g||.

The per-layer gradients are read with module hooks (the layer's input gradient and
its output gradient G, with ``register_full_backward_hook``; its input X with a
forward hook) and from ``weight.grad``; the engine's autograd functions are not
touched. Level use (``hdqt.diagnostics.levels``) is recomputed from the captured G
and X of the first draw with the engine's public pieces: the policy's forward
quantizers give the codes X_q and W_q the backward reads, ``block_layout`` and
``hadamard_transform`` the transform along each product's reduction, and the
backward quantizers the codes, with the transform (``hadamard``) and without it
(``plain``), whatever the policy's own ``hadamard`` says.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hdqt.diagnostics.levels import LevelUse, operand_level_use
from hdqt.quantization.convert import quant_layers, quantize_model, reseed_quantizers
from hdqt.quantization.hadamard import block_layout
from hdqt.quantization.layers import QuantConv2d
from hdqt.quantization.policy import QuantPolicy
from hdqt.quantization.runtime import derive_seed

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# The four backward operands, in the order of the products they feed (dX, then dW).
BACKWARD_OPERANDS = ("grad_output_dx", "backward_weight", "grad_output_dw", "backward_input")
OPERAND_LABELS = {"grad_output_dx": "G (dX)", "backward_weight": "W (dX)",
                  "grad_output_dw": "G (dW)", "backward_input": "X (dW)"}


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy of the model's logits."""
    return F.cross_entropy(model(x), y)


@dataclass(frozen=True)
class GradStats:
    """How one quantized gradient compares with float32 over the draws."""

    cosine: float | None
    cosine_min: float | None
    rel_bias: float | None
    rel_variance: float | None
    norm_ratio: float | None
    draws: int

    def to_dict(self) -> dict:
        return {"cosine": self.cosine, "cosine_min": self.cosine_min, "rel_bias": self.rel_bias,
                "rel_variance": self.rel_variance, "norm_ratio": self.norm_ratio, "draws": self.draws}


@dataclass(frozen=True)
class LayerDiagnostics:
    name: str
    kind: str  # "linear" or "conv2d"
    policy: str
    dx: GradStats | None  # None: the layer is fed the data, no dX is computed
    dw: GradStats
    # operand -> {"hadamard": LevelUse, "plain": LevelUse}; quantized operands only
    levels: dict[str, dict[str, LevelUse]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "policy": self.policy,
                "dx": None if self.dx is None else self.dx.to_dict(), "dw": self.dw.to_dict(),
                "levels": {op: {variant: use.to_dict() for variant, use in uses.items()}
                           for op, uses in self.levels.items()}}


@dataclass(frozen=True)
class Diagnostics:
    """The diagnostics of one policy on one model and batch."""

    policy: str
    batch: int
    draws: int
    seed: int
    layers: tuple[LayerDiagnostics, ...]

    def to_dict(self) -> dict:
        return {"policy": self.policy, "batch": self.batch, "draws": self.draws, "seed": self.seed,
                "layers": [layer.to_dict() for layer in self.layers]}

    def table(self) -> str:
        """Markdown: gradient alignment per layer, then level use per layer and operand."""
        head = ["| layer | kind | dX cos | dX rel. bias | dX rel. var | dW cos | dW rel. bias | dW rel. var |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        rows = []
        for layer in self.layers:
            cells = [layer.name, layer.kind]
            for stats in (layer.dx, layer.dw):
                cells += (["-"] * 3 if stats is None else
                          [_fmt(stats.cosine, ".4f"), _fmt(stats.rel_bias, ".4f"), _fmt(stats.rel_variance, ".3g")])
            rows.append("| " + " | ".join(cells) + " |")
        text = "\n".join([*head, *rows])
        level_rows = []
        for layer in self.layers:
            for op, uses in layer.levels.items():
                h, p = uses["hadamard"], uses["plain"]
                level_rows.append(f"| {layer.name} | {OPERAND_LABELS[op]} | {h.levels} | {h.hit} | {p.hit} | "
                                  f"{h.entropy_bits:.3f} | {p.entropy_bits:.3f} | {h.max_entropy_bits:.3f} |")
        if level_rows:
            text += ("\n\n| layer | operand | levels | hit (Hadamard) | hit (plain) | entropy bits (Hadamard) | "
                     "entropy bits (plain) | max bits |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
                     + "\n".join(level_rows))
        return text


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class _Capture:
    """Hooks on the quantized layers of a model: X (forward), dX and G (backward)."""

    def __init__(self, model: nn.Module):
        self.layers = dict(quant_layers(model))
        self.x: dict[str, torch.Tensor] = {}
        self.dx: dict[str, torch.Tensor | None] = {}
        self.g: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._forward(name)))
            self._handles.append(layer.register_full_backward_hook(self._backward(name)))

    def _forward(self, name):
        def hook(module, inputs, output):
            self.x[name] = inputs[0].detach()
        return hook

    def _backward(self, name):
        def hook(module, grad_input, grad_output):
            self.dx[name] = None if grad_input[0] is None else grad_input[0].detach().clone()
            self.g[name] = grad_output[0].detach().clone()
        return hook

    def clear(self) -> None:
        self.x.clear()
        self.dx.clear()
        self.g.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _step(model: nn.Module, capture: _Capture, x, y, loss_fn: LossFn, rng_seed: int) -> dict[str, tuple]:
    """One forward and backward; per layer (dX or None, dW)."""
    model.zero_grad(set_to_none=True)
    capture.clear()
    devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
        if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # The first layer's input needs no gradient: its hook then reports none, as meant.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        torch.manual_seed(rng_seed)  # dropout and the like: the same mask every pass
        loss = loss_fn(model, x, y)
        loss.backward()
    out = {}
    for name, layer in capture.layers.items():
        dw = layer.weight.grad
        if dw is None:
            raise RuntimeError(f"layer {name!r} got no weight gradient: is it used by the loss?")
        out[name] = (capture.dx.get(name), dw.detach().clone())
    return out


class _Running:
    """Cosine, norms and Welford's mean and summed squared deviation of one gradient over draws."""

    def __init__(self, reference: torch.Tensor):
        self.ref = reference.double()
        self.ref_norm = float(self.ref.norm())
        self.mean = torch.zeros_like(self.ref)
        self.m2 = 0.0
        self.n = 0
        self.cosines: list[float] = []
        self.norms: list[float] = []

    def add(self, q: torch.Tensor) -> None:
        q = q.double()
        self.n += 1
        delta = q - self.mean
        self.mean += delta / self.n
        self.m2 += float((delta * (q - self.mean)).sum())
        norm = float(q.norm())
        self.norms.append(norm)
        if norm > 0 and self.ref_norm > 0:
            self.cosines.append(float((q * self.ref).sum()) / (norm * self.ref_norm))

    def stats(self) -> GradStats:
        ref = self.ref_norm
        cos = self.cosines
        return GradStats(
            cosine=sum(cos) / len(cos) if cos else None,
            cosine_min=min(cos) if cos else None,
            rel_bias=float((self.mean - self.ref).norm()) / ref if ref > 0 else None,
            rel_variance=self.m2 / ((self.n - 1) * ref * ref) if self.n > 1 and ref > 0 else None,
            norm_ratio=sum(self.norms) / len(self.norms) / ref if ref > 0 and self.norms else None,
            draws=self.n,
        )


def _with_policy(model: nn.Module, policy: QuantPolicy | None) -> nn.Module:
    """A copy of ``model`` whose every Linear/Conv2d is quantized, under ``policy`` (None:
    the layers' own policies; float layers then stay float)."""
    model = copy.deepcopy(model)
    if policy is not None:
        quantize_model(model, policy)  # converts the float layers; the quantized keep theirs
        for _, layer in quant_layers(model):
            layer.set_policy(policy)
    return model


def diagnose(model: nn.Module, x: torch.Tensor, y: torch.Tensor, policy: QuantPolicy | None = None, *,
             draws: int = 8, seed: int = 0, loss_fn: LossFn | None = None, levels: bool = True,
             train: bool = True) -> Diagnostics:
    """Gradient alignment, bias, variance and level use of ``policy`` on ``model`` for the
    batch (``x``, ``y``); ``policy`` None keeps the policies of a model already quantized.

    ``loss_fn(model, x, y)`` gives the loss (default: cross-entropy of ``model(x)``).
    ``train``: the copies run in training mode (BatchNorm on batch statistics), as in a
    training step. ``model`` itself is not changed (its gradients, buffers, generators).
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    loss_fn = loss_fn or cross_entropy_loss
    quantized = _with_policy(model, policy)
    names = [name for name, _ in quant_layers(quantized)]
    if not names:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to diagnose")
    reference = copy.deepcopy(quantized)
    for _, layer in quant_layers(reference):
        layer.set_policy(QuantPolicy(name="fp32"))
    for m in (quantized, reference):
        m.train(train)
        for p in m.parameters():
            p.requires_grad_(True)
    rng_seed = derive_seed(seed, "diagnose-rng")

    cap = _Capture(reference)
    try:
        ref = _step(reference, cap, x, y, loss_fn, rng_seed)
    finally:
        cap.remove()
    running = {name: (None if dx is None else _Running(dx), _Running(dw)) for name, (dx, dw) in ref.items()}

    cap = _Capture(quantized)
    first = None
    try:
        for d in range(draws):
            reseed_quantizers(quantized, derive_seed(seed, "draw", d))
            grads = _step(quantized, cap, x, y, loss_fn, rng_seed)
            if d == 0:
                first = ({k: v for k, v in cap.x.items()}, {k: v for k, v in cap.g.items()})
            for name, (dx, dw) in grads.items():
                run_dx, run_dw = running[name]
                if run_dx is not None and dx is not None:
                    run_dx.add(dx)
                run_dw.add(dw)
    finally:
        cap.remove()

    layers = []
    modules = dict(quant_layers(quantized))
    for name in names:
        layer = modules[name]
        run_dx, run_dw = running[name]
        kind = "conv2d" if isinstance(layer, QuantConv2d) else "linear"
        uses = {}
        if levels:
            xs, gs = first
            uses = layer_level_use(layer, xs[name], gs[name], with_dx=run_dx is not None,
                                   seed=derive_seed(seed, "levels", name))
        layers.append(LayerDiagnostics(name, kind, layer.policy.name,
                                       None if run_dx is None else run_dx.stats(), run_dw.stats(), uses))
    return Diagnostics(_policy_name(policy, quantized), int(x.shape[0]), draws, seed, tuple(layers))


def _policy_name(policy: QuantPolicy | None, model: nn.Module) -> str:
    if policy is not None:
        return policy.name
    names = sorted({layer.policy.name for _, layer in quant_layers(model)})
    return names[0] if len(names) == 1 else "per-layer (" + ", ".join(names) + ")"


def _codes(quantizer, tensor: torch.Tensor) -> torch.Tensor:
    """The forward operand the backward reads: the quantizer's codes (round to nearest,
    as the forward pass computes them), or the tensor itself when it stays float."""
    if quantizer is None:
        return tensor.detach().float()
    return quantizer.quantize(tensor.detach().float(), None, nonfinite="propagate").values


def backward_operand_tensors(layer: nn.Module, x: torch.Tensor, g: torch.Tensor,
                             with_dx: bool = True) -> dict[str, tuple[torch.Tensor, int]]:
    """The four backward operands of ``layer`` before transform and quantization, laid out as
    the engine's products reduce them: operand -> (tensor, reduction dim).

    Linear: dX reduces over the output features N (G (B, N), W_q^T (K, N)); dW over the
    batch (G^T (N, B), X_q^T (K, B)). Conv2d: dX over the output channels (G (B, N, L),
    W_q (N, K)); dW over each sample's output positions L (G (N, B, L) and the columns
    of X_q (K, B, L))."""
    policy = layer.policy
    w_codes = _codes(policy.forward_weight, layer.weight)
    x_codes = _codes(policy.forward_input, x)
    out: dict[str, tuple[torch.Tensor, int]] = {}
    if isinstance(layer, QuantConv2d):
        b, n = g.shape[:2]
        g_cols = g.reshape(b, n, -1).float()  # (B, N, L)
        if with_dx:
            out["grad_output_dx"] = (g_cols, 1)
            out["backward_weight"] = (w_codes.reshape(n, -1), 0)
        cols = F.unfold(x_codes, layer.kernel_size, dilation=layer.dilation, padding=layer._explicit_pad,
                        stride=layer.stride)  # (B, K, L)
        out["grad_output_dw"] = (g_cols.transpose(0, 1), 2)
        out["backward_input"] = (cols.transpose(0, 1), 2)
    else:
        g2 = g.reshape(-1, g.shape[-1]).float()
        x2 = x_codes.reshape(-1, x_codes.shape[-1])
        if with_dx:
            out["grad_output_dx"] = (g2, 1)
            out["backward_weight"] = (w_codes.T, 1)
        out["grad_output_dw"] = (g2.T, 1)
        out["backward_input"] = (x2.T, 1)
    return out


def layer_level_use(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, *, with_dx: bool = True,
                    seed: int = 0) -> dict[str, dict[str, LevelUse]]:
    """Level use of every quantized backward operand of ``layer`` for its input ``x`` and
    output gradient ``g``: operand -> {"hadamard": ..., "plain": ...}. The transform's
    blocks follow the policy's ``hadamard_rule``."""
    policy = layer.policy
    result = {}
    for op, (tensor, dim) in backward_operand_tensors(layer, x, g, with_dx).items():
        quantizer = getattr(policy, op)
        if quantizer is None:
            continue
        layout = block_layout(tensor.shape[dim], policy.hadamard_rule)
        uses = {}
        for variant, lay in (("hadamard", layout), ("plain", None)):
            gen = torch.Generator(device=tensor.device).manual_seed(derive_seed(seed, op, variant))
            uses[variant] = operand_level_use(quantizer, tensor, dim, lay, gen)
        result[op] = uses
    return result


def summarize_layers(diag: Diagnostics) -> dict:
    """A compact per-layer record (for diagnostics.jsonl): cosines, bias, variance and, per
    operand, levels hit and entropy with and without the transform."""
    layers = []
    for layer in diag.layers:
        entry = {"name": layer.name, "kind": layer.kind}
        for part, stats in (("dx", layer.dx), ("dw", layer.dw)):
            entry[part] = None if stats is None else {
                k: _round(v) for k, v in stats.to_dict().items() if k != "draws"}
        entry["levels"] = {op: {variant: {"levels": u.levels, "hit": u.hit, "entropy_bits": _round(u.entropy_bits)}
                                for variant, u in uses.items()} for op, uses in layer.levels.items()}
        layers.append(entry)
    return {"policy": diag.policy, "batch": diag.batch, "draws": diag.draws, "layers": layers}


def _round(value):
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.6g}")
    return value
