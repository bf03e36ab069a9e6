"""Experiments: the `hdqt run` command (config, runner with resume, reports).

    from hdqt.experiments import resolve_config, run_experiment
    config = resolve_config(None, {"dataset": "digits", "recipe": "hdqt", "epochs": 5})
    result = run_experiment(config, "runs/mine")   # resumes if runs/mine holds this run
    result.metrics["avg_incremental_accuracy"]

``resolve_config`` merges dataset defaults < file values < flag values into a
validated ``RunConfig``; ``run_experiment`` runs it task by task, writing
config, metrics, a per-task CSV and a checkpoint after every task.
"""
from __future__ import annotations

import importlib

# Loaded on first use (PEP 562): the runner imports torch, which the command
# line's parser (hdqt.experiments.cli) must not pay for.
_LAZY_NAMES = {
    "ConfigError": "hdqt.experiments.config",
    "RunConfig": "hdqt.experiments.config",
    "load_toml": "hdqt.experiments.config",
    "resolve_config": "hdqt.experiments.config",
    "RunResult": "hdqt.experiments.runner",
    "run_experiment": "hdqt.experiments.runner",
}

__all__ = ["ConfigError", "RunConfig", "RunResult", "load_toml", "resolve_config",
           "run_experiment"]


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hdqt.experiments' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))
