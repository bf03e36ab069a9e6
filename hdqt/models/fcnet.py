"""FCNet: the fully connected HAR backbone, in -> hidden -> in, ReLU, no bias."""
from __future__ import annotations

import math

from torch import nn

from hdqt.models.registry import register_model


def _block(in_features: int, out_features: int) -> nn.Sequential:
    # No bias: the paper's FCNet is bias-free, and it keeps every op a plain matmul.
    return nn.Sequential(nn.Linear(in_features, out_features, bias=False), nn.ReLU())


class FCNet(nn.Module):
    """Flatten -> Linear(in, hidden) -> ReLU -> Linear(hidden, in) -> ReLU; ``out_dim = in``.

    With a 19-way head this is the paper's FCNet 405-405-405-19 for DSADS. For MEMO,
    ``layer1`` is the shared (generalised) block and ``layer2`` the per-task
    (specialised) block.
    """

    def __init__(self, in_features: int, hidden: int | None = None):
        super().__init__()
        hidden = in_features if hidden is None else hidden
        if in_features < 1 or hidden < 1:
            raise ValueError(f"FCNet sizes must be positive, got in_features={in_features}, hidden={hidden}")
        self.in_features = in_features
        self.hidden = hidden
        self.out_dim = in_features
        self.flatten = nn.Flatten()
        self.layer1 = _block(in_features, hidden)
        self.layer2 = _block(hidden, in_features)

    def forward(self, x):
        return self.layer2(self.layer1(self.flatten(x)))

    def split(self):
        """(shared flatten + layer1, factory of fresh layer2 blocks with ``out_dim``)."""
        generalized = nn.Sequential(self.flatten, self.layer1)
        hidden, out = self.hidden, self.in_features

        def specialized() -> nn.Module:
            block = _block(hidden, out)
            block.out_dim = out
            return block

        return generalized, specialized


@register_model("fcnet")
def fcnet(input_shape: tuple[int, ...], hidden: int | None = None) -> FCNet:
    """FCNet for any input shape (flattened); ``hidden`` defaults to the input size."""
    return FCNet(math.prod(input_shape), hidden)
