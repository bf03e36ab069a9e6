"""Find run directories, read them, and group them by everything but the seed.

A run directory is a folder holding both ``config.json`` and ``metrics.json`` (as
``hdqt run`` writes them); folders given to ``find_runs`` are searched recursively,
so a benchmark or sweep folder yields all of its runs. Runs that are alike but for
the seed form a ``Group``; its statistics are the mean and the sample standard
deviation (n - 1) over its complete runs (a run still going, or stopped, is listed
but left out of the numbers).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

# The quantization options, taken as the run resolved them (config.json's "quantization").
from hdqt.experiments.config import QUANT_KEYS, RunConfig

CONFIG_JSON = "config.json"
METRICS_JSON = "metrics.json"
DIAGNOSTICS_JSONL = "diagnostics.jsonl"
METRICS = ("avg_incremental_accuracy", "last_accuracy", "forgetting", "backward_transfer")


def _identity_keys() -> tuple[str, ...]:
    """The configuration keys that say what a run computes (RunConfig's identity), but the seed."""
    return tuple(f.name for f in fields(RunConfig) if f.compare and f.name != "seed")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    quantization: dict[str, Any]
    policy: dict[str, Any] | None
    metrics: dict[str, Any]
    diagnostics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def complete(self) -> bool:
        return bool(self.metrics.get("complete"))

    def setting(self, key: str) -> Any:
        """A configuration value, the quantization options as the run resolved them."""
        if key in QUANT_KEYS and key in self.quantization:
            return self.quantization[key]
        return self.config.get(key)

    def classifier(self, wanted: str | None) -> str | None:
        """``wanted`` if the run has it, else its primary classifier."""
        if wanted and isinstance(self.metrics.get(wanted), dict):
            return wanted
        return self.metrics.get("primary_classifier")

    def values(self, classifier: str | None) -> dict[str, Any]:
        """The classifier's metrics (``METRICS`` and ``incremental_accuracy``)."""
        name = self.classifier(classifier)
        return self.metrics.get(name, {}) if name else {}


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_diagnostics(path: Path) -> list[dict[str, Any]]:
    """diagnostics.jsonl's records (a torn last line is skipped)."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("layers"), list):
            records.append(record)
    return records


def read_run(path: Path) -> Run:
    path = Path(path)
    stored = _read_json(path / CONFIG_JSON)
    metrics = _read_json(path / METRICS_JSON)
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict) or not isinstance(metrics, dict):
        raise ValueError(f"{path}: config.json or metrics.json is not a run's")
    return Run(path, stored["config"], stored.get("quantization") or {}, stored.get("policy"), metrics,
               read_diagnostics(path / DIAGNOSTICS_JSONL))


def find_runs(paths: Iterable[str | Path]) -> tuple[list[Run], list[str]]:
    """Every run directory at or under ``paths``, sorted by path, and the problems met
    (a folder with unreadable files, or a path that does not exist)."""
    found: dict[Path, None] = {}
    problems = []
    for path in map(Path, paths):
        if not path.exists():
            problems.append(f"{path}: no such file or directory")
            continue
        candidates = [path] if (path / METRICS_JSON).is_file() else []
        candidates += [m.parent for m in sorted(path.rglob(METRICS_JSON))]
        for folder in candidates:
            if (folder / CONFIG_JSON).is_file():
                found[folder.resolve()] = None
    runs = []
    for folder in sorted(found):
        try:
            runs.append(read_run(folder))
        except (OSError, ValueError) as error:
            problems.append(f"{folder}: {error}")
    return runs, problems


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (None for one value) of n values."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> "Stat":
        xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not xs:
            return cls(None, None, 0)
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
        return cls(mean, std, len(xs))

    def text(self, digits: int = 2) -> str:
        if self.mean is None:
            return "-"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass
class Group:
    """Runs alike but for the seed."""

    key: tuple[tuple[str, Any], ...]
    runs: list[Run]
    label: str = ""
    energy_estimated: bool = False  # energy computed by the report (missing in metrics.json)
    energies: list[float | None] = field(default_factory=list)  # total pJ per complete run

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.key)

    @property
    def dataset(self) -> str:
        return str(self.settings.get("dataset"))

    @property
    def complete_runs(self) -> list[Run]:
        return [r for r in self.runs if r.complete]

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.complete_runs)

    def classifier(self, wanted: str | None) -> str | None:
        names = {r.classifier(wanted) for r in self.complete_runs}
        return names.pop() if len(names) == 1 else None

    def stat(self, metric: str, classifier: str | None) -> Stat:
        return Stat.of(r.values(classifier).get(metric) for r in self.complete_runs)

    def per_task(self, classifier: str | None) -> list[Stat]:
        """Accuracy on the classes seen after each task, over seeds."""
        curves = [r.values(classifier).get("incremental_accuracy") or [] for r in self.complete_runs]
        tasks = max((len(c) for c in curves), default=0)
        return [Stat.of(c[t] if t < len(c) else None for c in curves) for t in range(tasks)]

    def energy_uj(self) -> Stat:
        return Stat.of(None if e is None else e / 1e6 for e in self.energies)

    def _saturation(self) -> list[list[dict]]:
        series = []
        for run in self.complete_runs:
            tasks = run.metrics.get("saturation")
            if isinstance(tasks, list):
                series.append([t if isinstance(t, dict) else {} for t in tasks])
        return series

    def saturation_per_task(self) -> list[Stat]:
        """Per task, the share (%) of the forward tile sums that saturated during the task's
        training, over seeds (``metrics.json``'s ``saturation``); empty when no run counted."""
        series = self._saturation()
        tasks = max((len(s) for s in series), default=0)
        return [Stat.of(100.0 * s[t]["share"] if t < len(s) and "share" in s[t] else None for s in series)
                for t in range(tasks)]

    def most_saturated_layer(self) -> tuple[str, Stat] | None:
        """The layer whose saturated share (%), averaged over tasks and seeds, is the largest."""
        shares: dict[str, list[float]] = {}
        for series in self._saturation():
            for task in series:
                for name, stats in (task.get("layers") or {}).items():
                    shares.setdefault(name, []).append(100.0 * stats["share"])
        if not shares:
            return None
        name = max(shares, key=lambda n: (sum(shares[n]) / len(shares[n]), n))
        return name, Stat.of(shares[name])


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups of runs that differ in the seed only, sorted by dataset, method, recipe and
    then the other settings; each labelled by method, recipe and the settings that vary
    between the groups of its dataset."""
    keys = _identity_keys()
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = tuple((k, _hashable(run.setting(k))) for k in keys)
        groups.setdefault(key, Group(key, [])).runs.append(run)
    ordered = sorted(groups.values(), key=lambda g: tuple(_sort_key(v) for _, v in g.key))
    by_dataset: dict[str, list[Group]] = {}
    for group in ordered:
        group.runs.sort(key=lambda r: (r.seed, str(r.path)))
        by_dataset.setdefault(group.dataset, []).append(group)
    for members in by_dataset.values():
        varying = varying_keys(members)
        for group in members:
            settings = group.settings
            parts = [str(settings.get("method")), str(settings.get("recipe"))]
            parts += [f"{k}={_shown(settings[k])}" for k in varying
                      if k not in ("method", "recipe") and settings.get(k) is not None]
            group.label = " ".join(parts)
        seen: dict[str, int] = {}
        for group in members:  # settings not shown (a recipe's None) could still make twins
            seen[group.label] = seen.get(group.label, 0) + 1
            if seen[group.label] > 1:
                group.label += f" #{seen[group.label]}"
    return ordered


def varying_keys(groups: Sequence[Group]) -> list[str]:
    """The settings whose values differ between ``groups`` (in RunConfig's order). A
    quantization option that only a recipe which quantizes nothing (fp32) lacks does not
    count as varying: fp32 against hdqt at 4 bits is no bit-width sweep."""
    if not groups:
        return []
    keys = [k for k, _ in groups[0].key]
    varying = []
    for k in keys:
        values = {g.settings.get(k) for g in groups}
        if len(values - {None}) > 1 or (len(values) > 1 and k not in QUANT_KEYS):
            varying.append(k)
    return varying


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _sort_key(value: Any) -> tuple:
    if value is None:
        return (0, "")
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, (int, float)):
        return (2, value)
    return (3, str(value))


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)
