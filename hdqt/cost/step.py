"""A training step's costs under one policy (``estimate``), built from the per-layer counts."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from hdqt.cost.counts import LayerCost, count_costs
from hdqt.cost.energy import EnergyTable
from hdqt.quantization.policy import QuantPolicy


@dataclass(frozen=True)
class StepCost:
    """One training step's costs under one policy, priced by one table."""

    policy: str
    batch: int
    layers: tuple[LayerCost, ...]
    energy_table: EnergyTable

    @property
    def macs(self) -> int:
        return sum(sum(layer.macs.values()) for layer in self.layers)

    @property
    def compute_pj(self) -> float:
        return sum(layer.compute_pj(self.energy_table) for layer in self.layers)

    @property
    def memory_pj(self) -> float:
        return sum(layer.memory_pj(self.energy_table) for layer in self.layers)

    @property
    def total_pj(self) -> float:
        return self.compute_pj + self.memory_pj

    @property
    def bytes(self) -> float:
        return sum(sum(layer.bytes.values()) for layer in self.layers)

    def to_dict(self) -> dict:
        table = self.energy_table
        return {
            "policy": self.policy, "batch": self.batch, "macs": self.macs, "bytes": self.bytes,
            "compute_pj": self.compute_pj, "memory_pj": self.memory_pj, "total_pj": self.total_pj,
            "energy_table": table.to_dict(), "layers": [layer.to_dict(table) for layer in self.layers],
        }

    def table(self) -> str:
        """A per-layer Markdown table of MACs, adds, bytes and energy."""
        t = self.energy_table
        rows = [f"| {layer.name} | {layer.kind} | {sum(layer.macs.values()):,} | {layer.adds():,} | "
                f"{sum(layer.bytes.values()):,.0f} | {layer.compute_pj(t) / 1e6:,.3f} | {layer.memory_pj(t) / 1e6:,.3f} |"
                for layer in self.layers]
        head = ["| layer | kind | MACs | adds | bytes | compute µJ | memory µJ |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        total = (f"| **total** | | {self.macs:,} | {sum(l.adds() for l in self.layers):,} | {self.bytes:,.0f} | "
                 f"{self.compute_pj / 1e6:,.3f} | {self.memory_pj / 1e6:,.3f} |")
        return "\n".join([*head, *rows, total])


def estimate(model: nn.Module, input_shape: tuple[int, ...], policy: QuantPolicy | None = None, *,
             batch: int = 128, table: EnergyTable | None = None) -> StepCost:
    """The costs of one training step of ``model`` on inputs of ``input_shape`` (one sample)."""
    layers = tuple(count_costs(model, input_shape, policy, batch))
    name = policy.name if policy is not None else "per-layer"
    return StepCost(name, batch, layers, table or EnergyTable())
