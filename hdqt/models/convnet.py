"""A small convnet for 28x28 grey images (Fashion-MNIST)."""
from __future__ import annotations

from torch import nn

from hdqt.models.registry import register_model


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # conv -> BN -> ReLU -> 2x2 max-pool: halves H and W
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def _head(channels: int, height: int, width: int, out_dim: int) -> nn.Sequential:
    # BatchNorm before the feature ReLU. Without it the Linear's inputs are all non-negative
    # (max-pooled ReLUs), so one SGD step moves a unit's pre-activation for every sample
    # alike, and units die for good: on Fashion-MNIST with iCaRL, 82-97% of the 128
    # features were zero for every sample of a batch in the fifth task, under fp32, int and
    # hdqt alike, and accuracy collapsed (docs/results-images.md, issue 15). The BatchNorm
    # recentres each unit on the batch, so about half its samples stay active; it makes the
    # bias redundant.
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, out_dim, bias=False),
                         nn.BatchNorm1d(out_dim), nn.ReLU())


class ConvNet(nn.Module):
    """block1 (C->32, /2) -> block2 (32->64, /2) -> flatten -> Linear(64*H/4*W/4, 128) -> BN -> ReLU.

    For MEMO, block1 is the shared (generalised) part and block2 + fc the per-task
    (specialised) part.
    """

    def __init__(self, in_channels: int, height: int, width: int, out_dim: int = 128, widths=(32, 64)):
        super().__init__()
        if height < 4 or width < 4:
            raise ValueError(f"ConvNet needs images of at least 4x4, got {height}x{width}")
        self.widths = tuple(widths)
        self.out_dim = out_dim
        self._fc_grid = (height // 4, width // 4)
        self.block1 = _conv_block(in_channels, widths[0])
        self.block2 = _conv_block(widths[0], widths[1])
        self.fc = _head(widths[1], *self._fc_grid, out_dim)

    def forward(self, x):
        return self.fc(self.block2(self.block1(x)))

    def split(self):
        """(shared block1, factory of fresh block2 + fc modules with ``out_dim``)."""
        (w1, w2), grid, out_dim = self.widths, self._fc_grid, self.out_dim

        def specialized() -> nn.Module:
            block = nn.Sequential(_conv_block(w1, w2), _head(w2, *grid, out_dim))
            block.out_dim = out_dim
            return block

        return self.block1, specialized


@register_model("convnet")
def convnet(input_shape: tuple[int, ...], out_dim: int = 128) -> ConvNet:
    """ConvNet for (C, H, W) inputs, designed for (1, 28, 28); 128-d features by default."""
    if len(input_shape) != 3:
        raise ValueError(f"convnet needs input_shape (C, H, W), got {input_shape}")
    return ConvNet(*input_shape, out_dim=out_dim)
