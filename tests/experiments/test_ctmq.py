"""`hdqt run --schedule ctmq`: flags and TOML keys, their errors, a tiny run, and a run
killed between two steps of the schedule that resumes to the uninterrupted result."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

import hdqt
from hdqt.experiments.config import Choices, ConfigError, load_toml, resolve_config

from run_helpers import read_metrics, run_cli, subprocess_cli

CHOICES = Choices(datasets=("digits", "dsads"), methods=("icarl", "der"),
                  recipes=("fp32", "hdqt", "int", "luq", "hadanet"), backbones=("fcnet",))


def resolve(flags, file_values=None, source="the config file"):
    return resolve_config(file_values, flags, choices=CHOICES, source=source)


def test_ctmq_keys_take_their_defaults_and_become_part_of_the_identity():
    plain = resolve({"recipe": "int", "bits": 2})
    assert (plain.schedule, plain.ctmq_start_bits, plain.ctmq_cycles, plain.ctmq_recipe) == (
        "none", None, None, None)
    ctmq = resolve({"recipe": "int", "bits": 2, "schedule": "ctmq"})
    assert (ctmq.ctmq_start_bits, ctmq.ctmq_cycles, ctmq.ctmq_recipe) == (8, 2, "int")
    spelt_out = resolve({"recipe": "int", "bits": 2, "schedule": "ctmq", "ctmq_start_bits": 8,
                         "ctmq_cycles": 2, "ctmq_recipe": "int"})
    assert ctmq.identity() == spelt_out.identity() != plain.identity()


def test_the_issue_command_resolves_and_its_steps_widen_the_accumulator():
    from hdqt.experiments.scheduling import schedule_steps

    # hdqt run --schedule ctmq --ctmq-start-bits 8 --bits 2 --ctmq-cycles 2 (hdqt's 8-bit
    # accumulator at the 2-bit target: the 8-bit step needs a wider one)
    config = resolve({"recipe": "hdqt", "schedule": "ctmq", "ctmq_start_bits": 8, "bits": 2,
                      "ctmq_cycles": 2, "epochs": 28})
    steps = schedule_steps(config)
    assert [s.bits for s in steps] == [8, 7, 6, 5, 4, 3, 2] * 2
    assert [s.epochs for s in steps] == [2] * 14
    assert [s.policy.acc_bits for s in steps[:7]] == [20, 18, 16, 14, 12, 10, 8]
    assert all(s.policy.name == "hdqt" and s.policy.hadamard for s in steps)
    # the target step runs exactly the run's own policy
    assert steps[6].policy == hdqt.recipe("hdqt", bits=2)
    unlimited = schedule_steps(resolve({"recipe": "int", "bits": 2, "acc_bits": 0,
                                        "schedule": "ctmq", "epochs": 14}))
    assert {s.policy.acc_bits for s in unlimited} == {None}


@pytest.mark.parametrize("flags, message", [
    ({"bits": 2, "schedule": "ctmq", "ctmq_start_bits": 2},
     "--ctmq-start-bits must be an integer in 3..16, wider than the target width (2 bits), got 2"),
    ({"bits": 4, "schedule": "ctmq", "ctmq_start_bits": 17}, "--ctmq-start-bits must be an integer in 5..16"),
    ({"bits": 2, "schedule": "ctmq", "ctmq_cycles": 0}, "--ctmq-cycles must be an integer >= 1"),
    ({"bits": 2, "schedule": "ctmq", "epochs": 10},
     "--epochs must be at least 14, one epoch for each step of CTMQ (8 down to 2 bits, 2 cycles: "
     "14 steps) (epochs is the task's total, split over the steps), got 10"),
    ({"bits": 2, "schedule": "cyclic"}, "--schedule must be one of none, ctmq, got 'cyclic'"),
    ({"bits": 2, "ctmq_start_bits": 8}, "--ctmq-start-bits applies to the CTMQ schedule only: "
                                        "add --schedule ctmq, or leave it out"),
    ({"recipe": "fp32", "schedule": "ctmq"}, "the fp32 recipe quantizes nothing"),
    ({"bits": 2, "schedule": "ctmq", "ctmq_recipe": "int8"}, "unknown --ctmq-recipe 'int8'"),
])
def test_invalid_schedule_flags_are_errors_naming_the_flag_and_the_range(flags, message):
    with pytest.raises(ConfigError) as caught:
        resolve({"recipe": "int", "epochs": 20, **flags})
    assert message in str(caught.value)


def test_a_bad_toml_value_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('recipe = "int"\nbits = 3\nschedule = "ctmq"\nctmq_start_bits = 3\n')
    with pytest.raises(ConfigError, match=r"^ctmq_start_bits \(from .*run\.toml\) must be an "
                                          r"integer in 4\.\.16"):
        resolve({}, load_toml(path), source=str(path))


@pytest.mark.skipif("hadanet" not in hdqt.list_recipes(),
                    reason="the hadanet recipe (binary targets) has not landed in this tree")
def test_a_binary_target_needs_an_integer_recipe_for_its_wider_steps():
    from hdqt.experiments.scheduling import schedule_steps

    with pytest.raises(ConfigError, match=r"CTMQ's 4-bit step cannot run the hadanet recipe "
                                          r"\(--ctmq-recipe, default: --recipe\).*integer recipe"):
        resolve({"recipe": "hadanet", "schedule": "ctmq", "ctmq_start_bits": 4, "epochs": 8})
    config = resolve({"recipe": "hadanet", "schedule": "ctmq", "ctmq_start_bits": 4,
                      "ctmq_recipe": "int", "ctmq_cycles": 1, "epochs": 4})
    steps = schedule_steps(config)
    assert [(s.bits, s.policy.name) for s in steps] == [(4, "int"), (3, "int"), (2, "int"),
                                                        (1, "hadanet")]


TINY_CTMQ = ["--dataset", "digits", "--method", "icarl", "--recipe", "int", "--bits", "2",
             "--schedule", "ctmq", "--ctmq-start-bits", "3", "--ctmq-cycles", "1",
             "--epochs", "2", "--memory", "40", "--init-classes", "4", "--increment", "3"]


def test_a_tiny_ctmq_run_writes_its_steps_and_repeats_from_its_config_toml(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(*TINY_CTMQ, "--out", str(out)) == 0
    assert "schedule ctmq (3 bits down, 1 cycles)" in capsys.readouterr().out
    stored = json.loads((out / "config.json").read_text())
    assert stored["config"]["schedule"] == "ctmq" and stored["config"]["ctmq_recipe"] == "int"
    assert stored["schedule"] == [
        {"bits": 3, "epochs": 1, "cycle": 1, "policy": "int", "acc_bits": 10},
        {"bits": 2, "epochs": 1, "cycle": 1, "policy": "int", "acc_bits": 8}]
    metrics = read_metrics(out)
    assert metrics["complete"] and metrics["finished_tasks"] == 3
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "in_progress" not in checkpoint  # a finished task replaces the step checkpoints
    # the network ends at the target width
    policy = hdqt.quantization.policy_from_state_dict(checkpoint["learner"]["network"])
    assert policy.forward_weight.format.bits == 2
    config_toml = load_toml(out / "config.toml")
    assert (config_toml["schedule"], config_toml["ctmq_start_bits"]) == ("ctmq", 3)
    # the stored TOML names the same run: a rerun with it reports it, it does not retrain
    assert run_cli("--config", str(out / "config.toml"), "--out", str(out)) == 0
    assert "already complete" in capsys.readouterr().out


def test_schedule_errors_exit_2_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(*TINY_CTMQ[:-6], "--epochs", "1", "--out", str(out)) == 2
    assert "hdqt run: error: --epochs must be at least 2" in capsys.readouterr().err
    assert not out.exists()


# Runs a tiny scheduled digits experiment (2 tasks) that SIGKILLs itself in task 2, in the first
# epoch of its third schedule step (after the checkpoint of the second).
KILL_IN_STEP_3 = """
import os, signal, sys
from hdqt.experiments import resolve_config, run_experiment
from hdqt.experiments.progress import ConsoleProgress

