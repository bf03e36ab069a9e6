"""Networks shared by the learners: a backbone with a head that grows with the classes.

Heads are ordinary nn.Linear modules inside the network, so ``hdqt.quantize_model``
turns them into QuantLinear like every other layer; growing a head builds a new,
wider nn.Linear with the old rows copied in, and the learner quantizes the
network again (the engine converts only the new float layer).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def grow_linear(old: nn.Linear | None, in_features: int, out_features: int) -> nn.Linear:
    """A new float Linear of the given size holding ``old``'s weights in its top-left block.

    Rows are classes, columns are features: new classes get new rows, and when the
    input widens (DER/MEMO concatenate a new extractor's features) the new columns
    of the old classes keep their fresh initialisation, as in DER.
    """
    new = nn.Linear(in_features, out_features)
    if old is not None:
        if old.out_features > out_features or old.in_features > in_features:
            raise ValueError(f"a head can only grow: {old.in_features}->{old.out_features} "
                             f"cannot become {in_features}->{out_features}")
        with torch.no_grad():
            new.weight[: old.out_features, : old.in_features] = old.weight.detach().cpu()
            new.bias[: old.out_features] = old.bias.detach().cpu()
    return new


def backbone_out_dim(backbone: nn.Module) -> int:
    dim = getattr(backbone, "out_dim", None)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"backbone {type(backbone).__name__} must expose a positive integer "
                         f"out_dim (the feature width), got {dim!r}")
    return dim


class IncrementalNet(nn.Module):
    """Feature extractor + one linear head over all classes seen so far."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = backbone_out_dim(backbone)
        self.head: nn.Linear | None = None

    @property
    def num_classes(self) -> int:
        return 0 if self.head is None else self.head.out_features

    def add_classes(self, count: int) -> None:
        self.head = grow_linear(self.head, self.feature_dim, self.num_classes + count)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("the network has no head yet: call before_task first")
        return self.head(self.backbone(x))
