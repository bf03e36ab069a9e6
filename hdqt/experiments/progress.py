"""Progress reporting for the runner: silent, or a log line per task (plus bars on a terminal)."""
from __future__ import annotations

import sys
from typing import Any, Mapping, TextIO

from tqdm import tqdm


class Progress:
    """Callbacks the runner makes; the base class ignores them all."""

    def run_started(self, config, num_tasks: int, resumed_after: int) -> None: ...

    def task_started(self, task, num_tasks: int) -> None: ...

    def steps_resumed(self, steps_done: int, num_steps: int) -> None:
        """The task just started continues after ``steps_done`` finished schedule steps."""

    def epoch(self, epoch: int, total: int, logs: Mapping[str, Any] | None = None) -> None:
        """``epoch`` counts from 1 to ``total`` over all training stages of the task."""

    def task_finished(self, record: Mapping[str, Any], num_tasks: int) -> None: ...

    def run_finished(self, result) -> None: ...


SilentProgress = Progress


def _format_logs(logs: Mapping[str, Any] | None) -> dict[str, str]:
    formatted = {}
    for key, value in (logs or {}).items():
        if isinstance(value, float):
            formatted[key] = f"{value:.4g}"
        elif isinstance(value, (int, str)):
            formatted[key] = str(value)
    return formatted


def describe_logs(logs: Mapping[str, Any] | None, lr: bool = True) -> str:
    """'train loss 0.1234, train accuracy 97.5%, lr 0.01' from a learner's epoch logs.
    Another stage than the main one is named, and its numbers are not called
    training numbers (BiC's bias stage reports its validation set)."""
    logs = logs or {}
    stage = logs.get("stage", "main")
    kind = "train " if stage == "main" else ""
    parts = [] if stage == "main" else [f"{stage} stage"]
    if isinstance(logs.get("loss"), (int, float)):
        parts.append(f"{kind}loss {logs['loss']:.4g}")
    if isinstance(logs.get("accuracy"), (int, float)):
        parts.append(f"{kind}accuracy {logs['accuracy']:.1f}%")
    if lr and isinstance(logs.get("lr"), (int, float)):
        parts.append(f"lr {logs['lr']:.3g}")
    return ", ".join(parts)


# Bars without rates ("10381.94epoch/s" says nothing about a run) and with their
# unit spelled out; the postfix is labelled by describe_logs.
_EPOCH_BAR = "{desc}: {n}/{total} epochs |{bar}| {elapsed}<{remaining}{postfix}"
_TASK_BAR = "{desc}: {n}/{total} tasks |{bar}| {elapsed}<{remaining}"


def describe_saturation(saturation: Mapping[str, Any]) -> str:
    """'accumulator saturation: 2.31% of tile sums (mean excess 14.2), most in fc.0 (9.80%)'."""
    worst, stats = max(saturation["layers"].items(), key=lambda item: item[1]["share"])
    return (f"accumulator saturation: {100 * saturation['share']:.2f}% of the forward tile sums, "
            f"{saturation['mean_excess']:.1f} past the limit on average; most in {worst} "
            f"({100 * stats['share']:.2f}%)")


