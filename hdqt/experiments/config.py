"""The resolved configuration of one `hdqt run` experiment.

Values come from three layers, later layers winning: the defaults of the chosen
dataset (``DATASET_DEFAULTS``), a TOML file (``--config``) and command-line flags.
``resolve_config`` merges the layers and validates the result; every error names
the offending flag (``--acc-bits``) or key and file (``acc_bits (from run.toml)``)
and says what was expected.

Each rule has one home, and this module only says where a value came from: the
training options are checked by the learners' ``TrainConfig``, the quantization
options by the engine (``hdqt.recipe``/``QuantPolicy``), the task sizes by the
scenario; names (datasets, methods...) and devices against what is installed.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration the user can fix: the message says how."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines the result of one run (one recipe, one seed)."""

    dataset: str
    method: str
    recipe: str
    backbone: str
    epochs: int
    lr: float
    memory: int
    init_classes: int
    increment: int
    seed: int = 0
    bits: int | None = None  # None: the recipe's own default
    acc_bits: int | None = None  # 0: unlimited
    tile: int | None = None
    saturate_backward: bool | None = None
    hadamard_rule: str | None = None
    hadamard_select: str | None = None  # None: the recipe's ("always")
    forward_hadamard: bool | None = None  # None: the recipe's (off)
    backward_scales: str | None = None  # None: the recipe's (one scale per tensor); or "sample"
    weight_scales: str | None = None  # None: the recipe's (one scale per tensor); or "channel"
    group: int | None = None  # hadanet's betas: values per group; None (or 0): one group per row
    # Bound of the normalised feature inputs in standard deviations: None is the
    # default (prepare's 3.0; also what 3 is stored as), 0 is unbounded ("none").
    input_clip: float | None = None
    # At most this many training samples per class (a seeded choice; None: all), for
    # quick runs on big datasets; the test set stays whole.
    train_per_class: int | None = None
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    selection: str = "herding"
    temperature: float = 2.0
    test_fraction: float = 0.2
    # Method-specific; None keeps the learner's own default.
    bic_val_fraction: float | None = None
    bic_steps: int | None = None
    aux_loss_weight: float | None = None
    balanced_finetune_epochs: int | None = None
    # A schedule of each task's main stage (hdqt.experiments.scheduling): "none", or
    # "ctmq" with its start width, cycles and the recipe of the wider steps (filled in
    # with their defaults when ctmq is chosen; None otherwise).
    schedule: str = "none"
    ctmq_start_bits: int | None = None
    ctmq_cycles: int | None = None
    ctmq_recipe: str | None = None
    # Where the run happens, not what it computes: ignored when checking that a
    # resumed run has the same configuration (see ``identity``).
    data_root: str | None = field(default=None, compare=False)
    device: str = field(default="cpu", compare=False)
    # Gradient diagnostics every N training steps into diagnostics.jsonl (0: off). They run
    # on copies of the network under a forked RNG and leave training as it is, so they
    # are not part of the identity either: a run resumes with them switched on or off.
    diagnose_every: int = field(default=0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["milestones"] = list(self.milestones)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        values = dict(values)
        values["milestones"] = tuple(values.get("milestones", ()))
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it continues."""
        values = self.to_dict()
        return {f.name: values[f.name] for f in _FIELDS if f.compare}


_FIELDS = dataclasses.fields(RunConfig)
CONFIG_KEYS = tuple(f.name for f in _FIELDS)
# Keys a TOML file may hold besides the RunConfig fields: they choose what to run
# and where, and are shared by all runs of a comparison.
RUN_KEYS = ("compare", "out")

_INT_KEYS = {"epochs", "memory", "init_classes", "increment", "seed", "bits",
             "acc_bits", "tile", "group", "batch_size", "bic_steps", "balanced_finetune_epochs",
             "diagnose_every", "ctmq_start_bits", "ctmq_cycles", "train_per_class"}
_FLOAT_KEYS = {"lr", "momentum", "weight_decay", "gamma", "temperature", "test_fraction",
               "bic_val_fraction", "aux_loss_weight"}
_STR_KEYS = {"dataset", "method", "recipe", "backbone", "selection", "data_root", "device",
             "hadamard_rule", "hadamard_select", "backward_scales", "weight_scales", "schedule",
             "ctmq_recipe"}
_BOOL_KEYS = {"saturate_backward", "forward_hadamard"}
# Keys without a command-line flag; every other key X has the flag --X (with - for _).
FILE_ONLY_KEYS = frozenset({"momentum", "weight_decay", "gamma", "selection", "temperature",
                            "test_fraction", "bic_val_fraction", "bic_steps",
                            "aux_loss_weight", "balanced_finetune_epochs"})
# The quantization options: recipe overrides; None keeps the recipe's default.
QUANT_KEYS = ("bits", "acc_bits", "tile", "saturate_backward", "hadamard_rule", "hadamard_select",
              "forward_hadamard", "backward_scales", "weight_scales", "group")
# The options TrainConfig validates (and the learners use); the optional ones are
# passed only when set, so that unset ones keep the learner's default.
TRAIN_KEYS = ("epochs", "lr", "batch_size", "momentum", "weight_decay", "milestones", "gamma",
              "memory", "selection", "temperature", "device")
OPTIONAL_TRAIN_KEYS = ("bic_val_fraction", "bic_steps", "aux_loss_weight",
                       "balanced_finetune_epochs")
COMMAND_LINE = "the command line"

_HAR = dict(backbone="fcnet", epochs=100, lr=0.01, memory=200, init_classes=2,
            increment=2, batch_size=128, momentum=0.9)
# DSADS has 19 classes, which 2 + 2k cannot split: its first task takes 3.
_DSADS = {**_HAR, "init_classes": 3}
# Per-dataset defaults. HAR and CIFAR-100 follow the paper. Fashion-MNIST is not
# in the paper: a short step schedule that keeps a CPU run in tens of minutes.
# Digits is the embedded demo: sized so `hdqt` with no arguments (iCaRL, fp32
# against hdqt) finishes in about two minutes on two CPU cores.
DATASET_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "dsads": MappingProxyType(_DSADS),
    "hapt": MappingProxyType(dict(_HAR)),
    "pamap2": MappingProxyType(dict(_HAR)),
    "cifar100": MappingProxyType(dict(
        backbone="resnet32", epochs=170, lr=0.05, milestones=(60, 100, 140), gamma=0.1,
        weight_decay=2e-4, memory=2000, init_classes=20, increment=20)),
    "fashion_mnist": MappingProxyType(dict(
        backbone="convnet", epochs=15, lr=0.05, milestones=(10,), gamma=0.1,
        weight_decay=2e-4, memory=1000, init_classes=2, increment=2)),
    "digits": MappingProxyType(dict(
        backbone="fcnet", epochs=15, lr=0.01, memory=100, init_classes=2, increment=2,
        batch_size=32)),
})
DEFAULT_DATASET = "digits"
DEFAULT_METHOD = "icarl"
DEFAULT_RECIPE = "hdqt"
DEFAULT_COMPARE = ("fp32", "hdqt")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run configuration file; unknown keys are an error naming key and file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--config: file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config: {path} is not valid TOML: {error}") from None
    known = set(CONFIG_KEYS) | set(RUN_KEYS)
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"{path}: unknown key {key!r}; valid keys: {', '.join(sorted(known))}")
        if isinstance(value, dict):
            raise ConfigError(f"{path}: key {key!r} must be a value, not a table")
    return values


def parse_int_list(text: str | list | tuple, name: str) -> tuple[int, ...]:
    """'60,100,140' or [60, 100, 140] -> (60, 100, 140)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(_as_int(item, name) for item in items if str(item).strip() != "")
    except ConfigError:
        raise ConfigError(f"{name} must be a list of integers, got {text!r}") from None


def parse_name_list(text: str | list | tuple, name: str) -> tuple[str, ...]:
    """'fp32,hdqt' or ["fp32", "hdqt"] -> ("fp32", "hdqt"), blanks dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(str(item).strip() for item in items if str(item).strip())
    if not names:
        raise ConfigError(f"{name} needs at least one name, got {text!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{name} lists a name twice: {text!r}")
    return names


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{name} must be an integer, got {value!r}")


def _coerce(key: str, value: Any, source: str) -> Any:
    where = f"{key} (from {source})"
    if value is None:
        return None
    if key == "input_clip":
        return _input_clip(value, where)
    if key in _INT_KEYS:
        return _as_int(value, where)
    if key in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if key in _STR_KEYS:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if key == "milestones":
        return parse_int_list(value, where)
    raise ConfigError(f"unknown configuration key {key!r}")  # programming error guard


def _input_clip(value: Any, where: str) -> float | None:
    """A bound in standard deviations (> 0), or 0 / "none" for unbounded inputs (stored
    as 0); the default bound (3) is stored as None, so that it is one identity."""
    from hdqt.data import DEFAULT_CLIP

    if isinstance(value, str) and value.strip().lower() == "none":
        return 0.0
    try:
        if isinstance(value, bool):
            raise ValueError
        clip = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number of standard deviations or none, got {value!r}") from None
    if not clip >= 0 or clip == float("inf"):
        raise ConfigError(f"{where} must be > 0 (standard deviations) or none (0), got {value!r}")
    return None if clip == DEFAULT_CLIP else clip


def data_clip(config: "RunConfig") -> float | None:
    """The ``clip`` of ``hdqt.data.prepare`` for ``config``: its bound, or None (unbounded)."""
    from hdqt.data import DEFAULT_CLIP

    if config.input_clip is None:
        return DEFAULT_CLIP
    return None if config.input_clip == 0 else config.input_clip


def scaled_milestones(milestones: tuple[int, ...], default_epochs: int, epochs: int) -> tuple[int, ...]:
    """Move default milestones to the same fractions of a shorter or longer schedule.

    Without this, ``--epochs 10`` on CIFAR-100 would keep milestones 60/100/140 and
    the learning rate would silently never decay.
    """
    scaled = {round(m * epochs / default_epochs) for m in milestones}
    return tuple(sorted(m for m in scaled if 0 < m < epochs))


def resolve_config(file_values: Mapping[str, Any] | None = None,
                   flag_values: Mapping[str, Any] | None = None,
                   *, source: str = "the config file",
                   choices: "Choices | None" = None) -> RunConfig:
    """Merge dataset defaults < file < flags into a validated RunConfig.

    ``flag_values`` holds only the flags the user gave (None values are ignored).
    ``choices`` lists the valid names; by default they are read from the installed
    engine, data, model and learner registries.
    """
    layers = [(source, file_values or {}), (COMMAND_LINE, flag_values or {})]
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer_name, layer in layers:
        for key, value in layer.items():
            if key in RUN_KEYS or value is None:
                continue
            if key not in CONFIG_KEYS:
                raise ConfigError(f"{layer_name}: unknown key {key!r}; valid keys: "
                                  f"{', '.join(CONFIG_KEYS)}")
            merged[key] = _coerce(key, value, layer_name)
            origin[key] = layer_name

    choices = choices or Choices.installed()
    dataset = merged.setdefault("dataset", DEFAULT_DATASET)
    _check_choice("dataset", dataset, choices.datasets, origin)
    defaults = dict(DATASET_DEFAULTS.get(dataset, {}))
    if "milestones" not in merged and "epochs" in merged and defaults.get("milestones"):
        defaults["milestones"] = scaled_milestones(
            defaults["milestones"], defaults["epochs"], merged["epochs"])
    for key, value in defaults.items():
        merged.setdefault(key, value)
    merged.setdefault("method", DEFAULT_METHOD)
    merged.setdefault("recipe", DEFAULT_RECIPE)
    from hdqt.experiments.scheduling import fill_schedule_defaults

    fill_schedule_defaults(merged)
    missing = [f.name for f in _FIELDS if f.default is dataclasses.MISSING and f.name not in merged]
    if missing:
        raise ConfigError(f"dataset {dataset!r} has no default for {', '.join(missing)}; "
                          f"set them in the config file or with flags")
    config = RunConfig.from_dict(merged)
    validate(config, choices, origin)
    return config


@dataclass(frozen=True)
class Choices:
    """Valid names for the fields that pick a registered component, and the devices
    of this machine (``"cpu"``, ``"cuda:0"``...)."""

    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    recipes: tuple[str, ...]
    backbones: tuple[str, ...]
    selections: tuple[str, ...] = ("herding", "random")
    devices: tuple[str, ...] = ("cpu",)

    @classmethod
    def installed(cls) -> "Choices":
        # Imported here: the registries pull in torch and the learners, which the
        # CLI should only pay for once it actually runs.
        import hdqt
        from hdqt.cl.learners import list_learners
        from hdqt.cl.memory import SELECTIONS
        from hdqt.data import list_datasets
        from hdqt.models import list_models

        return cls(tuple(list_datasets()), tuple(list_learners()),
                   tuple(hdqt.list_recipes()), tuple(list_models()), tuple(SELECTIONS),
                   available_devices())


def available_devices() -> tuple[str, ...]:
    """The torch devices this process can use: cpu, then cuda:i, mps, xpu:i."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [f"xpu:{i}" for i in range(xpu.device_count())]
    return tuple(devices)


def key_name(key: str, origin: Mapping[str, str] | None = None) -> str:
    """How to name ``key`` in a message: the flag it was given with (``--acc-bits``),
    the key and the file (``acc_bits (from run.toml)``), or the bare key (a default)."""
    where = (origin or {}).get(key)
    if where == COMMAND_LINE and key not in FILE_ONLY_KEYS:
        return "--" + key.replace("_", "-")
    return f"{key} (from {where})" if where else key


def _check_choice(key: str, value: str, valid: tuple[str, ...], origin: Mapping[str, str]) -> None:
    if value not in valid:
        where = f" (from {origin[key]})" if key in origin else ""
        raise ConfigError(f"unknown {key} {value!r}{where}; valid choices: {', '.join(valid)}")


def _under_name(key: str, origin: Mapping[str, str] | None, check, *args) -> None:
    """Run another layer's ``check(*args)``; its ValueError, whose message starts with
    ``key``, becomes a ConfigError naming the flag or TOML key instead."""
    try:
        check(*args)
    except ValueError as error:
        message = str(error)
        if message.startswith(key + " "):
            message = message[len(key) + 1:]
        raise ConfigError(f"{key_name(key, origin)} {message}") from None


def _check_acc_bits(value: int) -> None:
    # 0 is this layer's spelling of "unlimited" (the engine's None); the engine's
    # QuantPolicy holds the range.
    from hdqt.quantization import QuantPolicy

    if value != 0:
        try:
            QuantPolicy(acc_bits=value)
        except ValueError as error:
            raise ValueError(str(error).replace("None (unlimited)", "0 (unlimited)")) from None


def _check_group(value: int) -> None:
    from hdqt.quantization.scaling import check_group

    try:
        check_group(value)
    except ValueError:
        raise ValueError(f"must be 0 (one group per row) or a power of two >= 2, got {value}") from None


def _check_tile(value: int) -> None:
    # 0 is this layer's spelling of "the whole reduction" (the engine's None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be 0 (the whole reduction, one tile) or an integer >= 1, got {value!r}")


def _check_policy_field(key: str, value: Any) -> None:
    from hdqt.quantization import QuantPolicy

    QuantPolicy(**{key: value})


# The command line's and TOML's 0 for the engine's None: acc_bits 0 (unlimited), tile 0
# (the whole reduction is one tile), group 0 (one beta per row).
ZERO_MEANS_NONE = frozenset({"acc_bits", "tile", "group"})


def engine_values(knobs: Mapping[str, Any]) -> dict[str, Any]:
    """``knobs`` for ``hdqt.recipe``: each ZERO_MEANS_NONE key given as 0 becomes None."""
    return {key: None if key in ZERO_MEANS_NONE and value == 0 else value for key, value in knobs.items()}


def policy_overrides(config: RunConfig) -> dict[str, Any]:
    """The ``hdqt.recipe`` overrides of ``config``: the quantization options it sets
    (acc_bits 0 becomes the engine's None, unlimited). fp32 quantizes nothing and
    takes none of them but ``bits``, which the recipe validates and ignores."""
    overrides = engine_values({key: getattr(config, key) for key in QUANT_KEYS
                               if getattr(config, key) is not None})
    if config.recipe == "fp32":
        overrides = {key: value for key, value in overrides.items() if key == "bits"}
    return overrides


def check_quantization(config: RunConfig, origin: Mapping[str, str] | None = None) -> None:
    """The quantization options by the engine's rules, whatever the recipe: fp32
    ignores them, but a typo should not wait for the run of another recipe. Then the
    recipe's policy with them, for the rules that tie options together (an
    accumulator too narrow for one product of two codes)."""
    import hdqt
    from hdqt.quantization.formats import check_bits

    if config.bits is not None:
        _under_name("bits", origin, check_bits, config.bits)
    if config.acc_bits is not None:
        _under_name("acc_bits", origin, _check_acc_bits, config.acc_bits)
    if config.group:
        _under_name("group", origin, _check_group, config.group)
    if config.tile is not None:
        _under_name("tile", origin, _check_tile, config.tile)
    for key in ("saturate_backward", "hadamard_rule", "hadamard_select", "forward_hadamard"):
        if getattr(config, key) is not None:
            _under_name(key, origin, _check_policy_field, key, getattr(config, key))
    if config.backward_scales is not None:
        from hdqt.quantization.recipes import check_backward_scales

        _under_name("backward_scales", origin, check_backward_scales, config.backward_scales)
    if config.weight_scales is not None:
        from hdqt.quantization.recipes import check_weight_scales

        _under_name("weight_scales", origin, check_weight_scales, config.weight_scales)
    if config.recipe == "fp32":
        return
    try:
        hdqt.recipe(config.recipe, **policy_overrides(config))
    except ValueError as error:
        given = [f"{key_name(key, origin)} {_shown(getattr(config, key))}" for key in QUANT_KEYS
                 if getattr(config, key) is not None]
        message = str(error).replace("acc_bits=None (unlimited)", "acc_bits 0 (unlimited)")
        raise ConfigError(f"the {config.recipe} recipe with {', '.join(given)}: "
                          f"{message}") from None


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def train_config(config: RunConfig, origin: Mapping[str, str] | None = None):
    """The learners' TrainConfig for ``config``; its errors name the flag or key."""
    from hdqt.cl.learners.config import TrainConfig, TrainConfigError

    values = {key: getattr(config, key) for key in TRAIN_KEYS}
    values["milestones"] = tuple(config.milestones)
    values.update({key: getattr(config, key) for key in OPTIONAL_TRAIN_KEYS
                   if getattr(config, key) is not None})
    try:
        return TrainConfig(**values)
    except TrainConfigError as error:
        raise ConfigError(f"{key_name(error.key, origin)} {error.detail}") from None


def check_device(device: str, devices: tuple[str, ...],
                 origin: Mapping[str, str] | None = None) -> None:
    """``device`` must be one of ``devices``, or a bare type of one ("cuda")."""
    kind = device.partition(":")[0]
    if device in devices or (kind == device and any(d.partition(":")[0] == kind
                                                    for d in devices)):
        return
    note = ""
    if kind == "cuda" and not any(d.startswith("cuda") for d in devices):
        note = " (torch sees no CUDA device here: a CPU-only torch build, or no GPU)"
    raise ConfigError(f"{key_name('device', origin)} {device!r} is not a device of this "
                      f"machine{note}; devices here: {', '.join(devices)}")


def validate(config: RunConfig, choices: Choices, origin: Mapping[str, str] | None = None) -> None:
    """Check names, devices and ranges; the split is checked once the data says how
    many classes there are."""
    from hdqt.cl.scenario import check_task_size

    origin = origin or {}
    _check_choice("dataset", config.dataset, choices.datasets, origin)
    _check_choice("method", config.method, choices.methods, origin)
    _check_choice("recipe", config.recipe, choices.recipes, origin)
    _check_choice("backbone", config.backbone, choices.backbones, origin)
    _check_choice("selection", config.selection, choices.selections, origin)
    for key in ("init_classes", "increment"):
        _under_name(key, origin, check_task_size, key, getattr(config, key))
    if config.diagnose_every < 0:
        raise ConfigError(f"{key_name('diagnose_every', origin)} must be 0 (off) or a number of "
                          f"training steps, got {config.diagnose_every}")
    if config.train_per_class is not None and config.train_per_class < 1:
        raise ConfigError(f"{key_name('train_per_class', origin)} must be a number of samples "
                          f">= 1, got {config.train_per_class}")
    if not 0.0 < config.test_fraction < 1.0:
        raise ConfigError(f"{key_name('test_fraction', origin)} must be in (0, 1), "
                          f"got {config.test_fraction}")
    check_quantization(config, origin)
    train_config(config, origin)
    from hdqt.experiments.scheduling import check_schedule

    check_schedule(config, choices.recipes, origin)
    check_device(config.device, choices.devices, origin)
