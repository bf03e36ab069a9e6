"""Experiments: the `hdqt run` command (config, runner with resume, reports).

    from hdqt.experiments import resolve_config, run_experiment
    config = resolve_config(None, {"dataset": "digits", "recipe": "hdqt", "epochs": 5})
    result = run_experiment(config, "runs/mine")   # resumes if runs/mine holds this run
    result.metrics["avg_incremental_accuracy"]

``resolve_config`` merges dataset defaults < file values < flag values into a
validated ``RunConfig``; ``run_experiment`` runs it task by task, writing
config, metrics, a per-task CSV and a checkpoint after every task.
"""
from hdqt.experiments.config import ConfigError, RunConfig, load_toml, resolve_config
from hdqt.experiments.runner import RunResult, run_experiment

__all__ = ["ConfigError", "RunConfig", "RunResult", "load_toml", "resolve_config",
           "run_experiment"]
