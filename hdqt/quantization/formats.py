"""Number formats: small immutable value objects (QPyTorch style).

A format says which values are representable; it does not say how a tensor is
scaled into it or how it is rounded (see ``scaling`` and ``rounding`` in
``quantizer.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Signedness = Literal["signed", "unsigned", "auto"]
_SIGNEDNESS = ("signed", "unsigned", "auto")


def check_bits(bits: int, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{name} must be an integer in 2..16, got {bits!r}")
    return bits


@dataclass(frozen=True)
class IntFormat:
    """Symmetric integer grid with ``bits`` bits.

    ``signed`` uses [-(2^(b-1)-1), 2^(b-1)-1] (symmetric: no -2^(b-1), so that
    negation is exact). ``unsigned`` uses [0, 2^b-1]. ``auto`` picks unsigned for a
    tensor with no negative value (activations after ReLU) and signed otherwise,
    which spends the sign bit only when the data needs it.
    """

    bits: int = 4
    signed: Signedness = "signed"

    kind = "int"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.signed not in _SIGNEDNESS:
            raise ValueError(f"signed must be one of {_SIGNEDNESS}, got {self.signed!r}")

    @property
    def signed_max(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def unsigned_max(self) -> int:
        return 2**self.bits - 1

    def max_magnitude(self) -> int:
        """Largest representable |value| on any path this format can take."""
        return self.signed_max if self.signed == "signed" else self.unsigned_max

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "signed": self.signed}


def format_from_dict(data: dict) -> IntFormat:
    data = dict(data)
    kind = data.pop("kind", "int")
    if kind != "int":
        raise ValueError(f"format kind must be one of ('int',), got {kind!r}")
    return IntFormat(**data)
