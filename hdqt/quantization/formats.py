"""Number formats: small immutable value objects (QPyTorch style).

A format says which values are representable; it does not say how a tensor is
scaled into it (``hdqt.quantization.scaling``) or which rounding picks the value
(the Quantizer's ``rounding``). Every format can

* enumerate its representable values (``values()``: sorted, distinct, float64;
  +0 and -0 are one value there),
* round a tensor that is already in its units onto them (``round_(values,
  rounding, generator)``: to nearest, or stochastically, i.e. unbiased: each value
  lands on one of its two neighbours with the probabilities that keep its mean),
* say its largest magnitude (``max_magnitude()``), in the units the products (and
  so the accumulators) see: an integer format's largest code, a float format's
  largest finite value, a log format's top power of two,
* round-trip through ``to_dict``/``format_from_dict`` (``kind`` names the class).

Formats:

* ``IntFormat(bits, signed)``: the symmetric integer grid of the integer recipes.
* ``FloatFormat(exp_bits, man_bits, subnormals, saturate, specials)``: a binary
  float with the IEEE bias 2^(e-1)-1 (a scaling multiplies by a power of two to move
  it, which is all a different bias does). ``specials`` says what the top exponent
  code holds: ``"ieee"`` (infinities and NaNs: FP8 e5m2), ``"fn"`` (finite, but the
  all-ones mantissa there is the one NaN pattern and there is no infinity: FP8
  e4m3, whose largest value is therefore 1.75 * 2^8 = 448, not 1.875 * 2^8) or
  ``"none"`` (every code is a number: FP4 e2m1 and FP134). Named instances:
  ``FP8_E4M3`` (max 448), ``FP8_E5M2`` (max 57344), ``FP4_E2M1`` (0, 0.5, 1, 1.5,
  2, 3, 4, 6) and ``FP134`` (1 sign, 3 exponent, 4 mantissa bits, subnormals, no
  specials: max 31, smallest normal 0.25, smallest subnormal 1/64). FP134 is the
  value set of lptorch's ``custom_fp_format([5,5,5,5,5,5,5,4,3,2,1,0])`` that
  the paper's official code trains with: each digit is the mantissa resolution
  of one binade below the top (frexp mantissa rounded to 2^-digit): seven binades
  with 5 (4 stored mantissa bits: the normals of a 3-bit exponent whose eight codes
  are all finite, code 0 being the subnormals), then 4, 3, 2, 1 (the subnormals
  m/16 * 2^emin, m = 8..15, 4..7, 2..3 and 1: gradual underflow) and a final 0,
  which rounds the binade below the smallest subnormal to 0 or to that subnormal
  (the same rule our rounding applies). So the digit string is exactly
  ``FloatFormat(3, 4, subnormals=True, specials="none")``: 127 positive values,
  255 distinct values, 256 codes with -0. Its exponent bias is not fixed but
  tracked per tensor: that is ``ExponentBiasScaling``, not part of the format.
* ``LogFormat(bits)``: a sign and a radix-2 exponent (LUQ's gradient format):
  zero and the 2^(bits-1) - 1 powers of two 2^0 .. 2^(2^(bits-1) - 2) (4 bits:
  1, 2, ..., 64), 2^bits - 1 values with their signs. Stochastic rounding is LUQ's:
  unbiased between two powers of two (x in [2^k, 2^(k+1)) goes up with probability
  (x - 2^k) / 2^k) and stochastic underflow below the smallest level (x in (0, 1)
  becomes 1 with probability x, else 0). LUQ's official code keeps 8 levels and
  zero (17 codes with the signs, more than 4 bits hold); we keep a true 4-bit code.
* ``BinaryFormat()``: one bit, the sign: +1 for x > 0, -1 otherwise (sign(0) = -1,
  so that every value has one of the two codes a bit can hold and a ReLU's zeros are
  -1, its pattern kept; NaN also maps to -1).
  HadaNets / XNOR-Net binarization, scaled by ``GroupMeanScaling`` (``binary.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hdqt.quantization.rounding import check_rounding, round_nearest_, round_stochastic_

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
    def sign_mode(self) -> int:
        """``signed`` as the native quantizer's sign mode: 0 signed, 1 unsigned, 2 auto (csrc/rounding.c)."""
        return _SIGNEDNESS.index(self.signed)

    @property
    def unsigned_max(self) -> int:
        return 2**self.bits - 1

    is_integer = True  # codes are integers: products and their sums are exact integers

    def max_magnitude(self) -> int:
        """Largest representable |value| on any path this format can take."""
        return self.signed_max if self.signed == "signed" else self.unsigned_max

    def values(self, signed: bool | None = None) -> torch.Tensor:
        """The grid: [-(2^(b-1)-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned (``signed``
        None: as the format's ``signed`` says; ``auto`` is taken as signed)."""
        if signed is None:
            signed = self.signed != "unsigned"
        top = self.signed_max if signed else self.unsigned_max
        return torch.arange(-top if signed else 0, top + 1, dtype=torch.float64)

    def round_(self, values: torch.Tensor, rounding: str, generator: torch.Generator | None = None,
               signed: bool = True) -> torch.Tensor:
        """Round ``values`` (in grid units) in place onto the signed or unsigned grid,
        clamped to it (saturation): before stochastic rounding too, so that a value
        just outside still lands on the grid."""
        check_rounding(rounding)
        qmax = self.signed_max if signed else self.unsigned_max
        qmin = -qmax if signed else 0
        if rounding == "nearest":
            return round_nearest_(values).clamp_(qmin, qmax)
        return round_stochastic_(values.clamp_(qmin, qmax), generator).clamp_(qmin, qmax)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "signed": self.signed}


