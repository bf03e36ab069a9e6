"""Per-layer runtime state: the policy, the stochastic-rounding generators, a
cache of small Hadamard factors and the forward product's saturation counts.
Every quantized layer owns one, so nothing is shared between layers or models
through module-level state."""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from hdqt.quantization.policy import QuantPolicy
from hdqt.quantization.quantizer import QTensor, Quantizer


# The sample dimension of each operand as the products pass it (functional.py): the
# rows of G for dX (linear (B, N), conv (B, N, L)); G^T (N, B[, L]) and X^T / the
# conv columns (K, B[, L]) for dW; the forward input (B, ...). Per-sample scales
# (granularity "sample") are computed along it.
SAMPLE_DIM = {"forward input": 0, "output gradient (dX)": 0, "output gradient (dW)": 1, "backward input": 1}


def derive_seed(base: int, *parts: object) -> int:
    """A stable 63-bit seed from a base seed and names (independent of PYTHONHASHSEED)."""
    text = ":".join(str(p) for p in (base, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


SATURATION_EVERY = 8  # the forward calls counted by default: one in 8 (see SaturationStats)


class SaturationStats:
    """How often a layer's tiled forward product saturated its accumulator.

    Every output of the product sums ceil(K / tile) tile sums, each clamped at the
    accumulator's limit ±(2^(acc_bits-1) - 1). Of ``steps`` forward calls since the
    last ``reset``, ``counted`` were counted (the first, then one in ``every``):
    in those, the product computed ``tiles`` tile sums, ``saturated`` of them
    exceeded the limit, by ``excess`` in all (the sum of |sum| - limit, in
    accumulator units, i.e. products of the quantized codes). Products with
    unlimited accumulators (acc_bits None) count nothing.

    The kernels count exactly, as they compute the product, which costs 10-20% of
    the product's time; counting one forward call in 8 (``SATURATION_EVERY``)
    keeps it near 2% of a forward step, so it is on by default. ``every=1`` counts
    every call (``reset_saturation(model, every=1)``).
    """

    __slots__ = ("tiles", "saturated", "excess", "steps", "counted", "every")

    def __init__(self, every: int = SATURATION_EVERY) -> None:
        self.every = _check_every(every)
        self.reset()

    def reset(self) -> None:
        self.tiles, self.saturated, self.excess, self.steps, self.counted = 0, 0, 0.0, 0, 0

    def sample(self) -> bool:
        """One forward call: whether to count it (the first since reset, then one in ``every``)."""
        counted = self.steps % self.every == 0
        self.steps += 1
        self.counted += counted
        return counted

    def add(self, tiles: int, saturated: int, excess: float) -> None:
        """One product's counts (called by the product that computed them)."""
        self.tiles += int(tiles)
        self.saturated += int(saturated)
        self.excess += float(excess)

    def as_dict(self) -> dict:
        """The counts, ``share`` (saturated / tiles, 0 with no tiles) and ``mean_excess``
        (excess per saturated tile sum, in accumulator units; 0 with none)."""
        return {
            "tiles": self.tiles, "saturated": self.saturated, "excess": self.excess, "steps": self.steps,
            "counted": self.counted, "every": self.every,
            "share": self.saturated / self.tiles if self.tiles else 0.0,
            "mean_excess": self.excess / self.saturated if self.saturated else 0.0,
        }

    def __repr__(self) -> str:
        return f"SaturationStats({self.as_dict()})"


def _check_every(every: int) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int (count one forward call in every), got {every!r}")
    return every


class LayerRuntime:
    def __init__(self, policy: QuantPolicy, name: str, seed: int) -> None:
        self.policy = policy
        self.name = name
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, torch.Tensor] = {}
        self.hadamard_cache: dict = {}
        # State of scalings that track a tensor across steps (ExponentBiasScaling's
        # exponent), one dict per operand; saved with the layer's state_dict.
        self.scaling_state: dict[str, dict] = {}
        self.saturation = SaturationStats()  # the forward product's, recorded by every forward call
        self.fused_plan = None  # fused_linear.Plan: what its native calls need from this policy

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._generators.clear()
        self._pending_states.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending_states:
                gen.set_state(self._pending_states.pop(key))
            self._generators[key] = gen
        return gen

    def generator_states(self) -> dict[str, torch.Tensor]:
        states = dict(self._pending_states)
        states.update({k: g.get_state() for k, g in self._generators.items()})
        return states

    def restore_generator_states(self, states: dict[str, torch.Tensor]) -> None:
        self._generators.clear()
        self._pending_states = dict(states)

    def quantize(
        self, quantizer: Quantizer | None, tensor: torch.Tensor, operand: str, amax: float | None = None
    ) -> QTensor:
        """Quantize one operand, or pass it through as (tensor, 1.0) when ``quantizer`` is None.

        ``amax``: max|tensor| if already known (see ``Quantizer.quantize``)."""
        if quantizer is None:
            return QTensor(tensor, 1.0)
        gen = self.generator(tensor.device) if quantizer.rounding == "stochastic" else None
        if quantizer.native_fast:
            return quantizer.quantize(
                tensor, gen, nonfinite=self.policy.nonfinite, role=f"{operand} of layer {self.name!r}", amax=amax
            )
        state = self.scaling_state.setdefault(operand, {}) if quantizer.scaling.kind == "exponent_bias" else None
        q = quantizer.quantize(tensor, gen, nonfinite=self.policy.nonfinite, role=f"{operand} of layer {self.name!r}",
                               state=state, sample_dim=SAMPLE_DIM.get(operand, 0))
        if isinstance(q.scale, torch.Tensor) and quantizer.granularity == "sample":
            # Per-sample scales: the products take the dequantized operand (scale 1), so
            # they are float products (the policy allows no limited accumulator there).
            # A weight's per-channel scales stay beside its codes: each output feature's
            # scale factors out of its sum, so the product stays one of integers.
            return QTensor(q.values.mul_(q.scale), 1.0)
        return q

    def quantize_row_transform(self, quantizer: Quantizer, tensor: torch.Tensor, p: int, operand: str) -> QTensor:
        """``quantize`` of the Hadamard transform (blocks of ``p``) along ``tensor``'s last
        dimension, in one native call (``Quantizer.quantize_row_transform``)."""
        gen = self.generator(tensor.device) if quantizer.rounding == "stochastic" else None
        return quantizer.quantize_row_transform(tensor, p, gen, nonfinite=self.policy.nonfinite,
                                                role=f"{operand} of layer {self.name!r}")

    def scaling_states(self) -> dict[str, dict]:
        return {op: dict(st) for op, st in self.scaling_state.items()}

    def restore_scaling_states(self, states: dict[str, dict]) -> None:
        self.scaling_state = {op: dict(st) for op, st in states.items()}


def _runtimes(model: nn.Module) -> list[tuple[str, LayerRuntime]]:
    """(module name, runtime) of every quantized layer of ``model``, in module order."""
    found = []
    for name, module in model.named_modules():
        rt = getattr(module, "_rt", None)
        if isinstance(rt, LayerRuntime):
            found.append((name or rt.name, rt))
    return found


def saturation_report(model: nn.Module, reset: bool = False) -> dict[str, dict]:
    """Per quantized layer (by module name), its forward saturation counts since the
    last reset (``SaturationStats.as_dict``); ``reset=True`` starts the counts anew
    after reading them. The counts live in the layers, in memory only (not in the
    state_dict); a copy of the model (a teacher, say) counts its own."""
    report = {}
    for name, rt in _runtimes(model):
        report[name] = rt.saturation.as_dict()
        if reset:
            rt.saturation.reset()
    return report


def reset_saturation(model: nn.Module, every: int | None = None) -> None:
    """Zero the saturation counts of every quantized layer of ``model``; with ``every``,
    count one forward call in ``every`` from now on (1: every call)."""
    if every is not None:
        _check_every(every)
    for _, rt in _runtimes(model):
        rt.saturation.reset()
        if every is not None:
            rt.saturation.every = every


def restore_saturation(model: nn.Module, report: dict[str, dict]) -> None:
    """Set the saturation counts of ``model``'s quantized layers to those of a
    ``saturation_report`` of the same model (a run resumed mid-task goes on counting
    where it stopped, including which forward call is counted next)."""
    for name, rt in _runtimes(model):
        if name not in report:
            raise ValueError(f"the saturation report has no layer {name!r}")
        counts = report[name]
        stats = rt.saturation
        stats.every = _check_every(int(counts["every"]))
        stats.tiles, stats.saturated = int(counts["tiles"]), int(counts["saturated"])
        stats.excess, stats.steps = float(counts["excess"]), int(counts["steps"])
        stats.counted = int(counts["counted"])
