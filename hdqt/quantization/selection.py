"""Whether a backward product is better off in the Hadamard domain: an estimate of
the error that quantizing its two operands adds, in each domain.

Why: the transform spreads an outlier over its block, so a max-scaled grid resolves
everything else far better (heavy-tailed gradients: the paper's case). But it also
makes dense what was sparse, and it gathers a common offset into one coefficient per
block, which then sets the scale: on a convnet's sparse gradients (after ReLU and
max-pool) and offset activations, 4-bit stochastic rounding in the Hadamard domain
was measured 2-20x noisier than in the raw domain (benchmarks/bench_grad_fidelity.py),
and class-incremental training on Fashion-MNIST collapsed where the raw domain held.

The estimate: rounding a value v on a grid of step s leaves an error with energy
s^2 f (1 - f) (stochastic rounding, f = frac(|v| / s)) or s^2 min(f, 1 - f)^2 (to
nearest); summed over the tensor and divided by its energy, it is the operand's
relative error r. A product of two operands quantized independently has relative
error about r_a + r_b, in either domain (the transform is orthogonal up to a factor
that the product undoes), so the domain with the smaller sum wins. The scale is the
one the quantizer would choose (its clipped max over the format's largest code).
"""
from __future__ import annotations

import torch

from hdqt.quantization.quantizer import Quantizer


def relative_rounding_error(t: torch.Tensor, quantizer: Quantizer | None, amax: float | None = None) -> float:
    """Expected ||Q(t) - t||^2 / ||t||^2 of ``quantizer`` on ``t`` (0 for a float operand
    or an all-zero tensor). ``amax``: max|t| when already known."""
    if quantizer is None:
        return 0.0
    t = t.detach()
    energy = float(t.double().square().sum())
    if energy == 0.0:
        return 0.0
    top = float(t.abs().max()) if amax is None else float(amax)
    lo = float(t.min()) if quantizer.format.signed == "auto" else -top
    scale, _, _ = quantizer.grid(top, lo)
    f = torch.frac(t.abs().double() / scale)
    if quantizer.rounding == "stochastic":
        error = f * (1 - f)
    else:
        error = torch.minimum(f, 1 - f).square()
    return float(error.sum()) * scale * scale / energy


def transform_helps(raw: tuple[float, float], transformed: tuple[float, float]) -> bool:
    """Whether the two operands' relative errors in the Hadamard domain sum to less than raw."""
    return sum(transformed) < sum(raw)
