"""Files in a run's output directory, always written atomically.

Every file is written to a temporary sibling and moved into place with
``os.replace``, so a crash (even SIGKILL) leaves either the old or the new
version, never a torn file that would break a resume.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

CONFIG_JSON = "config.json"
CONFIG_TOML = "config.toml"
METRICS_JSON = "metrics.json"
TASKS_CSV = "tasks.csv"
CHECKPOINT = "checkpoint.pt"
# Everything a run writes; --overwrite removes exactly these and nothing else.
RUN_FILES = (CONFIG_JSON, CONFIG_TOML, METRICS_JSON, TASKS_CSV, CHECKPOINT)


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling (same filesystem, so os.replace is atomic); opened with "x"
    # rather than mkstemp so that the file gets the usual umask permissions.
    tmp_name = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp_name, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(_finite(data), indent=2) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _finite(value: Any) -> Any:
    # JSON has no NaN; an undefined metric (forgetting after one task) is null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    _atomic_write(path, lambda handle: torch.save(dict(state), handle))


def read_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only=False: the checkpoint holds RNG states and learner extras
    # (numpy arrays, tuples) that the restricted unpickler rejects. It is a file
    # this program wrote into the user's own output directory.
    return torch.load(path, map_location="cpu", weights_only=False)


def write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(values: Mapping[str, Any], header: str = "") -> str:
    """Flat key = value TOML; None values are left out (TOML has no null)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"
