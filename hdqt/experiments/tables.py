"""Plain-text tables printed at the end of `hdqt run`."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from hdqt.experiments.summary import METRIC_NAMES

METRIC_LABELS = {
    "avg_incremental_accuracy": "avg incremental accuracy",
    "last_accuracy": "last accuracy",
    "forgetting": "forgetting",
    "backward_transfer": "backward transfer",
}


# What the classifier names in the tables mean (one line under each table).
CLASSIFIERS = {
    "nme": "nearest-mean-of-exemplars classifier",
    "cnn": "the network's own head",
}


def legend(names: Sequence[str], brackets: bool = False) -> str:
    """'nme = nearest-mean-of-exemplars classifier, cnn = the network's own head'."""
    return ", ".join(f"{f'[{n}]' if brackets else n} = {CLASSIFIERS[n]}"
                     for n in names if n in CLASSIFIERS)


def outputs_note(out_dirs: Sequence[Any]) -> str:
    """Where a run's files are, and what each holds."""
    where = " and ".join(str(d) for d in out_dirs)
    each = ", each" if len(out_dirs) > 1 else ""
    return (f"Outputs in {where}{each}: config.json (configuration, resolved quantization), "
            f"metrics.json (all metrics), tasks.csv (a row per task), checkpoint.pt (to resume)")


def _cell(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return str(value)


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, a rule under the header."""
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(cell).rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _classifiers(metrics: Mapping[str, Any]) -> list[str]:
    """Primary classifier first, then the others that have metrics."""
    primary = metrics.get("primary_classifier")
    others = sorted(name for name in ("cnn", "nme") if name in metrics and name != primary)
    return ([primary] if primary else []) + others


def run_table(metrics: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> str:
    """Per-task accuracies, then the summary metrics, of one run."""
    classifiers = _classifiers(metrics)
    task_rows = [[f"task {r['task'] + 1}", " ".join(map(str, r["classes"])),
                  *(_cell(r["accuracy"].get(name, {}).get("seen")) for name in classifiers)]
                 for r in history]
    tasks = render(["", "new classes", *(f"{n} acc %" for n in classifiers)], task_rows)
    metric_rows = [[METRIC_LABELS[key], *(_cell(metrics[name][key]) for name in classifiers)]
                   for key in METRIC_NAMES]
    summary = render(["metric (%)", *classifiers], metric_rows)
    title = (f"{metrics['dataset']} | {metrics['method']} | {metrics['recipe']} | "
             f"seed {metrics['seed']} | {metrics['finished_tasks']}/{metrics['num_tasks']} tasks"
             f" | primary classifier: {metrics.get('primary_classifier', '-')}")
    return f"{title}\n{tasks}\n\n{summary}\n{legend(classifiers)}"


def compare_table(labels: Sequence[str], all_metrics: Sequence[Mapping[str, Any]]) -> str:
    """Metrics side by side, with the difference of each recipe to the first one."""
    base_label, base = labels[0], all_metrics[0]
    header = ["metric (%)", *labels, *(f"{label}-{base_label}" for label in labels[1:])]
    rows = []
    for name in _classifiers(base):
        keys = [*METRIC_NAMES] + [f"task {t + 1}" for t in range(base.get("finished_tasks", 0))]
        for key in keys:
            values = [_metric(m, name, key) for m in all_metrics]
            diffs = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
            label = METRIC_LABELS.get(key, f"accuracy after {key}")
            rows.append([f"{label} [{name}]", *map(_cell, values),
                         *(_cell(d, signed=True) for d in diffs)])
    return f"{render(header, rows)}\n{legend(_classifiers(base), brackets=True)}"


def _metric(metrics: Mapping[str, Any], classifier: str, key: str) -> float | None:
    values = metrics.get(classifier)
    if values is None:
        return None
    if key.startswith("task "):
        index = int(key.split()[1]) - 1
        incremental = values["incremental_accuracy"]
        return incremental[index] if index < len(incremental) else None
    return values.get(key)
