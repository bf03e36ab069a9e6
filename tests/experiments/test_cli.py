"""Argument handling of `hdqt run`: precedence, modes, defaults and error messages."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from run_helpers import NO_TORCH, TINY, run_cli
from hdqt.cli import build_parser
from hdqt.experiments.cli import plan_runs


def plan(*argv):
    return plan_runs(build_parser().parse_args(["run", *argv]))


def test_no_arguments_is_the_embedded_default():
    runs, comparison = plan()
    assert comparison
    assert [r.label for r in runs] == ["fp32", "hdqt"]
    assert [r.out_dir for r in runs] == [Path("runs/default/fp32"), Path("runs/default/hdqt")]
    for run in runs:
        assert (run.config.dataset, run.config.method, run.config.seed) == ("digits", "icarl", 0)
    assert runs[0].config.identity() | {"recipe": "hdqt"} == runs[1].config.identity()


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('dataset = "digits"\nmethod = "lwf"\nepochs = 1\nseed = 5\n'
                    'compare = ["fp32", "int"]\nout = "somewhere"\n')
    runs, comparison = plan("--config", str(path), "--seed", "2", "--lr", "0.2")
    assert comparison and [r.label for r in runs] == ["fp32", "int"]
    assert [r.out_dir for r in runs] == [Path("somewhere/fp32"), Path("somewhere/int")]
    for run in runs:
        assert (run.config.method, run.config.epochs) == ("lwf", 1)  # from the file
        assert (run.config.seed, run.config.lr) == (2, 0.2)  # flags win
    # A recipe flag beats the file's compare; --out beats the file's out.
    runs, comparison = plan("--config", str(path), "--recipe", "hdqt", "--out", "here")
    assert not comparison and runs[0].config.recipe == "hdqt" and runs[0].out_dir == Path("here")


def test_default_out_dir_is_stable_per_configuration():
    first, _ = plan("--recipe", "fp32", "--epochs", "3")
    again, _ = plan("--recipe", "fp32", "--epochs", "3")
    other, _ = plan("--recipe", "fp32", "--epochs", "4")
    assert first[0].out_dir == again[0].out_dir != other[0].out_dir
    assert first[0].out_dir.name.startswith("digits-icarl-fp32-seed0-")


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'.*valid choices: .*dsads.*digits"),
    (["--method", "ewc"], "unknown method 'ewc'.*valid choices: .*lwf, icarl, bic, der, memo"),
    (["--recipe", "fp8"], "unknown recipe 'fp8'.*valid choices: fp134, fp32, fp4_e2m1, fp8_e4m3, fp8_e5m2, hadanet, hdqt, int, luq"),
    (["--compare", "fp32,fp8"], "unknown recipe 'fp8'.*valid choices: fp134, fp32, fp4_e2m1, fp8_e4m3, fp8_e5m2, hadanet, hdqt, int, luq"),
    (["--backbone", "vgg"], "unknown backbone 'vgg'.*valid choices: .*fcnet"),
    (["--recipe", "hdqt", "--compare", "fp32,hdqt"], "either recipe or compare"),
    (["--recipe", "hdqt", "--bits", "1"], "bits must be an integer in 2..16"),
    (["--epochs", "5", "--milestones", "5"], r"--milestones must be increasing integers in 1\.\.4"),
    # the default comparison (fp32, hdqt): the flag and its range, not "recipe 'fp32'"
    (["--bits", "0"], r"error: --bits must be an integer in 2\.\.16, got 0$"),
    (["--acc-bits", "1"], r"error: --acc-bits must be 0 \(unlimited\) or an integer in 2\.\.32, "
                          r"got 1$"),
    (["--tile", "-1"], r"error: --tile must be 0 \(the whole reduction, one tile\) or an integer >= 1, got -1$"),
    (["--hadamard-rule", "odd"], r"--hadamard-rule must be one of \('paper', 'binary'\)"),
    (["--device", "nosuch"], r"error: --device 'nosuch' is not a device of this machine.*; "
                             r"devices here: cpu"),
    (["--device", "cuda:99"], r"error: --device 'cuda:99' is not a device of this machine.*; "
                              r"devices here: cpu"),
    (["--recipe", "fp32", "--epochs", "1", "--init-classes", "3"],
     r"impossible split for digits \(10 classes\).*valid increments"),
])
def test_bad_options_exit_2_with_the_valid_choices(argv, expected, capsys, tmp_path):
    assert run_cli(*argv, "--out", str(tmp_path / "out")) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("hdqt run: error: ")
    assert re.search(expected, captured.err.strip()), captured.err
    assert "Traceback" not in captured.err and "recipe 'fp32'" not in captured.err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_device_is_checked_up_front_also_from_the_config_file(tmp_path, capsys):
    import torch

    path = tmp_path / "gpu.toml"
    path.write_text('device = "cuda"\n')
    if torch.cuda.is_available():
        path.write_text('device = "cuda:99"\n')
    assert run_cli("--config", str(path), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert re.search(r"^hdqt run: error: device \(from .*gpu\.toml\) 'cuda(:99)?' is not a device "
                     r"of this machine.*; devices here: cpu", err), err
    assert not (tmp_path / "out").exists()


def test_every_key_with_a_flag_has_one_and_the_help_says_how_accumulators_saturate():
    from hdqt.experiments.config import CONFIG_KEYS, FILE_ONLY_KEYS

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]
    flags = {action.dest: action.option_strings for action in run_parser._actions}
    for key in CONFIG_KEYS:
        if key not in FILE_ONLY_KEYS:
            assert "--" + key.replace("_", "-") in flags.get(key, ()), key
    assert flags["saturate_backward"] == ["--saturate-backward", "--no-saturate-backward"]
    text = " ".join(run_parser.format_help().split())
    assert ("It limits the FORWARD product only, unless --saturate-backward: each tile of --tile "
            "products is summed and saturated once, at the end of the tile, to "
            "+-(2^(acc_bits-1)-1); the sum across tiles is not saturated") in text


def test_saturate_backward_and_hadamard_rule_flags_override_the_file(tmp_path):
    path = tmp_path / "q.toml"
    path.write_text('recipe = "hdqt"\nsaturate_backward = true\nhadamard_rule = "binary"\n')
    (run,), _ = plan("--config", str(path))
    assert (run.config.saturate_backward, run.config.hadamard_rule) == (True, "binary")
    (run,), _ = plan("--config", str(path), "--no-saturate-backward", "--hadamard-rule", "paper")
    assert (run.config.saturate_backward, run.config.hadamard_rule) == (False, "paper")
    plain, _ = plan("--recipe", "hdqt")
    other, _ = plan("--recipe", "hdqt", "--saturate-backward")
    assert plain[0].out_dir != other[0].out_dir  # part of the run's identity


def test_unknown_key_in_config_file_names_key_and_file(tmp_path, capsys):
    path = tmp_path / "typo.toml"
    path.write_text("epochs = 1\nlearning_rate = 0.1\n")
    assert run_cli("--config", str(path)) == 2
    err = capsys.readouterr().err
    assert "typo.toml" in err and "unknown key 'learning_rate'" in err


def test_run_prints_one_line_per_task_and_a_summary(tmp_path, capsys):
    # Not a terminal (pytest captures): no bars, and a line per task, not per epoch.
    out_dir = tmp_path / "r"
    assert run_cli(*TINY, "--recipe", "fp32", "--epochs", "2", "--out", str(out_dir)) == 0
    out = capsys.readouterr().out
    task_lines = [line for line in out.splitlines() if line.startswith("[fp32] task ")]
    assert len(task_lines) == 5, out
    for task, line in enumerate(task_lines, 1):
        assert re.fullmatch(rf"\[fp32\] task {task}/5 classes \[\d, \d\]: 2 epochs, last: "
                            rf"train loss [\d.]+, train accuracy [\d.]+% \| test accuracy "
                            rf"\({2 * task} classes seen\): cnn [\d.]+%, nme [\d.]+% \| "
                            rf"[\d.]+ s", line), line
    assert "epoch 1/2" not in out
    assert "avg incremental accuracy" in out and "backward transfer" in out
    assert "nme = nearest-mean-of-exemplars classifier, cnn = the network's own head" in out
    # the last line says where the files are
    assert out.rstrip().splitlines()[-1] == (
        f"Outputs in {out_dir}: config.json (configuration, resolved quantization), "
        f"metrics.json (all metrics), tasks.csv (a row per task), checkpoint.pt (to resume)")


def test_progress_bars_show_no_rates_and_label_their_numbers():
    import io

    from hdqt.experiments.progress import ConsoleProgress
    from hdqt.experiments.config import resolve_config

    class Task:
        index = 0

    lines, bars = io.StringIO(), io.StringIO()
    progress = ConsoleProgress("hdqt", stream=lines, bars=True, bar_stream=bars)
    progress.run_started(resolve_config(None, {"epochs": 2}), 1, 0)
    progress.task_started(Task(), 1)
    for epoch in (1, 2):
        progress.epoch(epoch, 3, {"loss": 0.5, "accuracy": 50.0, "lr": 0.01, "stage": "main"})
    progress.epoch(3, 3, {"loss": 0.25, "accuracy": 75.0, "lr": 0.01, "stage": "bias"})
    progress.task_finished({"task": 0, "classes": [3, 1], "num_seen_classes": 2, "seconds": 1.5,
                            "accuracy": {"cnn": {"seen": 80.0}, "nme": {"seen": 90.0}}}, 1)
    progress.run_finished(None)
    shown = bars.getvalue()
    assert "/s" not in shown and "s/epoch" not in shown and "accuracy=" not in shown, shown
    assert "task 1/1: 2/3 epochs" in shown and "train loss 0.5, train accuracy 50.0%, lr 0.01" in shown
    assert "bias stage, loss 0.25, accuracy 75.0%" in shown  # not called a training accuracy
    assert "[hdqt] run: 1/1 tasks" in shown
    assert lines.getvalue().splitlines()[-1] == (
        "[hdqt] task 1/1 classes [3, 1]: 3 epochs (2 main + 1 bias), last: train loss 0.5, "
        "train accuracy 50.0% | test accuracy (2 classes seen): cnn 80.00%, nme 90.00% | 1.5 s")




@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["--bits", "four"],
                                  ["--no-such-flag"], ["nosuch"], ["data", "--help"],
                                  ["energy", "--help"], ["info", "--help"], ["sweep", "--help"],
                                  ["report", "--help"], ["diagnose", "--help"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True,
                          text=True, timeout=120)
    assert "torch loaded: False" in done.stdout, done.stdout + done.stderr
    assert ("exit 0" if "--help" in argv else "exit 2") in done.stdout


LAZY_PACKAGE = """
import sys
import hdqt
assert "torch" not in sys.modules, "import hdqt loaded torch"
assert set(hdqt.__all__) <= set(dir(hdqt)), sorted(set(hdqt.__all__) - set(dir(hdqt)))
assert "recipe" in dir(hdqt) and "quantization" in dir(hdqt)
from hdqt import QuantPolicy, quantize_model
policy = hdqt.recipe("hdqt", bits=4)
assert isinstance(policy, QuantPolicy) and hdqt.list_recipes() == ["fp134", "fp32", "fp4_e2m1", "fp8_e4m3", "fp8_e5m2", "hadanet", "hdqt", "int", "luq"]
assert hdqt.QuantLinear is hdqt.quantization.QuantLinear
try:
    hdqt.no_such_name
except AttributeError as error:
    assert "no_such_name" in str(error)
else:
    raise AssertionError("hdqt.no_such_name did not raise")
print("ok")
"""


def test_import_hdqt_is_lazy_and_every_public_name_still_works():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LAZY_PACKAGE], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
