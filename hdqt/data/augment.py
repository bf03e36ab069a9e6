"""Batch augmentation for image datasets: random crop with zero padding, horizontal flip."""
from __future__ import annotations

import torch


class RandomCropFlip:
    """``augment(x, generator)``: the standard CIFAR augmentation on a (B, C, H, W) batch.

    Each image is zero-padded by ``padding`` pixels on every side, cropped back to
    (H, W) at a random offset, and mirrored left-right with probability 1/2. All
    randomness comes from ``generator`` so that a seeded run is reproducible; random
    numbers are drawn on the generator's device and moved to the batch's.
    A class (not a closure) so that prepared data stays picklable.
    """

    def __init__(self, padding: int = 4, flip: bool = True):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = padding
        self.flip = flip

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"augment expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        p = self.padding
        draw_on = generator.device
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=draw_on).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=draw_on).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, channels, rows, cols]
        if self.flip:
            mirror = torch.rand(b, generator=generator, device=draw_on).to(x.device) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return x
