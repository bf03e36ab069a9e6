"""`hdqt run` end to end on digits: outputs, determinism, resume after SIGKILL, compare."""
from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from run_helpers import TINY, read_metrics, run_cli, subprocess_cli

REQUIRED = ("avg_incremental_accuracy", "last_accuracy", "forgetting", "backward_transfer",
            "accuracy_matrix")


def test_run_writes_config_metrics_csv_and_checkpoint(reference_run):
    config = json.loads((reference_run / "config.json").read_text())
    assert config["config"]["recipe"] == "hdqt" and config["config"]["epochs"] == 2
    assert config["policy"]["name"] == "hdqt" and config["policy"]["hadamard"] is True
    # not given (null in "config"): the recipe's values are written out, and marked as such
    assert config["config"]["bits"] is None
    assert config["quantization"] == {
        "bits": 4, "acc_bits": 8, "tile": 32, "saturate_backward": False,
        "hadamard_rule": "paper", "hadamard_select": "always", "forward_hadamard": False,
        "backward_scales": "tensor", "weight_scales": "tensor", "hadamard": True,
        "from_recipe": ["bits", "acc_bits", "tile", "saturate_backward", "hadamard_rule", "hadamard_select",
                        "forward_hadamard", "backward_scales", "weight_scales"]}
    toml_text = (reference_run / "config.toml").read_text()
    assert 'recipe = "hdqt"' in toml_text
    assert ("# Not set, so the hdqt recipe's defaults apply: bits = 4, acc_bits = 8, tile = 32, "
            "saturate_backward = false, hadamard_rule = \"paper\", hadamard_select = \"always\", "
            "forward_hadamard = false, backward_scales = \"tensor\", weight_scales = \"tensor\".") in toml_text

    metrics = read_metrics(reference_run)
    assert metrics["complete"] and metrics["num_tasks"] == 5 and metrics["finished_tasks"] == 5
    assert sorted(metrics["class_order"]) == list(range(10))
    assert metrics["primary_classifier"] == "nme"  # iCaRL's own classifier
    for source in (metrics, metrics["cnn"], metrics["nme"]):
        for key in REQUIRED:
            assert key in source, key
        matrix = np.array(source["accuracy_matrix"], dtype=float)  # None -> nan
        assert matrix.shape == (5, 5)
        assert np.isnan(matrix[np.triu_indices(5, 1)]).all()
        lower = matrix[np.tril_indices(5)]
        assert ((lower >= 0) & (lower <= 100)).all()
        assert 0 <= source["avg_incremental_accuracy"] <= 100
    assert metrics["avg_incremental_accuracy"] == metrics["nme"]["avg_incremental_accuracy"]
    # Even two 4-bit epochs learn something: above the 50% chance of the first task.
    assert metrics["nme"]["incremental_accuracy"][0] > 60

    with open(reference_run / "tasks.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["task"] for row in rows] == ["1", "2", "3", "4", "5"]
    assert [int(row["num_seen_classes"]) for row in rows] == [2, 4, 6, 8, 10]
    assert float(rows[-1]["nme_accuracy"]) == pytest.approx(metrics["nme"]["last_accuracy"], abs=1e-3)

    # tensors and plain data only: read without unpickling arbitrary objects
    checkpoint = torch.load(reference_run / "checkpoint.pt", weights_only=True)
    assert len(checkpoint["history"]) == 5 and "learner" in checkpoint
    assert not list(reference_run.glob(".*.tmp")), "a temporary file was left behind"


def test_same_seed_same_metrics_and_config_toml_repeats_the_run(reference_run, tmp_path):
    again = tmp_path / "again"
    assert run_cli("--config", str(reference_run / "config.toml"), "--out", str(again)) == 0
    assert read_metrics(again) == read_metrics(reference_run)

    other_seed = tmp_path / "seed1"
    assert run_cli(*TINY, "--recipe", "hdqt", "--seed", "1", "--out", str(other_seed)) == 0
    assert read_metrics(other_seed)["class_order"] != read_metrics(reference_run)["class_order"]


# Runs a tiny digits experiment that SIGKILLs itself from its progress callback in
# task 3: at the end of the epoch of the given stage ("main": stage 1's first epoch;
# "bias": BiC's bias correction), before the task's memory update and checkpoint.
# Killing from inside the process lands at that point whatever the machine's speed;
# a kill sent by the parent on reading a log line raced with the child's progress.
KILL_IN_TASK_3 = """
import os, signal, sys
from hdqt.experiments import resolve_config, run_experiment
from hdqt.experiments.progress import ConsoleProgress

out, method, stage = sys.argv[1:4]

class KillInTask3(ConsoleProgress):
    def epoch(self, epoch, total, logs=None):
        super().epoch(epoch, total, logs)
        if self._task_label.startswith("task 3/") and (logs or {}).get("stage") == stage:
            os.kill(os.getpid(), signal.SIGKILL)

flags = dict(dataset="digits", method=method, recipe="hdqt", epochs=2, memory=40)
run_experiment(resolve_config(None, flags), out, progress=KillInTask3(method, epoch_lines=True))
"""


def kill_in_task_3(out, method: str, stage: str) -> str:
    """Run KILL_IN_TASK_3; returns its output, after checking it died of the kill."""
    killed = subprocess.run([sys.executable, "-c", KILL_IN_TASK_3, str(out), method, stage],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    return killed.stdout


@pytest.mark.slow  # kills and resumes a run in a child process
def test_resume_after_sigkill_mid_task_equals_uninterrupted_run(reference_run, tmp_path):
    out = tmp_path / "killed"
    log = kill_in_task_3(out, "icarl", "main")  # the reference run's config (TINY, hdqt)
    assert "task 2/5 classes" in log and "task 3/5 epoch 1/2" in log and "task 3/5 epoch 2/2" not in log
    partial = read_metrics(out)
    assert not partial["complete"] and partial["finished_tasks"] == 2

    args = (*TINY, "--recipe", "hdqt", "--out", str(out))
    resumed = subprocess_cli(*args, cwd=tmp_path)
    log, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, log
    assert "resuming after task 2/5" in log
    assert "task 2/5 classes" not in log  # not retrained
    assert "task 3/5 classes" in log  # task 3 is trained again
    assert read_metrics(out) == read_metrics(reference_run)

    # A finished run is reported, not retrained.
    finished = subprocess_cli(*args, cwd=tmp_path)
    log, _ = finished.communicate(timeout=120)
    assert finished.returncode == 0 and "already complete" in log
    assert read_metrics(out) == read_metrics(reference_run)


@pytest.mark.slow  # kills and resumes a run in a child process
def test_bic_killed_in_its_bias_stage_resumes_to_the_uninterrupted_result(tmp_path):
    cli_args = ("--dataset", "digits", "--method", "bic", "--recipe", "hdqt", "--epochs", "2",
                "--memory", "40")
    assert run_cli(*cli_args, "--out", str(tmp_path / "reference")) == 0
    out = tmp_path / "killed"
    log = kill_in_task_3(out, "bic", "bias")
    assert "task 3/5 epoch 3/3: loss" in log and "stage bias" in log
    partial = read_metrics(out)
    assert partial["finished_tasks"] == 2

    assert run_cli(*cli_args, "--out", str(out)) == 0
    assert read_metrics(out) == read_metrics(tmp_path / "reference")


def test_a_pickled_checkpoint_of_an_older_version_is_refused_with_what_to_do(
        reference_run, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(reference_run, out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()  # as versions before 2 stored it: a pickle
    torch.save(state, out / "checkpoint.pt")
    assert run_cli(*TINY, "--recipe", "hdqt", "--out", str(out)) == 2
    error = capsys.readouterr().err
    assert "checkpoint.pt was written by an older version of hdqt" in error
    assert "rerun with --overwrite" in error and "Traceback" not in error
    assert run_cli(*TINY, "--recipe", "hdqt", "--out", str(out), "--overwrite") == 0
    assert read_metrics(out) == read_metrics(reference_run)


def test_other_config_in_out_dir_is_refused_unless_overwrite(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_cli(*TINY, "--recipe", "fp32", "--epochs", "1", "--out", out) == 0
    capsys.readouterr()
    assert run_cli(*TINY, "--recipe", "fp32", "--out", out) == 2
    error = capsys.readouterr().err
    assert "different configuration" in error and "epochs: 1 -> 2" in error
    assert "--overwrite" in error
    assert read_metrics(tmp_path / "run")["finished_tasks"] == 5  # old run untouched
    assert run_cli(*TINY, "--recipe", "fp32", "--out", out, "--overwrite") == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["epochs"] == 2


def test_a_run_whose_data_fails_to_load_leaves_out_dir_free(tmp_path, capsys, monkeypatch):
    import hdqt.data
    from hdqt.data import DatasetNotFoundError

    def missing(name, **kwargs):
        raise DatasetNotFoundError(name, "digits.npz", [tmp_path / "nowhere"], "https://example")

    out = tmp_path / "run"
    monkeypatch.setattr(hdqt.data, "prepare", missing)
    assert run_cli(*TINY, "--recipe", "fp32", "--epochs", "1", "--out", str(out)) == 2
    assert "dataset 'digits' was not found" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())  # nothing written
    monkeypatch.undo()
    # another configuration may use the folder: it holds no result
    assert run_cli(*TINY, "--recipe", "fp32", "--epochs", "2", "--out", str(out)) == 0
    assert read_metrics(out)["complete"]


def test_a_folder_without_a_finished_task_is_free(tmp_path, capsys):
    from hdqt.experiments.config import resolve_config
    from hdqt.experiments.runner import prepare_out_dir

    out = tmp_path / "run"
    # what a run stopped in its first task leaves: config files, no checkpoint, no metrics
    prepare_out_dir(resolve_config(None, {"dataset": "digits", "epochs": 3}), out, False)
    assert (out / "config.json").exists()
    assert run_cli(*TINY, "--recipe", "fp32", "--epochs", "1", "--out", str(out)) == 0
    assert json.loads((out / "config.json").read_text())["config"]["epochs"] == 1
    # once a task has finished, the folder holds a result and is protected
    capsys.readouterr()
    assert run_cli(*TINY, "--recipe", "fp32", "--epochs", "2", "--out", str(out)) == 2
    assert "different configuration" in capsys.readouterr().err


def test_compare_prints_both_recipes_and_their_difference(reference_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    # The hdqt half was already run with this exact config: it is reused, not retrained.
    shutil.copytree(reference_run, out / "hdqt")
    assert run_cli(*TINY, "--compare", "fp32,hdqt", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    fp32, hdqt = read_metrics(out / "fp32"), read_metrics(out / "hdqt")
    assert hdqt == read_metrics(reference_run)
    assert fp32["recipe"] == "fp32" and fp32["class_order"] == hdqt["class_order"]

    table = printed[printed.index("Comparison"):]
    header = table.splitlines()[1].split()
    assert header[-3:] == ["fp32", "hdqt", "hdqt-fp32"]
    row = next(line for line in table.splitlines()
               if line.startswith("avg incremental accuracy [nme]")).split()
    a, b = fp32["avg_incremental_accuracy"], hdqt["avg_incremental_accuracy"]
    assert row[-3:] == [f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"]


def test_code_fingerprint_hashes_the_package_source(tmp_path):
    from hdqt.experiments.fingerprint import code_fingerprint, git_commit, source_hash

    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "k.c").write_text("int f;\n")
    first = source_hash(package)
    (package / "notes.txt").write_text("not source")
    (package / "sub" / "__pycache__").mkdir()
    (package / "sub" / "__pycache__" / "a.py").write_text("cached")
    assert source_hash(package) == first  # only source files count
    (package / "sub" / "k.c").write_text("int g;\n")
    assert source_hash(package) != first  # native kernels count
    (package / "sub" / "k.c").write_text("int f;\n")
    (package / "b.py").write_text("")
    assert source_hash(package) != first  # an added file counts
    assert git_commit(package) is None  # not a git checkout
    code = code_fingerprint()
    assert len(code["source_sha256"]) == 64 and code == code_fingerprint()


def test_a_process_labels_its_runs_with_the_code_it_loaded(monkeypatch):
    from hdqt.experiments import fingerprint

    loaded = fingerprint.loaded_code_fingerprint()
    assert loaded == fingerprint.code_fingerprint()  # the files have not changed since
    # an edit on disk after loading: this process still runs (and labels) what it loaded
    monkeypatch.setattr(fingerprint, "source_hash", lambda root=None: "e" * 64)
    assert fingerprint.code_fingerprint()["source_sha256"] == "e" * 64
    assert fingerprint.loaded_code_fingerprint() == loaded


@pytest.mark.slow  # starts a grid worker process
def test_grid_worker_with_other_code_than_the_grid_refuses_to_run(tmp_path):
    from hdqt.experiments.grid import GridPoint, _run_point

    from hdqt.experiments.config import resolve_config

    config = resolve_config(flag_values={"dataset": "digits", "method": "finetune", "epochs": 1})
    outcome = _run_point(GridPoint(config, tmp_path / "run"), 1, {"source_sha256": "0" * 64, "git_commit": None})
    assert outcome.metrics is None and "changed while the grid ran" in outcome.error
    assert "source 000000000000" in outcome.error
    assert not (tmp_path / "run").exists()  # nothing was run


def _pretend_other_code(path):
    """Rewrite the code fingerprint stored in config.json or checkpoint.pt."""
    if path.suffix == ".json":
        payload = json.loads(path.read_text())
        payload["code"] = {"source_sha256": "0" * 64, "git_commit": "f" * 40}
        path.write_text(json.dumps(payload))
    else:
        state = torch.load(path, weights_only=True)
        state["code"] = {"source_sha256": "0" * 64, "git_commit": None}
        torch.save(state, path)


def test_run_from_other_code_is_refused_unless_force_or_overwrite(tmp_path, capsys):
    from hdqt.experiments.fingerprint import code_fingerprint

    out = tmp_path / "run"
    args = (*TINY, "--recipe", "fp32", "--epochs", "1", "--out", str(out))
    assert run_cli(*args) == 0
    code = code_fingerprint()
    assert json.loads((out / "config.json").read_text())["code"] == code
    assert torch.load(out / "checkpoint.pt", weights_only=True)["code"] == code
    finished = read_metrics(out)

    _pretend_other_code(out / "config.json")
    capsys.readouterr()
    assert run_cli(*args) == 2
    error = capsys.readouterr().err
    assert "made by source 000000000000 at commit ffffffffff" in error
    assert "--overwrite" in error and "--force" in error
    # --force reports the finished run, warning, and keeps the other version on record
    assert run_cli(*args, "--force") == 0
    assert "hdqt run: warning:" in capsys.readouterr().err
    payload = json.loads((out / "config.json").read_text())
    assert payload["code"] == code and payload["previous_code"][0]["source_sha256"] == "0" * 64
    assert read_metrics(out) == finished

    # A checkpoint from other code is refused as well (config.json alone is not trusted).
    _pretend_other_code(out / "checkpoint.pt")
    assert run_cli(*args) == 2
    assert "checkpoint.pt was written by source 000000000000" in capsys.readouterr().err
    # Runs from before fingerprints (nothing recorded) count as other code.
    payload = json.loads((out / "config.json").read_text())
    del payload["code"]
    (out / "config.json").write_text(json.dumps(payload))
    assert run_cli(*args) == 2
    assert "unrecorded code" in capsys.readouterr().err
    assert run_cli(*args, "--overwrite") == 0
    assert read_metrics(out) == finished  # rerun from scratch by this code: same results
    assert "previous_code" not in json.loads((out / "config.json").read_text())


def test_each_task_records_and_shows_its_accumulator_saturation(tmp_path, capsys):
    from hdqt.experiments.runner import saturation_summary

    assert run_cli("--recipe", "hdqt", "--epochs", "1", "--out", str(tmp_path / "hdqt")) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "hdqt" / "metrics.json").read_text())
    per_task = metrics["saturation"]
    assert len(per_task) == metrics["num_tasks"]
    for task in per_task:
        layers = task["layers"]
        assert set(layers) >= {"head"} and 0 <= task["share"] <= 1
        assert task["share"] == pytest.approx(task["saturated"] / task["tiles"])
        assert min(s["share"] for s in layers.values()) <= task["share"] <= max(s["share"] for s in layers.values())
    # the default 8-bit accumulator saturates some of digits' tile sums, and the run says so
    assert sum(task["saturated"] for task in per_task) > 0
    assert out.count("accumulator saturation: ") == sum(1 for task in per_task if task["saturated"])
    # unlimited accumulators and fp32 record none
    assert run_cli("--recipe", "hdqt", "--acc-bits", "0", "--epochs", "1", "--out", str(tmp_path / "u")) == 0
    assert "saturation" not in json.loads((tmp_path / "u" / "metrics.json").read_text())
    import torch.nn as nn
    assert saturation_summary(nn.Linear(2, 2)) is None


def test_train_per_class_trains_each_task_on_that_many_samples_a_class(tmp_path):
    assert run_cli("--recipe", "fp32", "--epochs", "1", "--train-per-class", "6",
                   "--out", str(tmp_path / "small")) == 0
    with open(tmp_path / "small" / "tasks.csv", newline="") as handle:
        tasks = list(csv.DictReader(handle))
    assert [int(task["train_samples"]) for task in tasks] == [12] * 5  # 2 new classes a task
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert config["config"]["train_per_class"] == 6
