"""Run one class-incremental experiment task by task, with checkpoints and resume.

After every finished task the runner writes, in this order: the checkpoint (the
learner's state, the RNG states and the per-task history), then ``metrics.json``
and ``tasks.csv`` derived from that history. The checkpoint is the source of
truth: a rerun in the same directory loads it and continues with the next task,
and because the learner state and every RNG state are restored, the final
metrics equal those of an uninterrupted run.

With a schedule (``--schedule ctmq``) the runner also writes the checkpoint after
every finished step of a task: the learner's state from before the task, plus the
task's progress (``Learner.schedule_state``, and the saturation counts so far) under
``in_progress``. A rerun then repeats ``before_task``, loads that progress and trains
the remaining steps, with the same final metrics as an uninterrupted run.

Both ``config.json`` and the checkpoint record the code version (a hash of the
package source, see ``fingerprint``). Resuming a run, or reporting a finished
one, made by other code is refused (``StaleRunError``) unless ``force=True``,
which goes on with a ``CodeVersionWarning`` and keeps the earlier versions in
``config.json`` (``previous_code``); ``overwrite=True`` starts afresh instead.
"""
from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from hdqt.experiments import outputs
from hdqt.experiments.config import (QUANT_KEYS, ConfigError, RunConfig, data_clip, policy_overrides,
                                     train_config)
from hdqt.experiments.fingerprint import describe, loaded_code_fingerprint, same_code
from hdqt.experiments.progress import Progress, SilentProgress
from hdqt.experiments.scheduling import describe_steps, schedule_steps
from hdqt.experiments.summary import summarize
from hdqt.quantization import reset_saturation, saturation_report
from hdqt.quantization.recipes import backward_scales_of, weight_scales_of
from hdqt.quantization.runtime import restore_saturation

DIAGNOSTICS_JSONL = "diagnostics.jsonl"  # --diagnose-every (hdqt.diagnostics.tracking)

# 2: tensors and plain data only, read with torch.load(weights_only=True).
CHECKPOINT_VERSION = 2
_REDO = "use --overwrite to rerun it from scratch, or --force to go on with it anyway"


class ConfigMismatchError(ConfigError):
    """The output directory holds a run with a different configuration."""


class StaleRunError(ConfigMismatchError):
    """The output directory holds a run made by other code."""


class CodeVersionWarning(UserWarning):
    """A run is continued (force=True) with code other than the code that started it."""


@dataclass
class RunResult:
    config: RunConfig
    out_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    resumed_after: int = 0  # number of tasks loaded from a checkpoint


def build_policy(config: RunConfig):
    """The engine's QuantPolicy for the configured recipe; unset options (None) keep the
    recipe's defaults. fp32 quantizes nothing and ignores them (they are validated all
    the same, see ``config.check_quantization``), so its policy is always plain fp32."""
    import hdqt

    overrides = policy_overrides(config)
    try:
        return hdqt.recipe(config.recipe, **overrides)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"recipe {config.recipe!r} with {overrides}: {error}") from None


def build_train_config(config: RunConfig):
    """The learners' TrainConfig (its rules are the ones that apply, see config.train_config)."""
    return train_config(config)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_states() -> dict[str, Any]:
    """The global RNG states as tensors and plain data (see outputs.to_plain)."""
    version, python_state, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": list(python_state), "gauss": gauss},
            "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state()}


