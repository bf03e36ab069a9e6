"""Atomic output files and the TOML written for `--config` reuse."""
from __future__ import annotations

import math
import tomllib

import pytest

from hdqt.experiments import outputs
from hdqt.experiments.config import Choices, resolve_config

CHOICES = Choices(datasets=("digits",), methods=("icarl",), recipes=("fp32", "hdqt"),
                  backbones=("fcnet",))


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    outputs.write_checkpoint(path, {"task": 1})
    with pytest.raises(Exception):
        outputs.write_checkpoint(path, {"task": 2, "bad": lambda: None})  # unpicklable
    assert outputs.read_checkpoint(path) == {"task": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_json_writes_undefined_metrics_as_null(tmp_path):
    outputs.write_json(tmp_path / "m.json", {"forgetting": math.nan, "rows": [[1.0, math.inf]]})
    assert outputs.read_json(tmp_path / "m.json") == {"forgetting": None, "rows": [[1.0, None]]}


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = resolve_config(None, {"epochs": 7, "milestones": "3,5", "bits": 4, "data_root": "/d"},
                            choices=CHOICES)
    text = outputs.to_toml(config.to_dict(), header="two\nlines")
    assert text.startswith("# two\n# lines\n")
    values = tomllib.loads(text)
    assert "acc_bits" not in values  # None (recipe default) is left out
    assert resolve_config(values, choices=CHOICES) == config
