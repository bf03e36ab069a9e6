"""A timm-style registry of backbones by name.

A builder is ``builder(input_shape: tuple[int, ...], **kwargs) -> nn.Module``; the
module must expose ``out_dim`` and map (B, *input_shape) to (B, out_dim) features.
The registry dict is the package's one piece of module-level mutable state, by
design: ``@register_model`` fills it when a backbone module is imported.
"""
from __future__ import annotations

import typing
from numbers import Integral
from typing import Callable, Iterable

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
    """Build the backbone ``name`` for inputs of shape ``input_shape`` (without the batch axis).

    Keyword arguments the builder annotates as ``int`` (e.g. fcnet's ``hidden``) must be
    integers: a float such as 2.5 would otherwise surface as a TypeError deep in torch.
    """
    key = str(name).lower()
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    shape = _shape(input_shape)
    builder = _BUILDERS[key]
    for arg, none_ok in _integer_parameters(builder).items():
        value = kwargs.get(arg)
        if arg in kwargs and not (_is_int(value) or value is None and none_ok):
            raise ValueError(f"{key}: {arg} must be an integer, got {value!r}")
    model = builder(shape, **kwargs)
    if not isinstance(getattr(model, "out_dim", None), int):
        raise TypeError(f"model {key!r} does not set an integer out_dim")
    return model


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _shape(input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints; a str would otherwise be split into characters."""
    dims = (input_shape,) if _is_int(input_shape) else input_shape
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
        dims = None
    else:
        dims = tuple(dims)
    if not dims or not all(_is_int(d) and d >= 1 for d in dims):
        raise ValueError(
            f"input_shape must be a positive integer or a non-empty sequence of them, got {input_shape!r}"
        )
    return tuple(int(d) for d in dims)


def _integer_parameters(builder: Builder) -> dict[str, bool]:
    """{parameter: None allowed} for the builder's parameters annotated ``int`` or ``int | None``."""
    try:
        hints = typing.get_type_hints(builder)
    except (NameError, TypeError):  # unresolvable annotations: nothing to check
        return {}
    found = {}
    for arg, hint in hints.items():
        options = set(typing.get_args(hint)) or {hint}
        if int in options and options <= {int, type(None)}:
            found[arg] = type(None) in options
    return found
