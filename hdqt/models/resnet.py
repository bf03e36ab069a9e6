"""CIFAR ResNet-32 (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, 5 basic
blocks each, option-A shortcuts, global average pooling to a 64-d feature."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdqt.models.registry import register_model


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BatchNorm, which has its own shift.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no weights)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class _Pool(nn.Sequential):
    """Global average pool + flatten: (B, C, H, W) -> (B, C)."""

    def __init__(self):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten())


class CifarResNet(nn.Module):
    """stem -> stage1 (16) -> stage2 (32, /2) -> stage3 (64, /2) -> pool; ``out_dim = 64``.

    For MEMO, stem + stage1 + stage2 are the shared (generalised) blocks and
    stage3 + pool the per-task (specialised) block (``split``).
    """

    def __init__(self, in_channels: int = 3, blocks_per_stage: int = 5, widths=(16, 32, 64)):
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        w1, w2, w3 = widths
        self.blocks_per_stage = blocks_per_stage
        self.widths = (w1, w2, w3)
        self.stem = nn.Sequential(_conv3x3(in_channels, w1), nn.BatchNorm2d(w1), nn.ReLU())
        self.stage1 = _stage(w1, w1, blocks_per_stage, stride=1)
        self.stage2 = _stage(w1, w2, blocks_per_stage, stride=2)
        self.stage3 = _stage(w2, w3, blocks_per_stage, stride=2)
        self.pool = _Pool()
        self.out_dim = w3
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage3(self.stage2(self.stage1(self.stem(x)))))

    def split(self):
        """(shared stem + stage1 + stage2, factory of fresh stage3 + pool blocks with ``out_dim``)."""
        generalized = nn.Sequential(self.stem, self.stage1, self.stage2)
        (_, w2, w3), blocks = self.widths, self.blocks_per_stage

        def specialized() -> nn.Module:
            block = nn.Sequential(_stage(w2, w3, blocks, stride=2), _Pool())
            for m in block.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            block.out_dim = w3
            return block

        return generalized, specialized


def _channels(input_shape: tuple[int, ...], name: str) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs input_shape (C, H, W), got {input_shape}")
    return input_shape[0]


@register_model("resnet32")
def resnet32(input_shape: tuple[int, ...]) -> CifarResNet:
    """CIFAR ResNet-32 (6n+2 layers, n=5), ~0.46M parameters without a head."""
    return CifarResNet(_channels(input_shape, "resnet32"), blocks_per_stage=5)


@register_model("resnet20")
def resnet20(input_shape: tuple[int, ...]) -> CifarResNet:
    """CIFAR ResNet-20 (n=3): a cheaper variant for quick runs."""
    return CifarResNet(_channels(input_shape, "resnet20"), blocks_per_stage=3)
