"""A timm-style registry of backbones by name.

A builder is ``builder(input_shape: tuple[int, ...], **kwargs) -> nn.Module``; the
module must expose ``out_dim`` and map (B, *input_shape) to (B, out_dim) features.
The registry dict is the package's one piece of module-level mutable state, by
design: ``@register_model`` fills it when a backbone module is imported.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` under ``name`` (lower case); a duplicate name is an error."""
    key = name.lower()

    def decorate(builder: Builder) -> Builder:
        if key in _BUILDERS and _BUILDERS[key] is not builder:
            raise ValueError(f"a model named {key!r} is already registered")
        _BUILDERS[key] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_BUILDERS)


def create_model(name: str, input_shape, **kwargs) -> nn.Module:
    """Build the backbone ``name`` for inputs of shape ``input_shape`` (without the batch axis)."""
    key = str(name).lower()
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {input_shape!r}")
    model = _BUILDERS[key](shape, **kwargs)
    if not isinstance(getattr(model, "out_dim", None), int):
        raise TypeError(f"model {key!r} does not set an integer out_dim")
    return model