out, method = sys.argv[1:3]

class KillInStep3(ConsoleProgress):
    def epoch(self, epoch, total, logs=None):
        super().epoch(epoch, total, logs)
        if self._task_label.startswith("task 2/") and (logs or {}).get("step") == 3:
            os.kill(os.getpid(), signal.SIGKILL)

flags = dict(dataset="digits", method=method, recipe="hdqt", bits=2, schedule="ctmq",
             ctmq_start_bits=3, ctmq_cycles=2, epochs=4, memory=40, init_classes=6, increment=4)
run_experiment(resolve_config(None, flags), out, progress=KillInStep3(method, epoch_lines=True))
"""
KILLED_FLAGS = ["--dataset", "digits", "--recipe", "hdqt", "--bits", "2", "--schedule", "ctmq",
                "--ctmq-start-bits", "3", "--ctmq-cycles", "2", "--epochs", "4", "--memory", "40",
                "--init-classes", "6", "--increment", "4"]


@pytest.mark.slow  # two tiny runs and a resumed one, in child processes: about a minute each
@pytest.mark.parametrize("method", ["icarl", "der"])
def test_a_run_killed_mid_schedule_resumes_after_its_last_step_to_the_same_result(
        method, tmp_path):
    args = [*KILLED_FLAGS, "--method", method]
    assert run_cli(*args, "--out", str(tmp_path / "reference")) == 0

    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_STEP_3, str(out), method],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "task 2/2 epoch 3/" in killed.stdout and "task 2/2 epoch 4/" not in killed.stdout
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(checkpoint["history"]) == 1  # task 1 finished
    assert checkpoint["in_progress"]["learner"]["task"] == 1
    assert checkpoint["in_progress"]["learner"]["steps_done"] == 2  # 3 -> 2 bits: cycle 1 done

    # In a child process as well: the same loaded code as the killed run's
    resumed = subprocess_cli(*args, "--out", str(out), cwd=tmp_path)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert "resuming after task 1/2" in log
    assert "task 2/2: resuming after schedule step 2/4 from the checkpoint" in log
    # The same metrics (accuracies, saturation counts) and the same final network.
    assert read_metrics(out) == read_metrics(tmp_path / "reference")
    final = torch.load(out / "checkpoint.pt", weights_only=True)["learner"]["network"]
    reference = torch.load(tmp_path / "reference" / "checkpoint.pt",
                           weights_only=True)["learner"]["network"]
    assert_same(final, reference, "network")


def assert_same(a, b, where: str) -> None:
    """Equal nested state: tensors bit for bit, the rest by value."""
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in b:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, where
