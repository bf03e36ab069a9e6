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


def test_checkpoints_hold_tensors_and_plain_data_only(tmp_path):
    import numpy as np
    import torch

    path = tmp_path / "checkpoint.pt"
    outputs.write_checkpoint(path, {"x": np.arange(3, dtype=np.float32), "n": np.int64(4),
                                    "rows": [(1, "a"), None], "t": torch.ones(2)})
    state = torch.load(path, weights_only=True)  # what read_checkpoint does
    assert torch.equal(state["x"], torch.arange(3, dtype=torch.float32))
    assert state["n"] == 4 and type(state["n"]) is int and state["rows"] == [(1, "a"), None]
    assert outputs.read_checkpoint(path)["t"].tolist() == [1.0, 1.0]
    with pytest.raises(TypeError, match=r"checkpoint\['learner'\]\['policy'\]: object objects cannot"):
        outputs.write_checkpoint(path, {"learner": {"policy": object()}})


def test_a_pickled_checkpoint_is_not_loaded(tmp_path):
    import numpy as np
    import torch

    path = tmp_path / "checkpoint.pt"
    torch.save({"rng": np.random.get_state()}, path)  # how versions before 2 saved
    with pytest.raises(outputs.CheckpointError, match=r"written by an older version of hdqt.*"
                                                       r"rerun with --overwrite"):
        outputs.read_checkpoint(path)
