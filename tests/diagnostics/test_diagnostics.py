"""Gradient diagnostics: alignment with float32, bias and variance over draws, level use."""
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import hdqt
from hdqt.cli import main
from hdqt.diagnostics import diagnose, level_use, operand_level_use
from hdqt.diagnostics.tracking import DiagnosticsTracker, keep_tasks_before, read_records
from hdqt.quantization import block_layout, int_quantizer


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=generator)
    y = torch.randint(0, 5, (64,), generator=generator)
    return model, x, y


def _all_stats(result):
    return [s for layer in result.layers for s in (layer.dx, layer.dw) if s is not None]


def test_fp32_policy_matches_autograd_exactly():
    model, x, y = _tiny()
    result = diagnose(model, x, y, hdqt.recipe("fp32"), draws=3)
    assert [layer.name for layer in result.layers] == ["0", "2", "4"]
    assert result.layers[0].dx is None  # the first layer is fed the data: no dX, as in training
    for stats in _all_stats(result):
        assert stats.cosine == pytest.approx(1.0, abs=1e-9)
        assert stats.rel_bias == pytest.approx(0.0, abs=1e-9)
        assert stats.rel_variance == 0.0
    assert all(layer.levels == {} for layer in result.layers)  # nothing quantized


def test_alignment_is_high_at_12_bits_and_lower_at_4():
    model, x, y = _tiny()
    wide = diagnose(model, x, y, hdqt.recipe("hdqt", bits=12, acc_bits=None), draws=4, levels=False)
    narrow = diagnose(model, x, y, hdqt.recipe("hdqt", bits=4, acc_bits=8), draws=4, levels=False)
    for w, n in zip(_all_stats(wide), _all_stats(narrow)):
        assert w.cosine > 0.99
        assert n.cosine < w.cosine
        assert n.rel_variance > w.rel_variance
    assert min(s.cosine for s in _all_stats(narrow)) < 0.95


def test_stochastic_rounding_is_unbiased_with_a_variance():
    # Only dW's two operands are quantized, both stochastically: every draw's dW is an
    # unbiased estimate of float32's, so the bias of the mean of D draws is the noise
    # left after averaging, ~sqrt(rel_variance / D).
    model, x, y = _tiny()
    sr = int_quantizer(4, rounding="stochastic")
    policy = hdqt.QuantPolicy(grad_output_dw=sr, backward_input=sr, name="sr-dw")
    draws = 32
    result = diagnose(model, x, y, policy, draws=draws, levels=False)
    for layer in result.layers:
        dw = layer.dw
        assert dw.rel_variance > 0.001
        assert dw.rel_bias ** 2 < 3 * dw.rel_variance / draws
        assert dw.rel_bias < 0.15
        if layer.dx is not None:  # dX is not quantized: exact
            assert layer.dx.rel_variance == pytest.approx(0.0, abs=1e-12)
    # round to nearest instead: the same error in every draw, no variance, and a bias that stays
    rtn = int_quantizer(4)
    fixed = diagnose(model, x, y, replace(policy, grad_output_dw=rtn, backward_input=rtn), draws=4, levels=False)
    for layer in fixed.layers:
        assert layer.dw.rel_variance == 0.0 and layer.dw.rel_bias > 0.01


def test_diagnose_leaves_the_model_alone():
    model, x, y = _tiny()
    qmodel = hdqt.quantize_model(model, hdqt.recipe("hdqt"))
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if isinstance(v, torch.Tensor)}
    states = {n: m._rt.generator_states() for n, m in hdqt.quantization.quant_layers(qmodel)}
    diagnose(qmodel, x, y, None, draws=2)  # the model's own policies
    after = qmodel.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in qmodel.parameters())
    assert states == {n: m._rt.generator_states() for n, m in hdqt.quantization.quant_layers(qmodel)}


def test_a_conv_model_is_diagnosed_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 3 * 3, 3))
    x, y = torch.randn(8, 2, 8, 8), torch.randint(0, 3, (8,))
    result = diagnose(model, x, y, hdqt.recipe("hdqt", bits=12, acc_bits=None), draws=2)
    assert [layer.kind for layer in result.layers] == ["conv2d", "conv2d", "linear"]
    assert all(s.cosine > 0.98 for s in _all_stats(result))
    # dW of a conv reduces over each sample's positions: its columns hold K x B x L codes
    x_dw = result.layers[1].levels["backward_input"]["plain"]
    assert x_dw.elements == 4 * 9 * 8 * 3 * 3 and x_dw.levels == 2 ** 12 - 1


