"""Backbones (feature extractors) by name.

    from hdqt.models import create_model, split_backbone
    backbone = create_model("resnet32", (3, 32, 32))    # backbone(x) -> (B, 64)
    shared, make_specialized = split_backbone(backbone)  # for MEMO

Every backbone maps (B, *input_shape) to (B, out_dim) features and has ``out_dim``;
classifier heads belong to the learners. See docs/models.md.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

# Importing the backbone modules registers them.
from hdqt.models import convnet as _convnet  # noqa: F401
from hdqt.models import fcnet as _fcnet  # noqa: F401
from hdqt.models import resnet as _resnet  # noqa: F401
from hdqt.models.convnet import ConvNet
from hdqt.models.fcnet import FCNet
from hdqt.models.registry import create_model, list_models, register_model
from hdqt.models.resnet import CifarResNet

__all__ = [
    "CifarResNet",
    "ConvNet",
    "FCNet",
    "create_model",
    "list_models",
    "register_model",
    "split_backbone",
]


def split_backbone(model: nn.Module) -> tuple[nn.Module, Callable[[], nn.Module]]:
    """Split a backbone into MEMO's shared and per-task parts.

    Returns ``(generalized, make_specialized)``: ``generalized`` shares its parameters
    with ``model`` (the shallow layers); ``make_specialized()`` builds a freshly
    initialised copy of the deep layers, with ``out_dim`` equal to ``model.out_dim``,
    such that ``make_specialized()(generalized(x))`` has shape (B, out_dim).
    Works for every backbone with a ``split()`` method (all registered ones).
    """
    split = getattr(model, "split", None)
    if not callable(split):
        raise TypeError(f"{type(model).__name__} has no split() method, so MEMO cannot divide it")
    return split()
