"""Per-layer runtime state: the policy, the stochastic-rounding generators and a
cache of small Hadamard factors. Every quantized layer owns one, so nothing is
shared between layers or models through module-level state."""
from __future__ import annotations

import hashlib

import torch

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
        if isinstance(q.scale, torch.Tensor):
            # Per-sample scales: the products take the dequantized operand (scale 1), so
            # they are float products (the policy allows no limited accumulator there).
            return QTensor(q.values.mul_(q.scale), 1.0)
        return q

    def scaling_states(self) -> dict[str, dict]:
        return {op: dict(st) for op, st in self.scaling_state.items()}

    def restore_scaling_states(self, states: dict[str, dict]) -> None:
        self.scaling_state = {op: dict(st) for op, st in states.items()}