def test_level_counts_on_a_hand_made_tensor():
    use = level_use(torch.tensor([-7.0, -7.0, 0.0, 0.0, 0.0, 3.0]), -7, 7)
    assert (use.levels, use.hit, use.elements) == (15, 3, 6)
    p = [2 / 6, 3 / 6, 1 / 6]
    assert use.entropy_bits == pytest.approx(-sum(q * math.log2(q) for q in p))
    assert use.max_entropy_bits == pytest.approx(math.log2(15))
    every = level_use(torch.arange(16.0), 0, 15)  # an unsigned 4-bit grid, each level once
    assert (every.levels, every.hit) == (16, 16) and every.entropy_bits == pytest.approx(4.0)
    with pytest.raises(ValueError):
        level_use(torch.tensor([0.5]), -7, 7)
    with pytest.raises(ValueError):
        level_use(torch.tensor([8.0]), -7, 7)


def test_the_hadamard_transform_spreads_an_outlier_over_the_levels():
    generator = torch.Generator().manual_seed(0)
    g = 0.01 * torch.randn(16, 64, generator=generator)
    g[:, 5] = 10.0  # one outlier per row: max-scaled, everything else rounds to zero
    q = int_quantizer(4, rounding="stochastic")
    plain = operand_level_use(q, g, 1, None, torch.Generator().manual_seed(1))
    spread = operand_level_use(q, g, 1, block_layout(64), torch.Generator().manual_seed(1))
    assert plain.hit <= 4 and plain.entropy_bits < 0.3  # -1, 0, 1 (stochastic) and the outlier
    assert spread.hit >= 3 and spread.entropy_bits > plain.entropy_bits + 0.5


def test_level_use_compares_hadamard_on_and_off_per_operand():
    model, x, y = _tiny()
    result = diagnose(model, x, y, hdqt.recipe("int"), draws=1)  # the recipe without the transform
    first, second = result.layers[:2]
    assert set(first.levels) == {"grad_output_dw", "backward_input"}  # no dX for the first layer
    assert set(second.levels) == {"grad_output_dx", "backward_weight", "grad_output_dw", "backward_input"}
    for uses in second.levels.values():
        assert set(uses) == {"hadamard", "plain"}
        assert uses["plain"].levels == 15 and 1 <= uses["plain"].hit <= 15
    # dW of a linear layer reduces over the batch: G^T is (N, B)
    assert second.levels["grad_output_dw"]["plain"].elements == 32 * 64
    # Rounded to nearest, only the transform tells the two apart: G^T's rows (the batch of
    # 64, one block of 64) come out on other levels with it.
    rtn = int_quantizer(4)
    fixed = diagnose(model, x, y, replace(hdqt.recipe("int"), grad_output_dw=rtn, backward_input=rtn), draws=1)
    for layer in fixed.layers:
        uses = layer.levels["grad_output_dw"]
        assert uses["hadamard"] != uses["plain"]
        assert uses["hadamard"].entropy_bits > uses["plain"].entropy_bits  # the outliers spread
    table = result.table()
    assert "| 2 | G (dW) | 15 |" in table and "dW rel. bias" in table


