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
import pickle
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
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


class CheckpointError(ValueError):
    """A checkpoint this version cannot read (or would not read safely)."""


def to_plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` as tensors and plain data only (dict, list, tuple, str, int, float,
    bool, None), which ``torch.load(..., weights_only=True)`` reads without running
    any code: numpy arrays become tensors, numpy scalars Python numbers. Anything
    else is a TypeError that says where it sits (``where``), so a learner that
    stores something new is caught when it saves, not when a resume fails."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = type(value)() if isinstance(value, OrderedDict) else {}
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where}: key {key!r} is not a str or an int")
            out[key] = to_plain(item, f"{where}[{key!r}]")
        if hasattr(value, "_metadata"):  # a module state_dict's version information
            out._metadata = to_plain(value._metadata, f"{where}._metadata")
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(item, f"{where}[{i}]") for i, item in enumerate(value))
    raise TypeError(f"{where}: {type(value).__name__} objects cannot be stored in a checkpoint "
                    f"(only tensors, numpy arrays and plain data)")


def write_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    state = to_plain(dict(state))  # before the file is opened: a bad state writes nothing
    _atomic_write(path, lambda handle: torch.save(state, handle))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by ``write_checkpoint`` with ``weights_only=True``: a
    checkpoint from someone else cannot run code. Checkpoints of versions before
    that were full pickles and are refused with an error that says what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} was written by an older version of hdqt (a pickled checkpoint, which "
            f"is not loaded because it could run code) or is not a checkpoint; rerun with "
            f"--overwrite to start this run afresh ({str(error).splitlines()[0]})") from None


def write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (bool, number, string or a list of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(values: Mapping[str, Any], header: str = "") -> str:
    """Flat key = value TOML; None values are left out (TOML has no null)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"
