"""`hdqt sweep`: grid files, run names, dry runs of the shipped grids, and a tiny digits
sweep on the local backend and on a local Ray instance with a point that fails, a worker
killed mid-run (SIGKILL), Ctrl-C, and resumes whose metrics equal an uninterrupted sweep's.

The killed and the interrupted runs are made deterministic by a ``sitecustomize`` module
that this file writes into a temporary folder put on ``PYTHONPATH`` (so the sweep's worker
processes and Ray's workers load it; hdqt has no test hook of its own): when a run named in
the file ``kill`` (or ``pause``) of that folder reaches the first epoch of its task 2, its
process SIGKILLs itself (or sleeps, after creating ``paused``), once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hdqt.cli import main
from run_helpers import NO_TORCH

REPO = Path(__file__).resolve().parents[2]
GRIDS = REPO / "examples" / "grids"
DIGITS = GRIDS / "digits.toml"
SHIPPED = {"digits.toml": 4, "har.toml": 225, "cifar100.toml": 75}
TAIL = "epochs=2-memory=40-init_classes=5-increment=5"
NAMES = [f"digits-icarl-{recipe}-seed{seed}-{TAIL}" for recipe in ("fp32", "hdqt")
         for seed in (0, 1)]
KILLED = f"digits-icarl-hdqt-seed1-{TAIL}"  # the run whose worker is killed / paused
# A point that fails at run time (not up front: the split needs the data's 10 classes,
# which 3 + 5k never makes).
FAILING_POINT = """
[[point]]
recipe = "fp32"
seed = 0
init_classes = 3
"""
FAILING = "digits-icarl-fp32-seed0-epochs=2-memory=40-init_classes=3-increment=5"
WORKERS = ["--jobs", "2", "--threads", "1"]

HOOK = r'''
import os, sys

HOOKS = os.environ.get("HDQT_TEST_HOOKS")
if HOOKS:
    import importlib.abc, importlib.machinery, signal, time

    def act(name):
        for action in ("kill", "pause"):
            path = os.path.join(HOOKS, action)
            try:
                with open(path) as handle:
                    target = handle.read().strip()
                if target != name:
                    continue
                os.unlink(path)  # once: a resumed run goes on
            except FileNotFoundError:
                continue
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            open(os.path.join(HOOKS, "paused"), "w").close()
            time.sleep(600)

    def patch(module):
        original = module.ConsoleProgress.epoch

        def epoch(self, epoch, total, logs=None):
            original(self, epoch, total, logs)
            if self._task_label.startswith("task 2/"):
                act(self.prefix.strip()[1:-1])

        module.ConsoleProgress.epoch = epoch

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "hdqt.experiments.progress":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module):
                    run(module)
                    patch(module)

                spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())
'''


@pytest.fixture(scope="module")
def hooks(tmp_path_factory):
    """The hook folder, on PYTHONPATH (and HDQT_TEST_HOOKS) for this module's processes."""
    folder = tmp_path_factory.mktemp("hooks")
    (folder / "sitecustomize.py").write_text(HOOK)
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "HDQT_TEST_HOOKS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(folder), saved["PYTHONPATH"]) if p)
    os.environ["HDQT_TEST_HOOKS"] = str(folder)
    yield folder
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def hook(hooks):
    """Arms the hook for one test: ``hook("kill", name)``; disarmed afterwards."""
    def arm(action: str, name: str) -> None:
        (hooks / action).write_text(name)

    yield arm
    for name in ("kill", "pause", "paused"):
        (hooks / name).unlink(missing_ok=True)


