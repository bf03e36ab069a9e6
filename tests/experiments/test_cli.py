"""Argument handling of `hdqt run`: precedence, modes, defaults and error messages."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from run_helpers import TINY, run_cli
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
    (["--recipe", "fp8"], "unknown recipe 'fp8'.*valid choices: fp32, hdqt, int"),
    (["--compare", "fp32,fp8"], "unknown recipe 'fp8'.*valid choices: fp32, hdqt, int"),
    (["--backbone", "vgg"], "unknown backbone 'vgg'.*valid choices: .*fcnet"),
    (["--recipe", "hdqt", "--compare", "fp32,hdqt"], "either recipe or compare"),
    (["--recipe", "hdqt", "--bits", "1"], "bits must be an integer in 2..16"),
    (["--epochs", "5", "--milestones", "5"], "milestones must be increasing epochs in 1..4"),
    (["--recipe", "fp32", "--epochs", "1", "--init-classes", "3"],
     r"impossible split for digits \(10 classes\).*valid increments"),
])
def test_bad_options_exit_2_with_the_valid_choices(argv, expected, capsys, tmp_path):
    assert run_cli(*argv, "--out", str(tmp_path / "out")) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("hdqt run: error: ")
    assert re.search(expected, captured.err), captured.err


def test_unknown_key_in_config_file_names_key_and_file(tmp_path, capsys):
    path = tmp_path / "typo.toml"
    path.write_text("epochs = 1\nlearning_rate = 0.1\n")
    assert run_cli("--config", str(path)) == 2
    err = capsys.readouterr().err
    assert "typo.toml" in err and "unknown key 'learning_rate'" in err


def test_run_prints_one_line_per_task_and_a_summary(tmp_path, capsys):
    assert run_cli(*TINY, "--recipe", "fp32", "--epochs", "1", "--out", str(tmp_path / "r")) == 0
    out = capsys.readouterr().out
    for task in range(1, 6):
        assert f"[fp32] task {task}/5 classes" in out
    assert "avg incremental accuracy" in out and "backward transfer" in out


# Runs in a fresh interpreter: prints whether torch was imported after the parser ran.
NO_TORCH = """
import sys
from hdqt.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    print("exit", done.code)
print("torch loaded:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["--bits", "four"],
                                  ["--no-such-flag"], ["nosuch"]])
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
assert isinstance(policy, QuantPolicy) and hdqt.list_recipes() == ["fp32", "hdqt", "int"]
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
