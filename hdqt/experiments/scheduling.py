"""`hdqt run --schedule`: a run's configuration -> the steps of every task's main stage.

``--schedule ctmq`` (``hdqt.cl.schedules.CTMQSchedule``) trains each task as a chain
of models from ``--ctmq-start-bits`` down to the run's width, one bit a step,
``--ctmq-cycles`` times. The run's recipe, with its options, is the target: the last
step of each descent runs exactly the policy a run without the schedule would. The
wider steps run ``--ctmq-recipe`` (default: the run's recipe) at their width, with
the run's integer-recipe options (``STEP_KEYS``) and an accumulator that keeps the
target's headroom (``step_acc_bits``). A binary target is the ``hadanet`` recipe:
``--recipe hadanet --ctmq-recipe int`` (hadanet has no integer widths).

``--epochs`` stays the task's total: the schedule splits it over its steps, so a
scheduled run and direct training at the target width train as many epochs.

Every rule of the schedule itself has its home in ``CTMQSchedule``; this module
names the flag or key a value came from (``config.key_name``).
"""
from __future__ import annotations

from typing import Any, Mapping

from hdqt.experiments.config import (COMMAND_LINE, ConfigError, RunConfig, key_name,
                                     policy_overrides)

SCHEDULES = ("none", "ctmq")
# The keys of the CTMQ schedule, and their defaults when --schedule ctmq is given.
CTMQ_KEYS = ("ctmq_start_bits", "ctmq_cycles", "ctmq_recipe")
CTMQ_DEFAULTS: Mapping[str, Any] = {"ctmq_start_bits": 8, "ctmq_cycles": 2}
# CTMQSchedule's fields -> the configuration keys they come from.
_FIELD_KEYS = {"start_bits": "ctmq_start_bits", "target_bits": "bits", "cycles": "ctmq_cycles",
               "epochs": "epochs"}
# The run's options the wider steps take: those of the integer recipes, bar the width.
STEP_KEYS = ("acc_bits", "tile", "saturate_backward", "hadamard_rule", "hadamard_select",
             "forward_hadamard", "backward_scales", "weight_scales")
MAX_ACC_BITS = 32


def fill_schedule_defaults(merged: dict[str, Any]) -> None:
    """With ``schedule = "ctmq"``: the unset CTMQ keys take their defaults
    (``ctmq_recipe``: the run's recipe), so that a run has one identity however its
    defaults were spelt. Called by ``resolve_config`` on the merged layers."""
    if merged.get("schedule") != "ctmq":
        return
    for key, value in CTMQ_DEFAULTS.items():
        merged.setdefault(key, value)
    merged.setdefault("ctmq_recipe", merged.get("recipe"))


def check_schedule(config: RunConfig, recipes: tuple[str, ...],
                   origin: Mapping[str, str] | None = None) -> None:
    """The schedule's settings, named by flag or key: the choice, the CTMQ ranges, the
    epochs the steps need and every step's policy (built once here)."""
    origin = origin or {}
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"{key_name('schedule', origin)} must be one of "
                          f"{', '.join(SCHEDULES)}, got {config.schedule!r}")
    if config.schedule == "none":
        keys = [key for key in CTMQ_KEYS if getattr(config, key) is not None]
        if keys:
            verb, them = ("applies", "it") if len(keys) == 1 else ("apply", "them")
            add = ("--schedule ctmq" if origin.get(keys[0]) == COMMAND_LINE
                   else 'schedule = "ctmq"')
            raise ConfigError(f"{', '.join(key_name(key, origin) for key in keys)} {verb} to "
                              f"the CTMQ schedule only: add {add}, or leave {them} out")
        return
    if config.ctmq_recipe not in recipes:
        raise ConfigError(f"unknown {key_name('ctmq_recipe', origin)} {config.ctmq_recipe!r}; "
                          f"valid choices: {', '.join(recipes)}")
    schedule_steps(config, origin)


def target_policy(config: RunConfig):
    """The run's own policy (its recipe with its options): the schedule's target."""
    import hdqt

    return hdqt.recipe(config.recipe, **policy_overrides(config))


def schedule_steps(config: RunConfig, origin: Mapping[str, str] | None = None):
    """The ``TrainingStep`` tuple of every task's main stage, or None without a schedule."""
    from hdqt.cl.schedules import CTMQSchedule, ScheduleError

    if config.schedule == "none":
        return None
    origin = origin or {}
    target = target_policy(config)
    if target.is_float:
        raise ConfigError(f"{key_name('schedule', origin)} ctmq trains a chain of quantized "
                          f"models, but the {config.recipe} recipe quantizes nothing; choose an "
                          f"integer recipe (int, hdqt, luq), or hadanet for a binary target")
    target_bits = policy_bits(target)
    try:
        schedule = CTMQSchedule(config.ctmq_start_bits, target_bits, config.ctmq_cycles)
        schedule.split_epochs(config.epochs)
    except ScheduleError as error:
        name = key_name(_FIELD_KEYS[error.field], origin)
        if error.field == "target_bits":
            name = f"the {config.recipe} recipe's width ({name})"
        raise ConfigError(f"{name} {error.detail}") from None
    return schedule.plan(config.epochs, lambda bits: target if bits == target_bits
                         else step_policy(config, target, bits, origin))


def step_policy(config: RunConfig, target, bits: int, origin: Mapping[str, str] | None = None):
    """The policy of a step ``bits`` wide, wider than the target: ``ctmq_recipe`` at
    ``bits``, with the run's ``STEP_KEYS`` and the accumulator of ``step_acc_bits``."""
    import hdqt

    overrides = {key: value for key, value in policy_overrides(config).items()
                 if key in STEP_KEYS}
    overrides["acc_bits"] = step_acc_bits(target.acc_bits, bits - policy_bits(target))
    try:
        return hdqt.recipe(config.ctmq_recipe, bits=bits, **overrides)
    except (TypeError, ValueError) as error:
        given = key_name("ctmq_recipe", origin) if "ctmq_recipe" in (origin or {}) \
            else f"the {config.ctmq_recipe} recipe (--ctmq-recipe, default: --recipe)"
        raise ConfigError(f"CTMQ's {bits}-bit step cannot run {given}: {error}. The steps "
                          f"wider than the target need an integer recipe with a bits knob "
                          f"(int, hdqt, luq)") from None


def step_acc_bits(target_acc_bits: int | None, extra_bits: int) -> int | None:
    """The accumulator of a step ``extra_bits`` wider than the target: 2 bits more per
    extra bit of the operands, so that it holds as many products of two codes as the
    target's (a product of two b-bit codes is about 2b bits wide), at most 32 bits.
    Unlimited (None) stays unlimited."""
    if target_acc_bits is None:
        return None
    return min(MAX_ACC_BITS, target_acc_bits + 2 * extra_bits)


def policy_bits(policy) -> int:
    """How many bits wide a policy's forward weights are (1 for a binary format)."""
    quantizer = policy.forward_weight
    bits = getattr(getattr(quantizer, "format", None), "bits", None)
    if not isinstance(bits, int):
        raise ConfigError(f"the {policy.name} policy's forward weights have no bit width: "
                          f"it cannot be the target of a CTMQ schedule")
    return bits


def describe_steps(steps) -> list[dict[str, Any]]:
    """The steps as plain data (config.json's ``schedule``)."""
    return [step.to_dict() for step in steps or ()]