def sweep(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["sweep", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def grid_with_failing_point(tmp_path) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(DIGITS.read_text() + FAILING_POINT)
    return path


def runs_of(out: Path) -> dict[str, dict]:
    return {run["name"]: run for run in json.loads((out / "sweep.json").read_text())["runs"]}


def metrics(out: Path, name: str) -> dict:
    return json.loads((out / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hooks):
    """The digits grid swept without interruption (2 workers of 1 thread)."""
    out = tmp_path_factory.mktemp("reference") / "sweep"
    assert main(["sweep", str(DIGITS), "--out", str(out), *WORKERS]) == 0
    return out


# ----------------------------------------------------------------------------- grids


def test_the_paper_grids_are_shipped():
    assert set(SHIPPED) <= {p.name for p in GRIDS.glob("*.toml")}


@pytest.mark.parametrize("name", sorted(p.name for p in GRIDS.glob("*.toml")))
def test_every_shipped_grid_passes_a_dry_run(name, capsys, tmp_path):
    out = tmp_path / "sweep"
    code, text, err = sweep(capsys, GRIDS / name, "--dry-run", "--out", out)
    assert code == 0, err
    listed = [line for line in text.splitlines() if line.startswith("  ")]
    count = SHIPPED.get(name, len(listed))
    assert len(listed) == count > 0
    assert text.splitlines()[0].endswith(f"{count} runs in {out} ({count} new)")
    assert all(line.rstrip().endswith("[new]") for line in listed)
    assert not out.exists()  # a dry run writes nothing


def test_the_paper_grids_hold_the_papers_settings():
    from hdqt.experiments.sweep import load_grid, plan_sweep

    har = plan_sweep(load_grid(GRIDS / "har.toml"))
    assert {(r.config.dataset, r.config.method, r.config.recipe) for r in har} == {
        (d, m, r) for d in ("dsads", "hapt", "pamap2") for m in ("icarl", "bic", "lwf", "der", "memo")
        for r in ("fp32", "hdqt", "int")}
    assert {r.config.seed for r in har} == {0, 1, 2, 3, 4}
    assert {(r.config.epochs, r.config.backbone, r.config.lr) for r in har} == {(100, "fcnet", 0.01)}
    assert har[0].name == "dsads-icarl-fp32-seed0"  # the paper's settings are the defaults
    cifar = plan_sweep(load_grid(GRIDS / "cifar100.toml"))
    assert {(r.config.backbone, r.config.epochs, r.config.milestones, r.config.memory,
             r.config.lr, r.config.weight_decay, r.config.init_classes, r.config.increment)
            for r in cifar} == {("resnet32", 170, (60, 100, 140), 2000, 0.05, 2e-4, 20, 20)}
    assert len({r.config.method for r in cifar}) == 5 and cifar[0].name == "cifar100-icarl-fp32-seed0"


def test_lists_expand_as_a_product_and_each_point_adds_one_run(tmp_path):
    from hdqt.experiments.sweep import load_grid, plan_sweep

    path = tmp_path / "g.toml"
    path.write_text('dataset = "digits"\nepochs = 3\nrecipe = ["fp32", "hdqt"]\nseed = [0, 1, 2]\n'
                    'milestones = [[1], [1, 2]]\n'
                    '[[point]]\nrecipe = "int"\nseed = 7\nmilestones = [2]\nbits = 8\nacc_bits = 16\n')
    runs = plan_sweep(load_grid(path))
    assert len(runs) == 2 * 3 * 2 + 1
    # the first key listed varies slowest
    assert [(r.config.recipe, r.config.seed, r.config.milestones) for r in runs[:3]] == [
        ("fp32", 0, (1,)), ("fp32", 0, (1, 2)), ("fp32", 1, (1,))]
    point = runs[-1]
    assert (point.config.recipe, point.config.seed, point.config.bits) == ("int", 7, 8)
    assert point.config.epochs == 3 and point.config.dataset == "digits"  # the shared values
    assert point.origin == "[[point]] 1"
    assert point.name == "digits-icarl-int-seed7-epochs=3-bits=8-acc_bits=16-milestones=2"
    assert runs[1].name == "digits-icarl-fp32-seed0-epochs=3-milestones=1_2"
    assert runs[1].parameters == {"dataset": "digits", "epochs": 3, "recipe": "fp32", "seed": 0,
                                  "milestones": [1, 2]}
    assert runs[1].varying == ("recipe", "seed", "milestones")
    # points only (no list): the top level is their shared settings, not a run of its own
    path.write_text('dataset = "digits"\nepochs = 3\n[[point]]\nrecipe = "fp32"\n'
                    '[[point]]\nrecipe = "hdqt"\n')
    assert [r.config.recipe for r in plan_sweep(load_grid(path))] == ["fp32", "hdqt"]
    path.write_text('dataset = "digits"\n')  # no list, no point: one run
    assert len(plan_sweep(load_grid(path))) == 1


def test_run_names_are_readable_stable_and_end_in_a_hash_when_long():
    from hdqt.experiments.config import resolve_config
    from hdqt.experiments.sweep import NAME_LIMIT, run_name

    def name(**flags):
        return run_name(resolve_config(None, flags))

    # only what differs from the dataset's defaults, however the grid spells it
    assert name(dataset="digits") == name(dataset="digits", epochs=15, memory=100) == \
        "digits-icarl-hdqt-seed0"
    assert name(dataset="hapt", method="bic", recipe="fp32", seed=3, epochs=100) == \
        "hapt-bic-fp32-seed3"
    assert name(dataset="digits", lr=0.02, bits=8, acc_bits=0) == \
        "digits-icarl-hdqt-seed0-lr=0.02-bits=8-acc_bits=0"
    # milestones that follow the epochs (scaled from the dataset's) are not named
    assert name(dataset="cifar100", epochs=17) == name(dataset="cifar100", epochs=17,
                                                       milestones=(6, 10, 14)) == \
        "cifar100-icarl-hdqt-seed0-epochs=17"
    long = dict(dataset="digits", lr=0.0123456789, momentum=0.8765432101, weight_decay=0.000123456,
                gamma=0.5, temperature=3.5, bic_val_fraction=0.25, batch_size=17, memory=33)
    first, second = name(**long), name(**{**long, "memory": 34})
    assert len(first) <= NAME_LIMIT and re.search(r"-[0-9a-f]{8}$", first)
    assert first.startswith("digits-icarl-hdqt-seed0-lr=0.0123456789")
    assert first != second and first == name(**long)


@pytest.mark.parametrize("text, expected", [
    ('dataset = "digits"\nrecipies = ["fp32"]\n', r"unknown key 'recipies'; valid keys: .*recipe"),
    ('compare = ["fp32", "hdqt"]\n', r"compare: each run of a sweep has one recipe; list the "
                                    r"recipes instead, e.g. recipe = \[\"fp32\", \"hdqt\"\]"),
    ('seed = []\n', r"seed is an empty list, which gives no runs"),
    ('jobs = [1, 2]\n', r"jobs is a setting of the whole sweep and takes one value"),
    ('bits = [4, 1]\n', r"1 of the 2 runs of .*g\.toml are invalid:\n  bits \(from .*g\.toml, "
                        r"grid run 2 of 2: bits = 1\) must be an integer in 2\.\.16"),
    ('method = ["icarl", "ewc"]\n', r"unknown method 'ewc' \(from .*grid run 2 of 2: "
                                    r"method = \"ewc\"\); valid choices"),
    ('seed = [0, 1]\n[[point]]\nseed = 2\nlr = -1.0\n', r"lr \(from .*g\.toml, \[\[point\]\] 1\) "
                                                        r"must be a number > 0"),
    ('seed = [0, 1]\n[[point]]\nlr = 0.1\n', r"\[\[point\]\] 1 does not set seed, which the grid "
                                              r"lists at the top \(seed = \[0, 1\]\)"),
    ('[[point]]\nseed = [0, 1]\n', r"\[\[point\]\] 1: seed = \[0, 1\]: a point is one run"),
    ('[[point]]\nout = "x"\n', r"\[\[point\]\] 1: out is a setting of the whole sweep"),
    ('[point]\nseed = 1\n', r"point must be an array of tables, written \[\[point\]\]"),
    ('seed = [0, 0]\n', r"grid run 1 of 2: seed = 0 and grid run 2 of 2: seed = 0 are the same "
                        r"run \(digits-icarl-hdqt-seed0\)"),
    ('seed = [0]\n[[point]]\nseed = 0\ndevice = "cpu"\n', r"are the same run"),
    ('jobs = 0\n', r"jobs \(from .*g\.toml\) must be an integer >= 1, got 0"),
    ('backend = "slurm"\n', r"backend \(from .*g\.toml\) must be one of local, ray"),
    ('address = "auto"\n', r"address \(from .*g\.toml\) is a setting of the ray backend"),
    ('seed = 1\nseed = 2\n', r"is not valid TOML"),
])
def test_grid_errors_name_the_file_the_run_and_the_key(text, expected, tmp_path, capsys):
    path = tmp_path / "g.toml"
    path.write_text(text)
    code, out, err = sweep(capsys, path, "--dry-run", "--out", tmp_path / "o")
    assert code == 2, out + err
    assert err.startswith("hdqt sweep: error: ") and "Traceback" not in err
    assert re.search(expected, err), err
    assert not (tmp_path / "o").exists()


def test_sweep_flags_are_checked(tmp_path, capsys):
    code, _, err = sweep(capsys, tmp_path / "nope.toml")
    assert code == 2 and "grid file" in err and "nope.toml' does not exist" in err
    code, _, err = sweep(capsys, DIGITS, "--jobs", "0", "--dry-run")
    assert code == 2 and "--jobs must be an integer >= 1, got 0" in err
    code, _, err = sweep(capsys, DIGITS, "--address", "auto", "--dry-run")
    assert code == 2 and "--address is a setting of the ray backend; add --backend ray" in err
    code, _, err = sweep(capsys, DIGITS, "--overwrite", "--force", "--dry-run")
    assert code == 2 and "not both" in err


def test_ray_backend_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    out = tmp_path / "sweep"
    code, _, err = sweep(capsys, DIGITS, "--backend", "ray", "--out", out)
    assert code == 2
    assert "--backend ray" in err and 'install it with: pip install "hdqt[ray]"' in err
    assert not out.exists()  # nothing ran


def test_the_progress_bar_counts_runs_without_rates(capsys):
    from types import SimpleNamespace

    from hdqt.experiments.fingerprint import loaded_code_fingerprint
    from hdqt.experiments.grid import GridOutcome, GridPoint
    from hdqt.experiments.sweep import RunState, Settings, Sweep, load_grid, plan_sweep

    import io

    grid = load_grid(DIGITS)
    runs = plan_sweep(grid)
    settings = Settings(Path("o"), "local", 2, 1, None, 1, {})
    sweep_ = Sweep(grid, settings, runs, [RunState("new", "new")] * 4, loaded_code_fingerprint(),
                   "hdqt sweep g")
    sweep_.bar_stream = bar = io.StringIO()
    sweep_._record = lambda **kwargs: None  # no sweep.json here
    sweep_._open_bar(4)
    metrics = {"primary_classifier": "nme", "avg_incremental_accuracy": 90.0,
               "last_accuracy": 80.0, "num_tasks": 2}
    sweep_._finished(GridOutcome(GridPoint(runs[0].config, Path("x"), label=runs[0].name),
                                 metrics, seconds=1.5, resumed_after=1))
    sweep_._close_bar()
    shown = bar.getvalue()
    assert "sweep: 1/4 runs |" in shown and "/s" not in shown and "it" not in shown.split("|")[0]
    line = capsys.readouterr().out  # the line per finished run, written above the bar
    assert (f"[1/4] done    {runs[0].name}: nme avg incremental accuracy 90.00%, last 80.00% | "
            "1.5 s, resumed after task 1/2") in line


def test_a_second_sweep_in_the_same_directory_is_refused(tmp_path, capsys):
    from hdqt.experiments.sweep import _lock

    out = tmp_path / "sweep"
    out.mkdir()
    held = _lock(out)
    try:
        code, _, err = sweep(capsys, DIGITS, "--out", out)
    finally:
        held.close()
    assert code == 2 and f"another hdqt sweep is running in {out}" in err
    assert not (out / NAMES[0]).exists()



@pytest.mark.parametrize("argv", [["sweep", "--help"], ["sweep"], ["sweep", "g.toml", "--jobs", "x"]])
def test_sweep_help_and_argument_errors_do_not_import_torch(argv):
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True,
                          text=True, timeout=120)
    assert "torch loaded: False" in done.stdout, done.stdout + done.stderr
    assert ("exit 0" if "--help" in argv else "exit 2") in done.stdout


# ----------------------------------------------------------------------------- sweeping


def check_failed_and_killed(code, out_text, out, reference, killed_error):
    assert code == 1, out_text
    runs = runs_of(out)
    assert set(runs) == {*NAMES, FAILING}
    failing = runs[FAILING]
    assert failing["status"] == "failed" and failing["origin"] == "[[point]] 1"
    assert failing["error"].startswith("ConfigError: impossible split for digits (10 classes)")
    assert "ConfigError" in failing["traceback"]
    killed = runs[KILLED]
    assert killed["status"] == "failed" and re.search(killed_error, killed["error"]), killed
    assert "run the grid again to resume" in killed["error"]
    partial = metrics(out, KILLED)  # killed in task 2: task 1 is kept
    assert partial["finished_tasks"] == 1 and not partial["complete"]
    for name in set(NAMES) - {KILLED}:  # the others went on
        assert runs[name]["status"] == "done", runs[name]
        assert metrics(out, name) == metrics(reference, name)
    assert re.search(rf"FAILED  {re.escape(FAILING)}: ConfigError: impossible split", out_text)
    assert f"FAILED  {KILLED}: " in out_text
    assert "Summary: 3 done, 2 failed, 0 skipped (finished earlier) of 5 runs" in out_text
    summary = (out / "summary.md").read_text()
    assert "## Failed runs" in summary and f"`{FAILING}` ([[point]] 1): ConfigError" in summary
    assert not list(out.glob("*/.*.tmp"))


def summary_of(out: Path) -> str:
    return (out / "summary.md").read_text()


def table(text: str) -> list[str]:
    """The rows of summary.md's tables, from the classifier on (the cells before name
    the parameters that vary in the sweep: init_classes, with the failing point)."""
    rows = []
    for line in text.splitlines():
        cells = line.removeprefix("| ").split(" | ")
        at = next((i for i, cell in enumerate(cells) if cell in ("nme*", "cnn", "cnn*", "nme")), None)
        if line.startswith("| ") and at is not None:
            rows.append(" | ".join(cells[at:]))
    return rows


@pytest.mark.slow  # three sweeps of worker processes
def test_local_sweep_isolates_a_failure_and_a_killed_worker_and_resumes_them(
        reference, hook, tmp_path, capsys):
    grid = grid_with_failing_point(tmp_path)
    out = tmp_path / "sweep"
    hook("kill", KILLED)
    code, text, _ = sweep(capsys, grid, "--out", out, *WORKERS)
    check_failed_and_killed(code, text, out, reference, r"its worker process \(pid \d+\) died "
                                                        r"with signal SIGKILL during the run")
    log = (out / "logs" / f"{KILLED}.log").read_text()
    assert "task 1/2 classes" in log and "task 2/2 classes" not in log
    code, text, _ = sweep(capsys, grid, "--out", out, *WORKERS)
    check_resumed_and_tables(code, text, out, reference)


def check_resumed_and_tables(code, text, out, reference):
    assert code == 1, text  # the failing point fails again
    runs = runs_of(out)
    assert runs[KILLED]["status"] == "done" and runs[KILLED]["resumed_after"] == 1
    assert runs[KILLED]["before"] == "resume after task 1/2"
    assert re.search(rf"done    {re.escape(KILLED)}: .*resumed after task 1/2", text)
    assert [runs[name]["status"] for name in NAMES if name != KILLED] == ["skipped"] * 3
    assert "Summary: 1 done, 1 failed, 3 skipped (finished earlier) of 5 runs" in text
    for name in NAMES:  # resumed or not, the metrics of an uninterrupted sweep
        assert metrics(out, name) == metrics(reference, name), name
    # summary.md: the same tables as the uninterrupted sweep's (the failing point adds
    # nothing to them), mean ± std over both seeds and the paired differences
    assert table(summary_of(out)) == table(summary_of(reference))
    rows = table(summary_of(reference))
    assert [row.split(" | ")[0] for row in rows] == ["nme*", "cnn"]
    assert "| 5 | nme* |" in summary_of(out)  # init_classes varies (the failing point's 3)
    assert "| 3 |" not in summary_of(out)  # no finished run with 3: no row
    nme = [metrics(reference, name)["nme"]["avg_incremental_accuracy"] for name in NAMES]
    from hdqt.experiments.grid import stat

    fp32, hdqt = stat(nme[:2]), stat(nme[2:])
    paired = stat([nme[2] - nme[0], nme[3] - nme[1]])
    assert rows[0].startswith(f"nme* | {fp32} | {hdqt} | {paired.mean:+.2f} ± {paired.std:.2f} |")
    assert rows[0].endswith("| 2/2 |")


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT's default action, which Python turns into
    KeyboardInterrupt. A process started in the background of a shell without job
    control (``cmd &`` in a script, nohup) inherits SIGINT ignored, and so would the
    sweep: Ctrl-C would then do nothing, as it should for such a process."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _processes_of_group(pgid: int) -> str:
    """The processes of group ``pgid``, one line each (pid, state, command), for a
    failure message that says which process outlived the sweep."""
    listing = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True,
                             text=True).stdout
    return "\n".join(line for line in listing.splitlines()
                     if line.split()[1:2] == [str(pgid)])


def ctrl_c_once_paused(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run ``args`` in a new session, as from a terminal; once the paused run is mid-task,
    Ctrl-C it (SIGINT to the whole process group, as a terminal does) and wait until
    every process of the group is gone. Returns the exit code, stdout and stderr. The
    group is killed whatever happens, so that a failure leaves nothing running."""
    child = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True, preexec_fn=_as_from_a_terminal,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        paused = Path(os.environ["HDQT_TEST_HOOKS"]) / "paused"
        deadline = time.monotonic() + 600  # generous: a loaded machine starts workers slowly
        while not paused.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), child.communicate(timeout=60)
        os.killpg(child.pid, signal.SIGINT)
        stdout, stderr = child.communicate(timeout=120)
        # The workers are gone, not left running. The sweep waits for the processes of a
        # Ray instance it started, but Ray abandons one that takes over 30 s to die, and
        # the agents its raylet started exit on their own: 90 s for a loaded machine.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                os.killpg(child.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("a process of the interrupted sweep is still running:\n"
                        + _processes_of_group(child.pid))
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait(timeout=60)
    return child.returncode, stdout, stderr


@pytest.mark.slow  # a sweep in a child process, interrupted, then resumed
def test_ctrl_c_stops_the_workers_keeps_finished_runs_and_says_how_to_resume(
        reference, hook, tmp_path):
    out = tmp_path / "sweep"
    hook("pause", KILLED)
    args = [sys.executable, "-m", "hdqt", "sweep", str(DIGITS), "--out", str(out), *WORKERS]
    code, stdout, stderr = ctrl_c_once_paused(args, tmp_path)
    assert code == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert (f"interrupted; finished runs are kept and stopped ones resume after their last "
            f"finished task: rerun `hdqt sweep {DIGITS} --out {out} --jobs 2 --threads 1` "
            f"to go on") in stderr
    runs = runs_of(out)
    assert runs[KILLED]["status"] == "interrupted"
    assert metrics(out, KILLED)["finished_tasks"] == 1  # the task it finished is kept
    done = [name for name in NAMES if runs[name]["status"] == "done"]
    for name in done:
        assert metrics(out, name) == metrics(reference, name)
    assert json.loads((out / "sweep.json").read_text())["interrupted"] is True
    assert not list(out.glob("*/.*.tmp"))  # the stopped run removed its temporary files

    resumed = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs = runs_of(out)
    assert runs[KILLED]["status"] == "done" and runs[KILLED]["resumed_after"] == 1
    assert all(runs[name]["status"] == "skipped" for name in done)
    for name in NAMES:
        assert metrics(out, name) == metrics(reference, name), name


@pytest.mark.slow  # reruns one run of the reference sweep
def test_a_run_made_by_other_code_is_refused_unless_overwrite_or_force(reference, tmp_path,
                                                                       capsys):
    out = tmp_path / "sweep"
    shutil.copytree(reference, out)
    stale = out / NAMES[1] / "config.json"
    payload = json.loads(stale.read_text())
    payload["code"] = {"source_sha256": "0" * 64, "git_commit": None}
    stale.write_text(json.dumps(payload))
    code, text, _ = sweep(capsys, DIGITS, "--out", out, "--dry-run")
    assert code == 0
    assert f"{NAMES[1]}" in text and "[BLOCKED: holds results made by source 000000000000]" in text
    code, text, err = sweep(capsys, DIGITS, "--out", out, *WORKERS)
    assert code == 2
    assert (f"1 of the 4 runs under {out} hold results this sweep does not reuse" in err
            and f"{NAMES[1]}: holds results made by source 000000000000" in err
            and "--overwrite" in err and "--force" in err)
    assert json.loads(stale.read_text())["code"]["source_sha256"] == "0" * 64  # untouched
    code, text, err = sweep(capsys, DIGITS, "--out", out, *WORKERS, "--overwrite")
    assert code == 0, text + err
    assert "Summary: 1 done, 0 failed, 3 skipped (finished earlier) of 4 runs" in text
    assert runs_of(out)[NAMES[1]]["before"] == "made by other code: rerun from scratch (--overwrite)"
    assert json.loads(stale.read_text())["code"]["source_sha256"] != "0" * 64
    assert metrics(out, NAMES[1]) == metrics(reference, NAMES[1])  # same code, same seed


# ----------------------------------------------------------------------------- Ray


def import_ray_or_skip():
    try:
        import ray
    except ImportError as error:
        pytest.skip(f"ray cannot be imported ({error}); install it with pip install 'hdqt[ray]'")
    return ray


@pytest.fixture(scope="module")
def ray_instance(hooks):
    """One local Ray instance for this module's Ray tests (its workers load the hooks)."""
    ray = import_ray_or_skip()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# Ctrl-C reaches a Ray sweep in a child process that starts its own local Ray instance,
# as it does from a terminal: a SIGINT sent to the pytest process itself while it drives
# a Ray instance made whole CI runs exit with status 1 and no report (3 runs in 5).
@pytest.mark.slow  # an interrupted sweep on its own local Ray instance, then its resume
def test_ray_sweep_interrupted_cancels_its_tasks_and_resumes(reference, hook, tmp_path):
    import_ray_or_skip()
    out = tmp_path / "sweep"
    hook("pause", KILLED)
    args = [sys.executable, "-m", "hdqt", "sweep", str(DIGITS), "--out", str(out),
            "--backend", "ray"]
    code, stdout, stderr = ctrl_c_once_paused(args, tmp_path)
    assert code == 130, stdout + stderr
    assert "running on a local Ray instance" in stdout, stdout
    assert f"rerun `hdqt sweep {DIGITS} --out {out} --backend ray` to go on" in stderr, stderr
    runs = runs_of(out)
    assert runs[KILLED]["status"] == "interrupted"
    assert metrics(out, KILLED)["finished_tasks"] == 1
    assert not list(out.glob("*/.*.tmp"))  # the cancelled task unwound
    resumed = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert runs_of(out)[KILLED]["resumed_after"] == 1
    for name in NAMES:
        assert metrics(out, name) == metrics(reference, name), name


@pytest.mark.slow  # two sweeps on a local Ray instance
def test_ray_sweep_isolates_a_failure_and_a_killed_worker_and_resumes_them(
        reference, ray_instance, hook, tmp_path, capsys):
    grid = grid_with_failing_point(tmp_path)
    out = tmp_path / "sweep"
    hook("kill", KILLED)
    code, text, _ = sweep(capsys, grid, "--out", out, "--backend", "ray")
    assert "running on the Ray instance this process is connected to (2 CPUs)" in text
    check_failed_and_killed(code, text, out, reference, r"its Ray task failed: \w+Error")
    code, text, _ = sweep(capsys, grid, "--out", out, "--backend", "ray")
    check_resumed_and_tables(code, text, out, reference)
    assert ray_instance.is_initialized()  # the sweep leaves a Ray it did not start running
