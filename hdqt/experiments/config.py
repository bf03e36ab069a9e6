"""The resolved configuration of one `hdqt run` experiment.

Values come from three layers, later layers winning: the defaults of the chosen
dataset (``DATASET_DEFAULTS``), a TOML file (``--config``) and command-line flags.
``resolve_config`` merges the layers and validates the result; every error names
the offending key (and file) and says what was expected.
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
    acc_bits: int | None = None
    tile: int | None = None
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
    # Where the run happens, not what it computes: ignored when checking that a
    # resumed run has the same configuration (see ``identity``).
    data_root: str | None = field(default=None, compare=False)
    device: str = field(default="cpu", compare=False)

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
             "acc_bits", "tile", "batch_size", "bic_steps", "balanced_finetune_epochs"}
_FLOAT_KEYS = {"lr", "momentum", "weight_decay", "gamma", "temperature", "test_fraction",
               "bic_val_fraction", "aux_loss_weight"}
_STR_KEYS = {"dataset", "method", "recipe", "backbone", "selection", "data_root", "device"}

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
    if key == "milestones":
        return parse_int_list(value, where)
    raise ConfigError(f"unknown configuration key {key!r}")  # programming error guard


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
    layers = [(source, file_values or {}), ("the command line", flag_values or {})]
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
    missing = [f.name for f in _FIELDS if f.default is dataclasses.MISSING and f.name not in merged]
    if missing:
        raise ConfigError(f"dataset {dataset!r} has no default for {', '.join(missing)}; "
                          f"set them in the config file or with flags")
    config = RunConfig.from_dict(merged)
    validate(config, choices, origin)
    return config


@dataclass(frozen=True)
class Choices:
    """Valid names for the fields that pick a registered component."""

    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    recipes: tuple[str, ...]
    backbones: tuple[str, ...]
    selections: tuple[str, ...] = ("herding", "random")

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
                   tuple(hdqt.list_recipes()), tuple(list_models()), tuple(SELECTIONS))


def _check_choice(key: str, value: str, valid: tuple[str, ...], origin: Mapping[str, str]) -> None:
    if value not in valid:
        where = f" (from {origin[key]})" if key in origin else ""
        raise ConfigError(f"unknown {key} {value!r}{where}; valid choices: {', '.join(valid)}")


def validate(config: RunConfig, choices: Choices, origin: Mapping[str, str] | None = None) -> None:
    """Check ranges and names; the split is checked once the data says how many classes."""
    origin = origin or {}
    _check_choice("dataset", config.dataset, choices.datasets, origin)
    _check_choice("method", config.method, choices.methods, origin)
    _check_choice("recipe", config.recipe, choices.recipes, origin)
    _check_choice("backbone", config.backbone, choices.backbones, origin)
    _check_choice("selection", config.selection, choices.selections, origin)
    positive = {"epochs": config.epochs, "lr": config.lr, "batch_size": config.batch_size,
                "init_classes": config.init_classes, "increment": config.increment,
                "temperature": config.temperature}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key in ("memory", "weight_decay", "momentum", "gamma"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(config, key)}")
    if not 0.0 < config.test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {config.test_fraction}")
    ms = config.milestones
    if list(ms) != sorted(set(ms)) or any(m <= 0 or m >= config.epochs for m in ms):
        raise ConfigError(
            f"milestones must be increasing epochs in 1..{config.epochs - 1} (epochs is "
            f"{config.epochs}), got {list(ms)}: a milestone at or after the last epoch "
            f"would never decay the learning rate")

