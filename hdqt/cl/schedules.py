"""Training schedules inside a task: the main stage as a chain of steps, each
trained under its own quantization policy.

CTMQ (Kim, Shin, Del Barrio 2022, "CTMQ: Cyclic Training of Convolutional Neural
Networks with Multiple Quantization Steps") trains a chain of models, each one bit
narrower than the one before and initialised from its weights, from ``start_bits``
down to ``target_bits``; then the trained low-bit weights initialise the
``start_bits`` model again and the descent repeats, ``cycles`` times in all::

    schedule = CTMQSchedule(start_bits=8, target_bits=2, cycles=2)
    schedule.bit_widths()         # (8, 7, 6, 5, 4, 3, 2, 8, 7, 6, 5, 4, 3, 2)
    schedule.split_epochs(30)     # (2, 2, ..., 3, 3): 30 epochs in all
    steps = schedule.plan(30, lambda bits: hdqt.recipe("int", bits=bits))
    learner = create_learner("icarl", ..., config=TrainConfig(epochs=30, ...), schedule=steps)

A learner given ``schedule`` (a tuple of ``TrainingStep``) runs its main training
stage as those steps in turn (``Learner._fit_main``): before a step, every
quantized layer of its network takes the step's policy (``set_policy``), so a step
starts from the weights the step before left. Each step is a training run of its
own, as in the paper: a fresh SGD optimizer, and the config's milestones moved to
the same fractions of the step's epochs (``step_milestones``). The epochs of the
steps add up to the config's ``epochs``: a schedule splits a task's training, it
does not lengthen it, so a scheduled run and direct training at the target width
cost the same number of epochs. Stages after the main one (BiC's bias correction,
DER/MEMO's balanced classifier stage) run under the last step's policy, the target.

The steps are plain data: ``hdqt run`` writes a checkpoint after every step, and a
run killed mid-schedule resumes after its last finished step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

MAX_BITS = 16  # the widest integer grid (hdqt.quantization.formats.check_bits)


class ScheduleError(ValueError):
    """An invalid schedule setting. ``field`` names it (``start_bits``, ``epochs``...);
    the message is ``f"{field} {detail}"``, so a caller that knows where the value came
    from (a flag, a TOML key) can name that instead and keep the rule's wording."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field} {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class TrainingStep:
    """One step of a task's main stage: ``epochs`` epochs under ``policy``, whose
    weights and activations are ``bits`` wide; ``cycle`` counts from 1."""

    policy: object  # a QuantPolicy (not imported here: this module loads without torch)
    epochs: int
    bits: int | None = None
    cycle: int = 1

    def to_dict(self) -> dict:
        """Plain data for config.json: the policy by name and accumulator."""
        return {"bits": self.bits, "epochs": self.epochs, "cycle": self.cycle,
                "policy": getattr(self.policy, "name", None),
                "acc_bits": getattr(self.policy, "acc_bits", None)}


@dataclass(frozen=True)
class CTMQSchedule:
    """``cycles`` descents from ``start_bits`` to ``target_bits``, one bit a step.

    ``target_bits`` 1 is a binary target (the HadaNets recipe); the wider steps are
    integer widths, so ``start_bits`` lies in ``target_bits + 1 .. 16``.
    """

    start_bits: int
    target_bits: int
    cycles: int = 2

    name: ClassVar[str] = "ctmq"

    def __post_init__(self) -> None:
        if not _is_int(self.target_bits) or not 1 <= self.target_bits < MAX_BITS:
            raise ScheduleError("target_bits", f"must be an integer in 1..{MAX_BITS - 1} (a "
                                f"narrower width than the start's), got {self.target_bits!r}")
        low = self.target_bits + 1
        if not _is_int(self.start_bits) or not low <= self.start_bits <= MAX_BITS:
            raise ScheduleError("start_bits", f"must be an integer in {low}..{MAX_BITS}, wider "
                                f"than the target width ({self.target_bits} bits), got "
                                f"{self.start_bits!r}")
        if not _is_int(self.cycles) or self.cycles < 1:
            raise ScheduleError("cycles", f"must be an integer >= 1 (descents from the start "
                                f"width to the target), got {self.cycles!r}")

    @property
    def num_steps(self) -> int:
        return self.cycles * (self.start_bits - self.target_bits + 1)

    def bit_widths(self) -> tuple[int, ...]:
        """The width of every step, in training order."""
        descent = tuple(range(self.start_bits, self.target_bits - 1, -1))
        return descent * self.cycles

    def split_epochs(self, total: int) -> tuple[int, ...]:
        """``total`` epochs over the steps: as evenly as they go, the remainder to the
        last steps (the final descent's narrowest widths, the target last of all)."""
        steps = self.num_steps
        if not _is_int(total) or total < steps:
            raise ScheduleError("epochs", f"must be at least {steps}, one epoch for each step "
                                f"of {self.describe()} (epochs is the task's total, split "
                                f"over the steps), got {total!r}")
        base, extra = divmod(total, steps)
        return tuple(base + (index >= steps - extra) for index in range(steps))

    def plan(self, total_epochs: int, policy_for_bits: Callable[[int], object]
             ) -> tuple[TrainingStep, ...]:
        """The steps, each with ``policy_for_bits(bits)``; policies are built once per width."""
        policies = {bits: policy_for_bits(bits) for bits in dict.fromkeys(self.bit_widths())}
        per_cycle = self.start_bits - self.target_bits + 1
        return tuple(TrainingStep(policies[bits], epochs, bits, index // per_cycle + 1)
                     for index, (bits, epochs) in enumerate(zip(self.bit_widths(),
                                                                self.split_epochs(total_epochs))))

    def describe(self) -> str:
        plural = "s" if self.cycles != 1 else ""
        return (f"CTMQ ({self.start_bits} down to {self.target_bits} bits, {self.cycles} "
                f"cycle{plural}: {self.num_steps} steps)")


def step_milestones(milestones: Sequence[int], total_epochs: int, step_epochs: int
                    ) -> tuple[int, ...]:
    """The task's lr milestones moved to the same fractions of one step's epochs (a
    step is a training run of its own); those that fall on its ends are dropped."""
    scaled = {round(m * step_epochs / total_epochs) for m in milestones}
    return tuple(sorted(m for m in scaled if 0 < m < step_epochs))


def check_steps(schedule: Sequence[TrainingStep], total_epochs: int) -> tuple[TrainingStep, ...]:
    """``schedule`` as a tuple, checked: quantized policies, positive epochs adding up
    to ``total_epochs`` (the learner's ``config.epochs``)."""
    from hdqt.quantization import QuantPolicy

    steps = tuple(schedule)
    if not steps:
        raise ValueError("schedule must hold at least one TrainingStep, or be None")
    for index, step in enumerate(steps):
        if not isinstance(step, TrainingStep):
            raise ValueError(f"schedule step {index + 1} must be a TrainingStep, got "
                             f"{type(step).__name__}")
        if not isinstance(step.policy, QuantPolicy):
            raise ValueError(f"schedule step {index + 1}: policy must be a QuantPolicy, got "
                             f"{type(step.policy).__name__}")
        if not _is_int(step.epochs) or step.epochs < 1:
            raise ValueError(f"schedule step {index + 1}: epochs must be a positive integer, "
                             f"got {step.epochs!r}")
    total = sum(step.epochs for step in steps)
    if total != total_epochs:
        raise ValueError(f"the schedule's steps train {total} epochs in all, but the config's "
                         f"epochs is {total_epochs}: a schedule splits a task's epochs")
    return steps


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
