"""Cost model: operations, bytes and energy of one training step, per layer and policy.

    from hdqt.cost import estimate
    step = estimate(model, (405,), hdqt.recipe("hdqt"), batch=128)
    print(step.table())            # per layer: MACs, adds, bytes, pJ
    step.to_dict()                 # for machines (``hdqt energy --json``)

What is counted and how it is priced: ``hdqt/cost/counts.py`` and ``energy.py``, and
docs/cost.md. The numbers are estimates of a device that runs these products natively
at these widths, not measurements of this library's CPU kernels.
"""
from __future__ import annotations

import importlib

# Public name -> defining module, loaded on first use (PEP 562): the counts need torch,
# and `hdqt energy --help` should answer without it.
_LAZY_NAMES = {
    **dict.fromkeys(("LayerCost", "LayerGeometry", "count_costs", "layer_cost", "layer_geometries"),
                    "hdqt.cost.counts"),
    "EnergyTable": "hdqt.cost.energy",
    **dict.fromkeys(("StepCost", "estimate"), "hdqt.cost.step"),
}
__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'hdqt.cost' has no attribute {name!r}")
