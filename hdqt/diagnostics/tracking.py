"""Gradient diagnostics during a run: ``hdqt run --diagnose-every N``.

A ``DiagnosticsTracker`` is set as the learner's ``on_step`` hook. Every N-th
optimizer step of a task's main training stage (steps counted from 0 within each
task, so step 0 of every task is diagnosed), it runs ``diagnose`` on the batch about
to be trained on, with the network's own policies, and appends one JSON line to
``diagnostics.jsonl`` next to ``metrics.json``:

    {"task": 0, "step": 0, "policy": "hdqt", "batch": 32, "draws": 4,
     "layers": [{"name": "backbone.layer1.0", "kind": "linear", "dx": null,
                 "dw": {"cosine": ..., "rel_bias": ..., ...},
                 "levels": {"grad_output_dw": {"hadamard": {"levels": 15, "hit": 12,
                            "entropy_bits": 2.9}, "plain": {...}}, ...}}, ...]}

The loss is the cross-entropy of the network's logits on the batch's labels (the
method's own loss may add distillation terms; the layers' products are the same).
``diagnose`` works on copies of the network under a forked RNG, so training goes on
exactly as without the tracker: the run's results do not depend on it. Each record
costs about 2 + ``draws`` forward and backward passes of one batch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hdqt.diagnostics.gradients import diagnose, summarize_layers
from hdqt.quantization.runtime import derive_seed

DIAGNOSTICS_JSONL = "diagnostics.jsonl"
TRACK_DRAWS = 4  # enough for a variance, cheap enough to leave on


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a diagnostics.jsonl; a torn last line (a killed run) is skipped."""
    records = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def keep_tasks_before(path: Path, tasks: int) -> None:
    """Drop the records of tasks ``tasks`` and later (a resumed run redoes those tasks);
    the file is removed when nothing is left."""
    from hdqt.experiments import outputs

    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_records(path) if isinstance(r.get("task"), int) and r["task"] < tasks]
    if kept:
        outputs.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    else:
        path.unlink()


class DiagnosticsTracker:
    """The learner hook ``on_step(learner, x, y, task_index, stage)`` of ``--diagnose-every``."""

    def __init__(self, path: str | Path, every: int, *, seed: int = 0, draws: int = TRACK_DRAWS,
                 stages: tuple[str, ...] = ("main",)):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.path = Path(path)
        self.every = every
        self.seed = seed
        self.draws = draws
        self.stages = stages
        self._task: int | None = None
        self._step = 0

    def __call__(self, learner, x, y, task_index: int, stage: str) -> None:
        if stage not in self.stages:  # other stages train on features, not on the network's inputs
            return
        if task_index != self._task:
            self._task, self._step = task_index, 0
        step = self._step
        self._step += 1
        if step % self.every:
            return
        diag = diagnose(learner.network, x, y, None, draws=self.draws,
                        seed=derive_seed(self.seed, "diagnostics", task_index, step))
        record = {"task": int(task_index), "step": step, "stage": stage, **summarize_layers(diag)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