class ConsoleProgress(Progress):
    """What a person reads: a line per finished task (its epochs, the last epoch's
    training loss and accuracy, the test accuracy of each classifier, seconds).

    On a terminal (``bars``, default: stderr is a TTY) a bar over the tasks and one
    over the current task's epochs run on ``bar_stream`` (stderr) meanwhile.
    ``epoch_lines`` also logs a line per epoch (``task 3/9 epoch 7/10: loss ...``);
    off by default, since a redirected run would print hundreds of them.
    """

    def __init__(self, label: str = "", stream: TextIO | None = None,
                 bars: bool | None = None, *, epoch_lines: bool = False,
                 bar_stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.bar_stream = bar_stream
        self.prefix = f"[{label}] " if label else ""
        self.bars = sys.stderr.isatty() if bars is None else bars
        self.epoch_lines = epoch_lines
        self._task_bar: tqdm | None = None
        self._epoch_bar: tqdm | None = None
        self._task_label = ""
        self._epochs = 0
        self._stage_logs: dict[str, Mapping[str, Any]] = {}  # the last logs of each stage
        self._stage_epochs: dict[str, int] = {}  # epochs of each stage

    def _log(self, line: str) -> None:
        if self._task_bar is not None:
            tqdm.write(self.prefix + line, file=self.stream)
        else:
            print(self.prefix + line, file=self.stream, flush=True)

    def run_started(self, config, num_tasks: int, resumed_after: int) -> None:
        self._log(f"{config.dataset} | {config.method} | {config.recipe} | "
                  f"{config.backbone} | seed {config.seed}: {num_tasks} tasks, "
                  f"{config.epochs} epochs each"
                  + (f", schedule {config.schedule} ({config.ctmq_start_bits} bits down, "
                     f"{config.ctmq_cycles} cycles)" if config.schedule == "ctmq" else ""))
        if resumed_after >= num_tasks:
            self._log(f"already complete ({num_tasks} tasks); reporting stored results")
        elif resumed_after:
            self._log(f"resuming after task {resumed_after}/{num_tasks} from the checkpoint")
        if self.bars:
            self._task_bar = tqdm(total=num_tasks, initial=resumed_after, desc=self.prefix + "run",
                                  bar_format=_TASK_BAR, position=0, dynamic_ncols=True,
                                  file=self.bar_stream)

    def task_started(self, task, num_tasks: int) -> None:
        self._task_label = f"task {task.index + 1}/{num_tasks}"
        self._epochs = 0
        self._stage_logs = {}
        self._stage_epochs = {}

    def steps_resumed(self, steps_done: int, num_steps: int) -> None:
        self._log(f"{self._task_label}: resuming after schedule step {steps_done}/{num_steps} "
                  f"from the checkpoint")

    def epoch(self, epoch: int, total: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epochs = epoch
        stage = str((logs or {}).get("stage", "main"))
        self._stage_logs[stage] = dict(logs or {})
        self._stage_epochs[stage] = self._stage_epochs.get(stage, 0) + 1
        if self.epoch_lines:
            values = " ".join(f"{key} {value}" for key, value in _format_logs(logs).items())
            self._log(f"{self._task_label} epoch {epoch}/{total}: {values}".rstrip(": "))
        if not self.bars:
            return
        if self._epoch_bar is None:
            self._epoch_bar = tqdm(total=total, desc=self._task_label, bar_format=_EPOCH_BAR,
                                   position=1, leave=False, dynamic_ncols=True,
                                   file=self.bar_stream)
        # Learners report the epoch counted over all their stages (BiC: training, then
        # bias correction), so set the position rather than adding one per call.
        self._epoch_bar.total = total
        self._epoch_bar.n = min(epoch, total)
        self._epoch_bar.set_postfix_str(describe_logs(logs), refresh=False)
        self._epoch_bar.refresh()

    def task_finished(self, record: Mapping[str, Any], num_tasks: int) -> None:
        if self._epoch_bar is not None:
            self._epoch_bar.close()
            self._epoch_bar = None
        scores = ", ".join(f"{name} {acc['seen']:.2f}%"
                           for name, acc in sorted(record["accuracy"].items()))
        training = ""
        if self._epochs:
            plural = "s" if self._epochs != 1 else ""
            stages = ""
            if len(self._stage_epochs) > 1:  # "33 epochs (3 main + 30 balanced)"
                stages = " (" + " + ".join(f"{n} {stage}" for stage, n
                                           in self._stage_epochs.items()) + ")"
            main = self._stage_logs.get("main") or list(self._stage_logs.values())[-1]
            training = (f"{self._epochs} epoch{plural}{stages}, last: "
                        f"{describe_logs(main, lr=False)} | ")
        self._log(f"task {record['task'] + 1}/{num_tasks} classes {record['classes']}: "
                  f"{training}test accuracy ({record['num_seen_classes']} classes seen): "
                  f"{scores} | {record['seconds']:.1f} s")
        saturation = record.get("saturation")
        if saturation and saturation["saturated"]:
            self._log("  " + describe_saturation(saturation))
        if self._task_bar is not None:
            self._task_bar.update(1)

    def run_finished(self, result) -> None:
        if self._task_bar is not None:
            self._task_bar.close()
            self._task_bar = None
