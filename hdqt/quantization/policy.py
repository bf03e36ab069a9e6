"""QuantPolicy: which quantizer applies to each of the six operands of training.

For a layer Y = X W^T with upstream gradient G, training runs three products:

* forward  Y  = Q(X) Q(W)^T            -> ``forward_input``, ``forward_weight``
* backward dX = Q(G H) Q(H W)           -> ``grad_output_dx``, ``backward_weight``
* backward dW = Q(G^T H) Q(H X)         -> ``grad_output_dw``, ``backward_input``

(H: the Hadamard transform along the product's reduction dimension, when
``hadamard`` is on.) ``forward_hadamard`` also rotates both forward operands along
their reduction dimension before they are quantized (Xi et al. 2023): Y = Q(X H) Q(W H)^T / p
for a linear layer, along the input channels for a convolution (``layers.py``); it
combines with any recipe and uses ``hadamard_rule``'s blocks. ``None`` for a quantizer means that operand stays float.

A binary policy (HadaNets, ``BinaryFormat`` on both forward operands) binarizes the
forward product and trains with float gradients through a clipped straight-through
estimator (``binary.py``): its backward operands are None, its accumulator is
unlimited (popcounts are exact) and it takes no Hadamard transform.
``float_first_last`` keeps the layers that read the model's input and that give its
output in float32 (``quantize_model``; ``boundary.py`` says how they are found).
The policy is plain data: frozen, comparable, and round-trips through a dict/JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

from hdqt.quantization.hadamard import check_rule
from hdqt.quantization.quantizer import NONFINITE_MODES, Quantizer

HADAMARD_SELECTIONS = ("always", "noise")

OPERANDS = (
    "forward_input",
    "forward_weight",
    "backward_input",
    "backward_weight",
    "grad_output_dx",
    "grad_output_dw",
)


@dataclass(frozen=True)
class QuantPolicy:
    forward_input: Quantizer | None = None
    forward_weight: Quantizer | None = None
    backward_input: Quantizer | None = None
    backward_weight: Quantizer | None = None
    grad_output_dx: Quantizer | None = None
    grad_output_dw: Quantizer | None = None
    acc_bits: int | None = None  # forward accumulator width; None = unlimited
    # Reduction length summed into one accumulator before saturation; None: the whole
    # reduction is one tile (the sum is clamped, or rounded, once: the official code's LUQ).
    tile: int | None = 32
    saturate_backward: bool = False  # also tile and saturate the two backward products
    hadamard: bool = False
    hadamard_rule: str = "paper"
    # "always": every backward product runs in the Hadamard domain (the paper). "noise": a
    # product runs there only when its operands' estimated rounding error is smaller there
    # than in the raw domain (hdqt/quantization/selection.py), decided at every step.
    hadamard_select: str = "always"
    forward_hadamard: bool = False  # rotate both forward operands along the reduction before quantizing
    nonfinite: str = "raise"  # "raise" on NaN/Inf in a quantized operand, or "propagate"
    float_first_last: bool = False  # quantize_model keeps the first and the last layers float32
    seed: int | None = None  # base seed of stochastic rounding; None draws from torch's RNG
    name: str = "custom"

    def __post_init__(self) -> None:
        for op in OPERANDS:
            q = getattr(self, op)
            if q is not None and not isinstance(q, Quantizer):
                raise ValueError(f"{op} must be a Quantizer or None, got {type(q).__name__}")
        if self.acc_bits is not None and (
            isinstance(self.acc_bits, bool) or not isinstance(self.acc_bits, int) or not 2 <= self.acc_bits <= 32
        ):
            raise ValueError(f"acc_bits must be None (unlimited) or an integer in 2..32, got {self.acc_bits!r}")
        if self.tile is not None and (isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1):
            raise ValueError(f"tile must be None (the whole reduction) or an integer >= 1, got {self.tile!r}")
        check_rule(self.hadamard_rule)
        if self.hadamard_select not in HADAMARD_SELECTIONS:
            raise ValueError(f"hadamard_select must be one of {HADAMARD_SELECTIONS}, got {self.hadamard_select!r}")
        if self.hadamard_select == "noise":
            for op in ("backward_input", "backward_weight", "grad_output_dx", "grad_output_dw"):
                q = getattr(self, op)
                if q is not None and not q.native_fast:
                    raise ValueError(f"hadamard_select='noise' estimates rounding error on an integer grid with "
                                     f"per-tensor dynamic scaling; {op} is {q.to_dict()}")
        if not isinstance(self.forward_hadamard, bool):
            raise ValueError(f"forward_hadamard must be True or False, got {self.forward_hadamard!r}")
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {self.nonfinite!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be None or an integer, got {self.seed!r}")
        for op in ("forward_weight", "backward_weight"):
            q = getattr(self, op)
            if q is not None and q.granularity == "sample":
                raise ValueError(f"{op} has no sample dimension: granularity='sample' applies to inputs and gradients")
        for op in OPERANDS:
            q = getattr(self, op)
            if op != "forward_weight" and q is not None and q.granularity == "channel":
                # only there does a per-row scale factor out of every sum it enters: the backward
                # weight is reduced over its rows (dX), and transformed along them
                raise ValueError(f"{op}: granularity='channel' (a scale per output feature) applies to "
                                 "forward_weight only")
        if not isinstance(self.float_first_last, bool):
            raise ValueError(f"float_first_last must be True or False, got {self.float_first_last!r}")
        self._check_binary()
        self._check_accumulator()

    @property
    def is_binary(self) -> bool:
        """True when the forward operands are binarized (HadaNets: ``binary.py`` runs the layers)."""
        return self.forward_weight is not None and self.forward_weight.format.kind == "binary"

    @property
    def binary_group(self) -> int | None:
        """The group of a binary policy's betas (None: one per row)."""
        return self.forward_weight.scaling.group if self.is_binary else None

    def _check_binary(self) -> None:
        binary = [op for op in OPERANDS if getattr(self, op) is not None and getattr(self, op).format.kind == "binary"]
        if not binary:
            return
        if binary != ["forward_input", "forward_weight"]:
            raise ValueError("a binary format (HadaNets) binarizes both forward operands and nothing else; "
                             f"this policy has it on {binary}")
        if self.forward_input.scaling != self.forward_weight.scaling:
            raise ValueError("the binary forward operands must share their groups along the reduction: "
                             f"{self.forward_input.scaling} against {self.forward_weight.scaling}")
        quantized_backward = [op for op in OPERANDS[2:] if getattr(self, op) is not None]
        if quantized_backward:
            raise ValueError("a binary policy trains with float gradients (a clipped straight-through estimator): "
                             f"{', '.join(quantized_backward)} must be None")
        for key, default in (("acc_bits", None), ("hadamard", False), ("forward_hadamard", False),
                             ("saturate_backward", False)):
            if getattr(self, key) != default:
                raise ValueError(f"a binary policy's products are exact popcounts in float32: {key} does not apply "
                                 f"(must be {default}), got {getattr(self, key)!r}")

    def _check_accumulator(self) -> None:
        """Refuse an accumulator that cannot hold one product of two codes: every tile with
        a large product would saturate, and training would run at chance without a word
        (8-bit operands on the default 8-bit accumulator did).

        ``acc_bits`` means an integer accumulator for a product of two integer formats
        (units: one product of two codes) and a float accumulator of ``acc_bits`` bits for
        a product with a float or log operand (``accumulate.py``: 16 = IEEE half, 12 =
        e5m6, 8 = e5m2; at least 4 bits). Per-sample scales (whose products run on
        dequantized values) and a float or log operand multiplied by an unquantized one
        have no accumulator units: a limited accumulator is refused for those products."""
        if self.acc_bits is None:
            return
        limited = [("forward", "forward_input", "forward_weight")]
        if self.saturate_backward:
            limited += [("dX", "grad_output_dx", "backward_weight"), ("dW", "grad_output_dw", "backward_input")]
        limit = 2 ** (self.acc_bits - 1) - 1
        for product, op_a, op_b in limited:
            qa, qb = getattr(self, op_a), getattr(self, op_b)
            for op, q in ((op_a, qa), (op_b, qb)):
                if q is not None and q.granularity == "sample":
                    raise ValueError(
                        f"acc_bits={self.acc_bits} limits the {product} product, whose {op} has per-sample scales: "
                        "its products run on dequantized values, without accumulator units. Use acc_bits=None "
                        "(unlimited, float32 sums) for this policy")
            if qa is None or qb is None:
                other = qa or qb
                if other is not None and not other.format.is_integer:
                    raise ValueError(
                        f"acc_bits={self.acc_bits} limits the {product} product of a {other.format.kind} format and an "
                        "unquantized operand: no accumulator units. Quantize both operands or use acc_bits=None")
                continue
            if not (qa.format.is_integer and qb.format.is_integer):
                if self.acc_bits < 4:
                    raise ValueError(f"acc_bits={self.acc_bits}: the {product} product has a {qa.format.kind} x "
                                     f"{qb.format.kind} operand pair, summed in a float accumulator of at least 4 bits")
                continue
            largest = qa.format.max_magnitude() * qb.format.max_magnitude()
            if largest > limit:
                needed = (largest + 1).bit_length() + 1  # sign bit: 2^(b-1) - 1 >= largest
                raise ValueError(
                    f"acc_bits={self.acc_bits} cannot hold one product of two {product} codes "
                    f"({qa.format.max_magnitude()} x {qb.format.max_magnitude()} = {largest} > {limit}, "
                    f"the largest value of a signed {self.acc_bits}-bit accumulator): a single product of two large codes "
                    f"already saturates it. Use acc_bits >= {needed}, fewer bits, or acc_bits=None (unlimited)"
                )

    @property
    def is_float(self) -> bool:
        """True when training under this policy is plain float32 training."""
        return all(getattr(self, op) is None for op in OPERANDS) and self.acc_bits is None

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Quantizer) else value
        if not self.float_first_last:  # the default is left out: older policies read the same
            del out["float_first_last"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "QuantPolicy":
        valid = {f.name for f in fields(cls)}
        unknown = set(data) - valid
        if unknown:
            raise ValueError(f"unknown QuantPolicy field(s) {sorted(unknown)}; valid fields: {sorted(valid)}")
        kwargs = dict(data)
        for op in OPERANDS:
            if kwargs.get(op) is not None:
                kwargs[op] = Quantizer.from_dict(kwargs[op])
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantPolicy":
        return cls.from_dict(json.loads(text))