def _restore_rng_states(states: Mapping[str, Any]) -> None:
    python, numpy_state = states["python"], states["numpy"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    np.random.set_state((numpy_state["kind"], numpy_state["key"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(states["torch"])


def check_out_dir(config: RunConfig, out_dir: Path, overwrite: bool, code: dict[str, Any],
                  force: bool = False) -> list:
    """May ``config``, run by ``code``, go on in ``out_dir``? Reads, never writes.

    A folder without results (no checkpoint, no metrics: a run stopped before its
    first task finished, or one whose data failed to load) is free: there is nothing
    to resume or protect. Otherwise it must hold the same configuration, made by the
    same code (or ``force``). Returns the earlier code versions to keep on record.
    """
    config_path = out_dir / outputs.CONFIG_JSON
    has_results = any((out_dir / name).exists()
                      for name in (outputs.CHECKPOINT, outputs.METRICS_JSON))
    if overwrite or not has_results or not config_path.exists():
        return []
    _check_same_config(config, config_path)
    stored = outputs.read_json(config_path)
    previous = list(stored.get("previous_code", []))
    if not same_code(stored.get("code"), code):
        _stale(f"{out_dir} holds a run made by {describe(stored.get('code'))}; this is "
               f"{describe(code)}", force)
        previous.append(stored.get("code"))
    return previous


def claim_out_dir(config: RunConfig, out_dir: Path, overwrite: bool, code: dict[str, Any],
                  previous: list) -> None:
    """Write ``config``'s files into ``out_dir`` (after ``check_out_dir`` allowed it);
    ``overwrite`` first removes the files of the run that was there."""
    if overwrite:
        for name in outputs.RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
    policy = build_policy(config)
    quantization = resolved_quantization(config, policy)
    payload = {"config": config.to_dict(), "quantization": quantization,
               "policy": policy.to_dict(), "code": code}
    steps = schedule_steps(config)
    if steps:  # each step's width, epochs and policy (the last of a descent: the run's own)
        payload["schedule"] = describe_steps(steps)
    if previous:
        payload["previous_code"] = previous
    outputs.write_json(out_dir / outputs.CONFIG_JSON, payload)
    header = ["Resolved configuration of this run; reuse it with "
              "`hdqt run --config config.toml`."]
    if quantization.get("from_recipe"):
        shown = ", ".join(f"{key} = {outputs.toml_value(quantization[key])}"
                          for key in quantization["from_recipe"])
        header.append(f"Not set, so the {config.recipe} recipe's defaults apply: {shown}.")
    elif "note" in quantization:
        header.append(quantization["note"])
    outputs.write_text(out_dir / outputs.CONFIG_TOML,
                       outputs.to_toml(config.to_dict(), header="\n".join(header)))


def resolved_quantization(config: RunConfig, policy) -> dict[str, Any]:
    """The quantization options the run uses: the configured ones, and the recipe's
    defaults for those left unset (None in ``config``; listed in ``from_recipe``).
    ``acc_bits`` 0 means unlimited, as on the command line."""
    if policy.is_float:
        return {"note": f"The {config.recipe} recipe trains in float32: "
                        f"{', '.join(QUANT_KEYS)} do not apply."}
    bits = getattr(getattr(policy.forward_weight, "format", None), "bits", None)
    values = {"bits": bits, "acc_bits": 0 if policy.acc_bits is None else policy.acc_bits,
              "tile": policy.tile, "saturate_backward": policy.saturate_backward,
              "hadamard_rule": policy.hadamard_rule, "hadamard_select": policy.hadamard_select,
              "forward_hadamard": policy.forward_hadamard, "backward_scales": backward_scales_of(policy),
              "weight_scales": weight_scales_of(policy)}
    if policy.is_binary:  # hadanet's group (0: one per row); other recipes have none
        values["group"] = policy.binary_group or 0
    return {**values, "hadamard": policy.hadamard,
            "from_recipe": [key for key in QUANT_KEYS if getattr(config, key) is None and key in values]}


def prepare_out_dir(config: RunConfig, out_dir: Path, overwrite: bool,
                    code: dict[str, Any] | None = None, force: bool = False) -> None:
    """Claim ``out_dir`` for ``config`` made by ``code``: a new run, a resume of the same
    one, or --overwrite (``check_out_dir``, then ``claim_out_dir``)."""
    code = code or loaded_code_fingerprint()
    claim_out_dir(config, out_dir, overwrite, code,
                  check_out_dir(config, out_dir, overwrite, code, force))


def _stale(message: str, force: bool) -> None:
    if not force:
        raise StaleRunError(f"{message}; its results would mix code versions: {_REDO}")
    warnings.warn(f"{message}; going on (--force), the results mix code versions",
                  CodeVersionWarning, stacklevel=3)


def _check_same_config(config: RunConfig, config_path: Path) -> None:
    hint = "use another --out, or --overwrite to discard that run"
    try:
        stored = RunConfig.from_dict(outputs.read_json(config_path)["config"]).identity()
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigMismatchError(f"{config_path} is not a config this version can read "
                                  f"({error}); {hint}") from None
    wanted = config.identity()
    changed = [f"{key}: {stored[key]!r} -> {wanted[key]!r}" for key in wanted
               if stored.get(key) != wanted[key]]
    if changed:
        raise ConfigMismatchError(f"{config_path.parent} holds a run with a different "
                                  f"configuration ({', '.join(changed)}); {hint}")


def run_experiment(config: RunConfig, out_dir: str | Path, *, overwrite: bool = False,
                   force: bool = False, progress: Progress | None = None,
                   on_step: Callable[..., None] | None = None) -> RunResult:
    """Run (or resume, or just report) the experiment in ``out_dir``; ``force`` goes on
    with a run made by other code (see the module docstring). ``on_step`` is called
    before every optimizer step as ``on_step(learner, x, y, task_index, stage)`` (the
    learner's hook; with ``--diagnose-every`` the diagnostics run first), for a caller's
    own measurements of the training."""
    from hdqt.cl.learners import create_learner
    from hdqt.cl.scenario import ClassIncrementalScenario, check_split
    from hdqt.data import prepare

    out_dir = Path(out_dir)
    progress = progress or SilentProgress()
    code = loaded_code_fingerprint()
    # Nothing is written before the data has loaded and the learner is built: a run
    # that fails there leaves --out as it found it.
    previous = check_out_dir(config, out_dir, overwrite, code, force)

    data = prepare(config.dataset, root=config.data_root, seed=config.seed,
                   test_fraction=config.test_fraction, clip=data_clip(config),
                   train_per_class=config.train_per_class)
    num_classes = len(data.class_names)
    try:
        check_split(num_classes, config.init_classes, config.increment)
    except ValueError as error:
        raise ConfigError(f"impossible split for {config.dataset} ({num_classes} classes): "
                          f"{error}") from None
    scenario = ClassIncrementalScenario(
        data.x_train, data.y_train, data.x_test, data.y_test,
        init_classes=config.init_classes, increment=config.increment, seed=config.seed)
    seed_everything(config.seed)
    try:
        learner = create_learner(
            config.method, backbone=config.backbone, input_shape=data.input_shape,
            num_classes=num_classes, policy=build_policy(config),
            config=build_train_config(config), seed=config.seed, augment=data.augment,
            schedule=schedule_steps(config))
    except ValueError as error:  # e.g. a memory too small for the classes
        raise ConfigError(f"method {config.method!r}: {error}") from None
    claim_out_dir(config, out_dir, overwrite, code, previous)

    history: list[dict[str, Any]] = []
    in_progress = None  # a task stopped between two schedule steps
    checkpoint_path = out_dir / outputs.CHECKPOINT
    if checkpoint_path.exists():
        try:
            state = outputs.read_checkpoint(checkpoint_path)
        except outputs.CheckpointError as error:
            raise ConfigError(str(error)) from None
        _check_checkpoint(state, config, scenario, checkpoint_path)
        if not same_code(state.get("code"), code):
            _stale(f"{checkpoint_path} was written by {describe(state.get('code'))}; this is "
                   f"{describe(code)}", force)
        learner.load_state_dict(state["learner"])
        _restore_rng_states(state["rng"])
        history = list(state["history"])
        in_progress = state.get("in_progress")
    resumed_after = len(history)
    _track_diagnostics(learner, config, out_dir / DIAGNOSTICS_JSONL, resumed_after)
    if on_step is not None:
        learner.on_step = _both_hooks(learner.on_step, on_step)

    progress.run_started(config, scenario.num_tasks, resumed_after)
    for task in scenario.tasks[resumed_after:]:
        progress.task_started(task, scenario.num_tasks)
        started = time.perf_counter()
        # A schedule checkpoints between its steps: the learner as it was before the task,
        # plus the task's progress.
        before_task = learner.state_dict() if learner.schedule else None
        learner.before_task(task)
        reset_saturation(learner.network)  # this task's training: not an earlier task's, not evaluation
        if in_progress is not None:
            learner.load_schedule_state(in_progress["learner"])
            restore_saturation(learner.network, in_progress["saturation"])
            progress.steps_resumed(in_progress["learner"]["steps_done"], len(learner.schedule))
            in_progress = None

        def save_step(learner, task_index, steps_done, before_task=before_task):
            outputs.write_checkpoint(checkpoint_path, {
                "version": CHECKPOINT_VERSION, "config": config.identity(), "code": code,
                "class_order": [int(c) for c in scenario.class_order], "learner": before_task,
                "rng": _rng_states(), "history": history,
                "in_progress": {"learner": learner.schedule_state(),
                                "saturation": saturation_report(learner.network)}})

        learner.on_schedule_step = save_step
        learner.train_task(task, on_epoch=progress.epoch)
        saturation = saturation_summary(learner.network)
        learner.after_task(task)
        seconds = time.perf_counter() - started
        record = _evaluate(learner, task, scenario, data.class_names, seconds)
        if saturation is not None:
            record["saturation"] = saturation
        history.append(record)
        outputs.write_checkpoint(checkpoint_path, {
            "version": CHECKPOINT_VERSION, "config": config.identity(), "code": code,
            "class_order": [int(c) for c in scenario.class_order],
            "learner": learner.state_dict(), "rng": _rng_states(), "history": history})
        _write_reports(out_dir, config, scenario, history, energy_per_step(learner, config))
        progress.task_finished(record, scenario.num_tasks)

    # Also rewrites the reports of a run that was already complete (cheap, idempotent).
    metrics = _write_reports(out_dir, config, scenario, history, energy_per_step(learner, config))
    result = RunResult(config, out_dir, metrics, history, resumed_after)
    progress.run_finished(result)
    return result


def saturation_summary(network) -> dict[str, Any] | None:
    """The accumulator saturation of a task's training forward products: over all
    layers and per layer, the share of tile sums that saturated and their mean excess
    in accumulator units (``hdqt.quantization.saturation_report``, which counts one
    forward call in a few). None when no layer has a limited accumulator."""
    from hdqt.quantization import saturation_report

    layers = {name: stats for name, stats in saturation_report(network).items() if stats["tiles"]}
    if not layers:
        return None
    tiles = sum(stats["tiles"] for stats in layers.values())
    saturated = sum(stats["saturated"] for stats in layers.values())
    excess = sum(stats["excess"] for stats in layers.values())
    return {"share": saturated / tiles, "mean_excess": excess / saturated if saturated else 0.0,
            "tiles": tiles, "saturated": saturated,
            "layers": {name: {"share": stats["share"], "mean_excess": stats["mean_excess"]}
                       for name, stats in layers.items()}}


def _check_checkpoint(state: Mapping[str, Any], config: RunConfig, scenario,
                      path: Path) -> None:
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path} has checkpoint version {state.get('version')!r}, "
                          f"expected {CHECKPOINT_VERSION}; use --overwrite to start afresh")
    try:  # through RunConfig: a key added since (at its default) is not a difference
        stored = RunConfig.from_dict(state["config"]).identity()
    except (KeyError, TypeError, ValueError):
        stored = state["config"]
    if stored != config.identity():
        raise ConfigMismatchError(f"{path} was written by a different configuration; "
                                  f"use --overwrite to start afresh")
    if list(state["class_order"]) != [int(c) for c in scenario.class_order]:
        raise ConfigMismatchError(
            f"{path}: the class order differs from this run's (same seed, other data?); "
            f"use --overwrite to start afresh")


def _to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _evaluate(learner, task, scenario, class_names, seconds: float) -> dict[str, Any]:
    """Accuracy (percent) on all seen classes, and row ``task.index`` of the matrix."""
    from hdqt.cl.metrics import accuracy, task_accuracies

    labels = _to_numpy(task.y_test)
    class_to_task = scenario.task_of_class(np.arange(scenario.num_classes))
    accuracies: dict[str, dict[str, Any]] = {}
    for classifier, preds in learner.evaluate(task.x_test, task.y_test).items():
        preds = _to_numpy(preds)
        row = task_accuracies(labels, preds, class_to_task, scenario.num_tasks)
        accuracies[classifier] = {"seen": accuracy(labels, preds),
                                  "per_task": row[: task.index + 1].tolist()}
    original = [int(scenario.class_order[c]) for c in task.classes]
    return {"task": int(task.index), "classes": original,
            "class_names": [str(class_names[c]) for c in original],
            "num_seen_classes": len(task.seen_classes), "train_samples": int(len(task.y_train)),
            "seconds": round(seconds, 3), "accuracy": accuracies}


def _both_hooks(first: Callable[..., None] | None, second: Callable[..., None]) -> Callable[..., None]:
    """One ``on_step`` hook that calls ``first`` (if any), then ``second``."""
    if first is None:
        return second

    def hooks(*args) -> None:
        first(*args)
        second(*args)

    return hooks


def _track_diagnostics(learner, config: RunConfig, path: Path, resumed_after: int) -> None:
    """--diagnose-every: set the learner's diagnostics hook. The records of the tasks this
    run redoes (after a resume) are dropped first, whether or not it tracks again."""
    from hdqt.diagnostics.tracking import DiagnosticsTracker, keep_tasks_before

    keep_tasks_before(path, resumed_after)
    if config.diagnose_every:
        learner.on_step = DiagnosticsTracker(path, config.diagnose_every, seed=config.seed)


def energy_per_step(learner, config: RunConfig) -> dict[str, Any] | None:
    """The cost model's estimate of one training step (``hdqt.cost.estimate``) of the
    learner's network as it stands (after its last task: DER and MEMO grow), under the
    layers' own policies, for the run's input shape and batch. None, with a warning, if
    the estimate fails: an estimate must not stop a run."""
    import copy

    from hdqt.cost import estimate

    try:
        step = estimate(copy.deepcopy(learner.network).cpu(), learner.input_shape, None,
                        batch=config.batch_size)
    except Exception as error:  # noqa: BLE001 - reported, and the run goes on
        warnings.warn(f"no energy estimate for this run: {error}", stacklevel=2)
        return None
    return {"total_pj": step.total_pj, "compute_pj": step.compute_pj,
            "memory_pj": step.memory_pj, "macs": step.macs, "bytes": step.bytes,
            "batch": step.batch, "policy": learner.policy.name if learner.policy else "fp32",
            "energy_table": step.energy_table.source}


def _write_reports(out_dir: Path, config: RunConfig, scenario,
                   history: list[dict[str, Any]],
                   energy: dict[str, Any] | None = None) -> dict[str, Any]:
    metrics = summarize(history, scenario.num_tasks, config.method)
    metrics = {"dataset": config.dataset, "method": config.method, "recipe": config.recipe,
               "seed": config.seed, "class_order": [int(c) for c in scenario.class_order],
               **metrics}
    if energy is not None:
        metrics["energy_per_step"] = energy
    if any("saturation" in record for record in history):  # per task: see saturation_summary
        metrics["saturation"] = [record.get("saturation") for record in history]
    outputs.write_json(out_dir / outputs.METRICS_JSON, metrics)
    classifiers = sorted({name for record in history for name in record["accuracy"]})
    header = ["task", "new_classes", "new_class_names", "num_seen_classes", "train_samples",
              "seconds"]
    header += [f"{name}_accuracy" for name in classifiers]
    rows = []
    for record in history:
        row = [record["task"] + 1, " ".join(map(str, record["classes"])),
               "; ".join(record["class_names"]), record["num_seen_classes"], record["train_samples"], record["seconds"]]
        row += [round(record["accuracy"][name]["seen"], 4) if name in record["accuracy"] else ""
                for name in classifiers]
        rows.append(row)
    outputs.write_csv(out_dir / outputs.TASKS_CSV, header, rows)
    return metrics