SPECIALS = ("ieee", "fn", "none")


@dataclass(frozen=True)
class FloatFormat:
    """A binary float: sign, ``exp_bits`` exponent and ``man_bits`` mantissa bits, bias
    2^(exp_bits-1) - 1 (see the module docstring for ``specials`` and the named formats).

    ``subnormals=False`` flushes: a magnitude below the smallest normal 2^emin rounds
    to 0 or to 2^emin (to nearest, or stochastically between the two).
    ``saturate=True`` clamps an overflow to the largest finite value; ``False`` makes it
    infinite (``specials="ieee"``) or NaN (``"fn"``); a format without specials always
    saturates. Rounding to nearest is IEEE's (ties to even); signed zero is kept (a
    negative value that rounds to zero gives -0.0).
    """

    exp_bits: int
    man_bits: int
    subnormals: bool = True
    saturate: bool = True
    specials: str = "none"

    kind = "float"
    signed = "signed"  # a symmetric format: no separate unsigned range
    is_integer = False

    def __post_init__(self) -> None:
        for name, value, lo, hi in (("exp_bits", self.exp_bits, 1, 8), ("man_bits", self.man_bits, 0, 23)):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
        for name in ("subnormals", "saturate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.specials not in SPECIALS:
            raise ValueError(f"specials must be one of {SPECIALS}, got {self.specials!r}")
        if self.emax < self.emin or (self.specials == "fn" and self.man_bits == 0 and self.emax == self.emin):
            raise ValueError(f"{self.exp_bits} exponent bits leave no normal binade with specials={self.specials!r}")
        if not self.saturate and self.specials == "none":
            raise ValueError("saturate=False needs specials 'ieee' (overflow to inf) or 'fn' (overflow to NaN)")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (exponent code 1)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite binade."""
        top_code = 2**self.exp_bits - (2 if self.specials == "ieee" else 1)
        if self.specials == "fn" and self.man_bits == 0:
            top_code -= 1  # the top code's only mantissa is the NaN pattern
        return top_code - self.bias

    def max_value(self) -> float:
        steps = 2**self.man_bits
        top_mantissa = steps - (2 if self.specials == "fn" and self.man_bits > 0 else 1)
        return math.ldexp(1.0 + top_mantissa / steps, self.emax)

    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    def min_subnormal(self) -> float | None:
        """The smallest positive value when there are subnormals (else None)."""
        return math.ldexp(1.0, self.emin - self.man_bits) if self.subnormals and self.man_bits else None

    def max_magnitude(self) -> float:
        return self.max_value()

    def values(self) -> torch.Tensor:
        steps = 2**self.man_bits
        pos = []
        if self.subnormals:
            pos += [math.ldexp(k / steps, self.emin) for k in range(1, steps)]
        for e in range(self.emin, self.emax + 1):
            pos += [math.ldexp(1.0 + k / steps, e) for k in range(steps)]
        top = self.max_value()
        pos = [v for v in pos if v <= top]
        pos_t = torch.tensor(pos, dtype=torch.float64)
        return torch.cat([-pos_t.flip(0), torch.zeros(1, dtype=torch.float64), pos_t])

    def round_(self, values: torch.Tensor, rounding: str, generator: torch.Generator | None = None,
               signed: bool = True) -> torch.Tensor:
        """Round ``values`` (in the format's units) onto the format: each value's quantum is
        2^(e - man_bits) for its binade e (at least emin: subnormals share the smallest
        normal's quantum; without subnormals the quantum below 2^emin is 2^emin itself)."""
        check_rounding(rounding)
        mag = values.abs()
        _, exponent = torch.frexp(mag)  # mag = m * 2^exponent, m in [0.5, 1)
        binade = exponent.sub_(1).clamp_(min=self.emin)
        shift = binade.sub_(self.man_bits)
        if not self.subnormals:
            shift = torch.where(mag < self.min_normal(), torch.full_like(shift, self.emin), shift)
        quantum = torch.exp2(shift.to(values.dtype))
        sign_source = values.clone() if rounding == "stochastic" else None
        out = values.div_(quantum)
        out = round_nearest_(out) if rounding == "nearest" else round_stochastic_(out, generator)
        out.mul_(quantum)
        top = self.max_value()
        if self.saturate:
            out.clamp_(-top, top)
        else:
            over = out.abs() > top
            out = torch.where(over, torch.full_like(out, math.inf if self.specials == "ieee" else math.nan)
                              .copysign_(out), out)
        if sign_source is not None:
            out = out.copysign_(sign_source)  # floor(-0.3 + u) = 0 would lose the sign
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "exp_bits": self.exp_bits, "man_bits": self.man_bits,
                "subnormals": self.subnormals, "saturate": self.saturate, "specials": self.specials}


@dataclass(frozen=True)
class LogFormat:
    """Sign and radix-2 exponent: zero and 2^0 .. 2^(2^(bits-1) - 2) (LUQ's gradients).

    Rounding to nearest picks the nearer of the two neighbouring levels (in value);
    stochastic rounding is LUQ's unbiased log rounding with stochastic underflow
    (module docstring). Magnitudes above the top level saturate."""

    bits: int = 4

    kind = "log"
    signed = "signed"
    is_integer = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")

    @property
    def levels(self) -> int:
        """The number of nonzero magnitudes."""
        return 2 ** (self.bits - 1) - 1

    def max_value(self) -> float:
        return math.ldexp(1.0, self.levels - 1)

    def max_magnitude(self) -> float:
        return self.max_value()

    def values(self) -> torch.Tensor:
        pos = torch.tensor([math.ldexp(1.0, k) for k in range(self.levels)], dtype=torch.float64)
        return torch.cat([-pos.flip(0), torch.zeros(1, dtype=torch.float64), pos])

    def round_(self, values: torch.Tensor, rounding: str, generator: torch.Generator | None = None,
               signed: bool = True) -> torch.Tensor:
        check_rounding(rounding)
        mag = values.abs()
        _, exponent = torch.frexp(mag)
        low = torch.exp2(exponent.sub_(1).clamp_(0, self.levels - 1).to(values.dtype))  # 2^floor(log2), >= 1
        below = mag < 1.0
        low = torch.where(below, torch.zeros_like(low), low)
        high = torch.where(below, torch.ones_like(low), low * 2)
        frac = (mag - low).div_(high - low)  # where between its two levels, in [0, 1)
        if rounding == "nearest":
            up = frac >= 0.5
        else:
            up = torch.rand(values.shape, generator=generator, device=values.device, dtype=values.dtype) < frac
        out = torch.where(up, high, low).clamp_(max=self.max_value())
        return out.copysign_(values)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bits": self.bits}


@dataclass(frozen=True)
class BinaryFormat:
    """The sign, one bit: +1 for x > 0, -1 otherwise (sign(0) = -1; see the module docstring).
    Deterministic: rounding is always "nearest" (the sign itself)."""

    kind = "binary"
    bits = 1
    signed = "signed"
    is_integer = True  # codes are +-1: products and their sums are exact integers

    def max_magnitude(self) -> int:
        return 1

    def values(self) -> torch.Tensor:
        return torch.tensor([-1.0, 1.0], dtype=torch.float64)

    def round_(self, values: torch.Tensor, rounding: str, generator: torch.Generator | None = None,
               signed: bool = True) -> torch.Tensor:
        check_rounding(rounding)
        if rounding != "nearest":
            raise ValueError(f"BinaryFormat binarizes deterministically: rounding must be 'nearest', got {rounding!r}")
        return torch.where(values > 0, 1.0, -1.0).to(values.dtype)

    def to_dict(self) -> dict:
        return {"kind": self.kind}


FP8_E4M3 = FloatFormat(4, 3, specials="fn")
FP8_E5M2 = FloatFormat(5, 2, specials="ieee")
FP4_E2M1 = FloatFormat(2, 1)
FP134 = FloatFormat(3, 4)

Format = IntFormat | FloatFormat | LogFormat | BinaryFormat
FORMAT_KINDS = {"int": IntFormat, "float": FloatFormat, "log": LogFormat, "binary": BinaryFormat}


def from_kind_dict(data: dict, kinds: dict, default: str, what: str):
    """The value object a ``to_dict`` wrote: ``data["kind"]`` (default ``default``) picks
    the class in ``kinds``; an unknown kind or field is a ValueError naming ``what``."""
    data = dict(data)
    kind = data.pop("kind", default)
    if kind not in kinds:
        raise ValueError(f"{what} kind must be one of {tuple(kinds)}, got {kind!r}")
    cls = kinds[kind]
    valid = set(cls.__dataclass_fields__)
    unknown = set(data) - valid
    if unknown:
        raise ValueError(f"unknown {kind} {what} field(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return cls(**data)


def format_from_dict(data: dict) -> Format:
    return from_kind_dict(data, FORMAT_KINDS, "int", "format")