def test_diagnose_cli_tables_and_json(capsys):
    assert main(["diagnose", "--synthetic", "--draws", "2", "--batch-size", "8", "--compare", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "## hdqt" in out and "## fp32" in out and "| head |" not in out
    assert main(["diagnose", "--synthetic", "--draws", "2", "--batch-size", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (result,) = data["results"]
    assert result["policy"] == "hdqt" and [layer["name"] for layer in result["layers"]] == [
        "0.layer1.0", "0.layer2.0", "1"]
    assert main(["diagnose", "--synthetic", "--draws", "0"]) == 2
    assert "--draws must be a positive integer" in capsys.readouterr().err


def test_the_tracker_records_every_nth_step_and_a_resume_drops_redone_tasks(tmp_path):
    model, x, y = _tiny()

    class Learner:  # what the tracker reads of a learner
        network = hdqt.quantize_model(model, hdqt.recipe("hdqt"))

    path = tmp_path / "diagnostics.jsonl"
    tracker = DiagnosticsTracker(path, 3, draws=2)
    for task in (0, 1):
        for _ in range(4):
            tracker(Learner, x[:16], y[:16], task, "main")
        tracker(Learner, x[:16], y[:16], task, "balanced")  # other stages: not the network's inputs
    records = read_records(path)
    assert [(r["task"], r["step"]) for r in records] == [(0, 0), (0, 3), (1, 0), (1, 3)]
    assert records[0]["layers"][1]["dx"]["cosine"] > 0.5 and records[0]["draws"] == 2
    with open(path, "a") as handle:
        handle.write('{"task": 2, "step"')  # a run killed mid-line
    assert len(read_records(path)) == 4
    keep_tasks_before(path, 1)
    assert [(r["task"], r["step"]) for r in read_records(path)] == [(0, 0), (0, 3)]
    keep_tasks_before(path, 0)
    assert not path.exists()


@pytest.mark.slow
def test_diagnose_every_leaves_the_run_unchanged_and_writes_next_to_the_metrics(tmp_path):
    tiny = ["run", "--dataset", "digits", "--method", "icarl", "--epochs", "1", "--memory", "40",
            "--recipe", "hdqt"]
    assert main([*tiny, "--out", str(tmp_path / "plain")]) == 0
    assert main([*tiny, "--out", str(tmp_path / "tracked"), "--diagnose-every", "4"]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    tracked = json.loads((tmp_path / "tracked" / "metrics.json").read_text())
    assert plain == tracked
    assert plain["energy_per_step"]["total_pj"] == pytest.approx(
        plain["energy_per_step"]["compute_pj"] + plain["energy_per_step"]["memory_pj"])
    records = read_records(tmp_path / "tracked" / "diagnostics.jsonl")
    assert {r["task"] for r in records} == set(range(plain["num_tasks"]))
    assert all(r["step"] % 4 == 0 for r in records) and not (tmp_path / "plain" / "diagnostics.jsonl").exists()
    config = json.loads((tmp_path / "tracked" / "config.json").read_text())["config"]
    assert config["diagnose_every"] == 4
    # a run's checkpoint, data and policy
    assert main(["diagnose", "--run", str(tmp_path / "plain"), "--draws", "2", "--json"]) == 0


def test_diagnose_reads_a_run_directory(tmp_path, capsys):
    assert main(["run", "--dataset", "digits", "--method", "finetune", "--epochs", "1", "--recipe", "int",
                 "--init-classes", "4", "--increment", "6", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--run", str(tmp_path / "run"), "--draws", "2", "--batch-size", "16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (result,) = data["results"]
    assert result["policy"] == "int" and result["batch"] == 16 and "after task 2" in data["model"]
    assert [layer["name"] for layer in result["layers"]] == ["backbone.layer1.0", "backbone.layer2.0", "head"]
    assert main(["diagnose", "--run", str(tmp_path / "run"), "--recipe", "fp32", "--draws", "2", "--json"]) == 0
    (fp32,) = json.loads(capsys.readouterr().out)["results"]
    assert all(layer["dw"]["cosine"] == pytest.approx(1.0) for layer in fp32["layers"])
    assert main(["diagnose", "--run", str(tmp_path / "nothing")]) == 2
    # a run trained on a GPU (its config says cuda) is diagnosed on the CPU, GPU or not
    config_file = tmp_path / "run" / "config.json"
    saved = json.loads(config_file.read_text())
    saved["config"]["device"] = "cuda"
    config_file.write_text(json.dumps(saved))
    assert main(["diagnose", "--run", str(tmp_path / "run"), "--draws", "2", "--batch-size", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["batch"] == 16


def test_level_use_on_a_float_grid():
    from hdqt.diagnostics import grid_level_use

    grid = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    use = grid_level_use(torch.tensor([0.5, 0.5, -1.0, 0.0]), grid)
    assert (use.levels, use.hit) == (5, 3) and use.entropy_bits == pytest.approx(1.5)
    with pytest.raises(ValueError):
        grid_level_use(torch.tensor([0.25]), grid)


@pytest.mark.parametrize("name", hdqt.list_recipes())
def test_every_recipe_of_the_engine_is_diagnosed(name):
    model, x, y = _tiny()
    result = diagnose(model, x[:16], y[:16], hdqt.recipe(name), draws=2)
    for stats in _all_stats(result):
        assert stats.cosine is not None and -1.0 <= stats.cosine <= 1.0 + 1e-9
    for layer in result.layers:
        for uses in layer.levels.values():
            assert 1 <= uses["plain"].hit <= uses["plain"].levels


def test_run_experiment_calls_a_callers_step_hook_after_the_diagnostics(tmp_path):
    from hdqt.experiments.config import resolve_config
    from hdqt.experiments.runner import run_experiment

    config = resolve_config(None, {"dataset": "digits", "method": "finetune", "epochs": 1, "recipe": "int",
                                   "init_classes": 4, "increment": 6, "diagnose_every": 3}, source="test")
    seen = []

    def hook(learner, x, y, task_index, stage):
        seen.append((task_index, stage, x.shape[0] == y.shape[0]))

    result = run_experiment(config, tmp_path / "run", on_step=hook)
    assert result.metrics["complete"]
    assert {task for task, _, _ in seen} == {0, 1} and all(same for _, _, same in seen)
    # the diagnostics hook still ran: every third step of both tasks recorded
    records = read_records(tmp_path / "run" / "diagnostics.jsonl")
    assert {r["task"] for r in records} == {0, 1} and all(r["step"] % 3 == 0 for r in records)
