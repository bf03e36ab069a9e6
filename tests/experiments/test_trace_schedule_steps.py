"""benchmarks/trace_schedule_steps.py: its per-step lines on a small CTMQ run, and the two
measures it reports (all-zero quantized rows, flat BatchNorm inputs) on a known network."""
import re
import sys

import torch
import torch.nn as nn

import hdqt

CONFIG = """\
dataset = "digits"
method = "icarl"
recipe = "hdqt"
bits = 2
epochs = 2
memory = 40
init_classes = 2
increment = 2
seed = 0
batch_size = 64
schedule = "ctmq"
ctmq_start_bits = 3
ctmq_cycles = 1
"""


def test_it_prints_every_step_of_the_schedule(load_benchmark, monkeypatch, capsys, tmp_path):
    trace = load_benchmark("trace_schedule_steps")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    monkeypatch.setattr(sys, "argv", ["trace_schedule_steps", str(config), "--out", str(tmp_path / "run"),
                                      "--stop-task", "2"])
    trace.main()
    out = capsys.readouterr().out
    # task 1 trains CTMQ's two steps (3 bits, then the 2-bit target), one header each
    assert re.findall(r"^task 1 \(main\), step (\d): hdqt.*, (\d) bits$", out, re.M) == [("1", "3"), ("2", "2")]
    lines = [line for line in out.splitlines() if "max|dW|" in line]
    assert len(lines) == 2 * 3  # FCNet's two hidden layers and its head, at each step
    for line in lines:
        assert re.search(r"max\|w\|\s+\d.*, max\|dW\|\s+\d.*\(float backward \d.*\), zero rows \d+ of \d+$", line), line
    assert out.rstrip().endswith("stopped before task 2")


def test_zero_rows_and_flat_batchnorm_inputs(load_benchmark):
    trace = load_benchmark("trace_schedule_steps")
    torch.manual_seed(0)
    net = hdqt.quantize_model(nn.Sequential(nn.Linear(6, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
                                            nn.Linear(4, 3, bias=False)), hdqt.recipe("hdqt"))
    with torch.no_grad():
        net[0].weight[1] = 1e-3  # far under the per-tensor scale: rounds to zeros
        net[0].weight[2] = 0.0
    assert trace.zero_rows(net[0]) == 2
    flat = trace.flat_batchnorm_inputs(net, torch.randn(16, 6))
    assert flat == {"0": (2, 4)}  # the two rows' outputs are constant over the batch
