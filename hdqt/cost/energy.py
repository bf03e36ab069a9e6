"""Energy per operation and per memory access: a documented, replaceable table.

The default is Horowitz, "Computing's energy problem (and what we can do about it)",
ISSCC 2014, 45 nm, in picojoules:

    int add        8 bit 0.03    32 bit 0.1
    int multiply   8 bit 0.2     32 bit 3.1
    float add     16 bit 0.4     32 bit 0.9
    float multiply 16 bit 1.1    32 bit 3.7
    memory, 64 bits: 8 KB SRAM 10, DRAM 1300-2600 (2000 taken)

Widths between or beyond the tabulated ones: a multiplier's energy scales with the
product of its operand widths (the square of the width for equal operands), from the
smallest tabulated width that holds both operands (the largest one beyond); an adder's
energy is linear between tabulated widths and proportional to the width outside them.

A user table is TOML with the same keys (any subset; the rest stay default)::

    [int]
    add = { 8 = 0.03, 32 = 0.1 }
    mul = { 8 = 0.2, 32 = 3.1 }
    [float]
    add = { 16 = 0.4, 32 = 0.9 }
    mul = { 16 = 1.1, 32 = 3.7 }
    [memory]
    sram = 10.0      # pJ per 64-bit access
    dram = 2000.0
    use = "sram"     # which one prices the bytes moved
"""
from __future__ import annotations

import bisect
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

NUMBERS = ("int", "float")
OPERATIONS = ("add", "mul")
MEMORIES = ("sram", "dram")


def _frozen(table: Mapping[int, float]) -> Mapping[int, float]:
    return MappingProxyType(dict(sorted(table.items())))


@dataclass(frozen=True)
class EnergyTable:
    """Picojoules per operation (by number kind, operation and width) and per 64-bit access."""

    int_add: Mapping[int, float] = field(default_factory=lambda: _frozen({8: 0.03, 32: 0.1}))
    int_mul: Mapping[int, float] = field(default_factory=lambda: _frozen({8: 0.2, 32: 3.1}))
    float_add: Mapping[int, float] = field(default_factory=lambda: _frozen({16: 0.4, 32: 0.9}))
    float_mul: Mapping[int, float] = field(default_factory=lambda: _frozen({16: 1.1, 32: 3.7}))
    sram: float = 10.0
    dram: float = 2000.0
    memory: str = "sram"
    source: str = "Horowitz, ISSCC 2014, 45 nm"

    def __post_init__(self) -> None:
        for name in ("int_add", "int_mul", "float_add", "float_mul"):
            table = getattr(self, name)
            if not table or any(not (isinstance(w, int) and w > 0 and v > 0) for w, v in table.items()):
                raise ValueError(f"energy table {name}: needs positive integer widths with positive pJ, got "
                                 f"{dict(table)!r}")
        if self.memory not in MEMORIES:
            raise ValueError(f"energy table memory.use must be one of {MEMORIES}, got {self.memory!r}")
        if self.sram <= 0 or self.dram <= 0:
            raise ValueError("energy table memory.sram and memory.dram must be positive pJ per 64-bit access")

    def operation(self, number: str, operation: str, bits: int, other_bits: int | None = None) -> float:
        """pJ of one ``operation`` ("add" or "mul") on ``number`` ("int" or "float") operands
        of ``bits`` (a multiply's second operand may have ``other_bits``)."""
        if number not in NUMBERS or operation not in OPERATIONS:
            raise ValueError(f"unknown operation {number} {operation}")
        table = getattr(self, f"{number}_{operation}")
        widths = list(table)
        if operation == "mul":
            other = bits if other_bits is None else other_bits
            at = bisect.bisect_left(widths, max(bits, other))
            ref = widths[min(at, len(widths) - 1)]
            return table[ref] * bits * other / (ref * ref)
        if bits in table:
            return table[bits]
        at = bisect.bisect_left(widths, bits)
        if at == 0 or at == len(widths):  # outside the table: proportional to the width
            ref = widths[0] if at == 0 else widths[-1]
            return table[ref] * bits / ref
        lo, hi = widths[at - 1], widths[at]
        return table[lo] + (table[hi] - table[lo]) * (bits - lo) / (hi - lo)

    def memory_access(self) -> float:
        """pJ per 64 bits moved, from the memory in use."""
        return self.sram if self.memory == "sram" else self.dram

    def to_dict(self) -> dict:
        return {
            "int": {"add": dict(self.int_add), "mul": dict(self.int_mul)},
            "float": {"add": dict(self.float_add), "mul": dict(self.float_mul)},
            "memory": {"sram": self.sram, "dram": self.dram, "use": self.memory},
            "source": self.source,
        }

    @classmethod
    def from_toml(cls, path: str | Path) -> "EnergyTable":
        """A table from a TOML file (see the module docstring); missing keys keep the defaults."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"energy table {path}: no such file") from None
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"energy table {path}: not valid TOML ({error})") from None
        known = {"int", "float", "memory", "source"}
        if set(data) - known:
            raise ValueError(f"energy table {path}: unknown section(s) {sorted(set(data) - known)}; "
                             f"valid: {sorted(known)}")
        kwargs: dict = {"source": str(data.get("source", path))}
        for number in NUMBERS:
            section = data.get(number, {})
            if set(section) - set(OPERATIONS):
                raise ValueError(f"energy table {path}: [{number}] takes add and mul, got {sorted(section)}")
            for operation, widths in section.items():
                try:
                    kwargs[f"{number}_{operation}"] = _frozen({int(w): float(v) for w, v in widths.items()})
                except (AttributeError, TypeError, ValueError):
                    raise ValueError(f"energy table {path}: [{number}] {operation} must map bit widths to pJ, "
                                     f"e.g. {{ 8 = 0.2, 32 = 3.1 }}, got {widths!r}") from None
        memory = data.get("memory", {})
        if set(memory) - {"sram", "dram", "use"}:
            raise ValueError(f"energy table {path}: [memory] takes sram, dram and use, got {sorted(memory)}")
        for key, name in (("sram", "sram"), ("dram", "dram"), ("use", "memory")):
            if key in memory:
                kwargs[name] = memory[key] if key == "use" else float(memory[key])
        try:
            return cls(**kwargs)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
