"""TrainConfig: the optimisation settings every learner honours.

Its validation is the one rule for these settings: ``hdqt run`` builds a
TrainConfig from its configuration and reports a ``TrainConfigError`` under the
flag or TOML key the value came from.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from hdqt.cl.memory import SELECTIONS


class TrainConfigError(ValueError):
    """An invalid TrainConfig value. ``key`` is the field; the message is
    ``f"{key} {detail}"``, so a caller that knows where the value came from (a flag,
    a TOML key) can name that instead and keep the rule's wording."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key} {detail}")
        self.key = key
        self.detail = detail


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum and a MultiStepLR schedule, per task.

    ``milestones`` follow torch's MultiStepLR with one scheduler step per epoch:
    milestone m multiplies the lr by ``gamma`` from epoch m+1 on (1-based), so it
    must lie in 1..epochs-1; a milestone at or after the last epoch would never
    take effect and is rejected instead of silently ignored.

    ``memory`` is the total exemplar budget, ``selection`` its strategy,
    ``temperature`` the distillation temperature, ``bic_val_fraction`` the share
    of each class's exemplars (and as many new samples per class, at least 2) BiC
    holds out for its bias-correction stage, ``bic_steps`` the full-batch steps of
    that stage (independent of ``epochs``), ``aux_loss_weight`` the weight of
    DER/MEMO's auxiliary classifier loss, ``balanced_finetune_epochs`` the epochs
    of DER/MEMO's classifier-learning stage on class-balanced data (0 skips it).
    There is no weight-aligning option: PyCIL's weight aligning made DER/MEMO's
    bias towards new classes worse and is not implemented (see
    ``hdqt/cl/learners/expandable.py`` and docs/continual.md).
    """

    epochs: int
    lr: float
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    memory: int = 200
    selection: str = "herding"
    temperature: float = 2.0
    device: str = "cpu"
    bic_val_fraction: float = 0.1
    bic_steps: int = 1000
    aux_loss_weight: float = 1.0
    balanced_finetune_epochs: int = 30

    def __post_init__(self) -> None:
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("bic_steps", self.bic_steps)
        _number("lr", self.lr, low=0.0, low_open=True)
        _number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        _number("weight_decay", self.weight_decay, low=0.0)
        _number("gamma", self.gamma, low=0.0, high=1.0, low_open=True)
        _number("temperature", self.temperature, low=0.0, low_open=True)
        _number("bic_val_fraction", self.bic_val_fraction, low=0.0, high=1.0,
                low_open=True, high_open=True)
        _number("aux_loss_weight", self.aux_loss_weight, low=0.0)
        if isinstance(self.balanced_finetune_epochs, bool) or not isinstance(
                self.balanced_finetune_epochs, int) or self.balanced_finetune_epochs < 0:
            raise TrainConfigError("balanced_finetune_epochs", f"must be a non-negative "
                                   f"integer, got {self.balanced_finetune_epochs!r}")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 0:
            raise TrainConfigError("memory", f"must be a non-negative integer (total "
                                   f"exemplars), got {self.memory!r}")
        if self.selection not in SELECTIONS:
            raise TrainConfigError("selection", f"must be one of {SELECTIONS}, "
                                   f"got {self.selection!r}")
        if not isinstance(self.device, str) or not self.device:
            raise TrainConfigError("device", f"must be a torch device string such as 'cpu' "
                                   f"or 'cuda', got {self.device!r}")
        object.__setattr__(self, "milestones", _check_milestones(self.milestones, self.epochs))

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["milestones"] = list(self.milestones)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**dict(values))


def _check_milestones(milestones, epochs: int) -> tuple[int, ...]:
    try:
        values = tuple(milestones)
    except TypeError:
        raise TrainConfigError("milestones", f"must be a sequence of integers, "
                               f"got {milestones!r}") from None
    valid = f"increasing integers in 1..{epochs - 1} (epochs={epochs})"
    for m in values:
        if isinstance(m, bool) or not isinstance(m, int):
            raise TrainConfigError("milestones", f"must be {valid}, got {list(values)}: "
                                   f"{m!r} is not an integer")
    if any(not 1 <= m <= epochs - 1 for m in values):
        raise TrainConfigError("milestones", f"must be {valid}, got {list(values)}: a "
                               f"milestone at or after the last epoch would never decay the "
                               f"learning rate")
    if list(values) != sorted(set(values)):
        raise TrainConfigError("milestones", f"must be {valid}, got {list(values)}")
    return values


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainConfigError(name, f"must be a positive integer, got {value!r}")


def _number(name: str, value, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rule = " and ".join(r for r in (lo, hi) if r)
        raise TrainConfigError(name, f"must be a number {rule}, got {value!r}")
