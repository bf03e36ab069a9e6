"""Progress reporting for the runner: silent, or progress bars plus a log line per task."""
from __future__ import annotations

import sys
from typing import Any, Mapping, TextIO

from tqdm import tqdm


class Progress:
    """Callbacks the runner makes; the base class ignores them all."""

    def run_started(self, config, num_tasks: int, resumed_after: int) -> None: ...

    def task_started(self, task, num_tasks: int) -> None: ...

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


class ConsoleProgress(Progress):
    """Bars per task and per epoch on a terminal; otherwise a log line per epoch.
    A log line per task in both cases.

    The log lines go to ``stream`` whether or not bars are shown, so a run
    redirected to a file still records what happened, epoch by epoch.
    """

    def __init__(self, label: str = "", stream: TextIO | None = None,
                 bars: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.prefix = f"[{label}] " if label else ""
        self.bars = sys.stderr.isatty() if bars is None else bars
        self._task_bar: tqdm | None = None
        self._epoch_bar: tqdm | None = None
        self._task_label = ""

    def _log(self, line: str) -> None:
        if self._task_bar is not None:
            tqdm.write(self.prefix + line, file=self.stream)
        else:
            print(self.prefix + line, file=self.stream, flush=True)

    def run_started(self, config, num_tasks: int, resumed_after: int) -> None:
        self._log(f"{config.dataset} | {config.method} | {config.recipe} | "
                  f"{config.backbone} | seed {config.seed}: {num_tasks} tasks, "
                  f"{config.epochs} epochs each")
        if resumed_after >= num_tasks:
            self._log(f"already complete ({num_tasks} tasks); reporting stored results")
        elif resumed_after:
            self._log(f"resuming after task {resumed_after}/{num_tasks} from the checkpoint")
        if self.bars:
            self._task_bar = tqdm(total=num_tasks, initial=resumed_after, desc=self.prefix + "tasks",
                                  unit="task", position=0, dynamic_ncols=True)

    def task_started(self, task, num_tasks: int) -> None:
        self._task_label = f"task {task.index + 1}/{num_tasks}"

    def epoch(self, epoch: int, total: int, logs: Mapping[str, Any] | None = None) -> None:
        if not self.bars:
            values = " ".join(f"{key} {value}" for key, value in _format_logs(logs).items())
            self._log(f"{self._task_label} epoch {epoch}/{total}: {values}".rstrip(": "))
            return
        if self._epoch_bar is None:
            self._epoch_bar = tqdm(total=total, desc=self._task_label, unit="epoch",
                                   position=1, leave=False, dynamic_ncols=True)
        # Learners report the epoch counted over all their stages (BiC: training, then
        # bias correction), so set the position rather than adding one per call.
        self._epoch_bar.total = total
        self._epoch_bar.n = min(epoch, total)
        self._epoch_bar.set_postfix(_format_logs(logs), refresh=False)
        self._epoch_bar.refresh()

    def task_finished(self, record: Mapping[str, Any], num_tasks: int) -> None:
        if self._epoch_bar is not None:
            self._epoch_bar.close()
            self._epoch_bar = None
        scores = "  ".join(f"{name} {acc['seen']:.2f}%"
                           for name, acc in sorted(record["accuracy"].items()))
        self._log(f"task {record['task'] + 1}/{num_tasks} classes {record['classes']}: "
                  f"{scores}  ({record['seconds']:.1f} s)")
        if self._task_bar is not None:
            self._task_bar.update(1)

    def run_finished(self, result) -> None:
        if self._task_bar is not None:
            self._task_bar.close()
            self._task_bar = None
