"""The timing scripts of benchmarks/ run and print their tables (one short round each).

Their numbers are not checked (timings are not tests: the machines are shared), only
that every case and recipe gets a line with a number, so that a script broken by an
engine change fails here and not when someone needs it."""
import re
import sys

import pytest
import torch

from hdqt.quantization import native


def _run_main(module, argv, monkeypatch, capsys) -> str:
    """The script's main() with ``argv``, its stdout; torch's thread count (which the
    scripts set) restored for the tests after it."""
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    threads = torch.get_num_threads()
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_bench_engine_prints_every_case_and_recipe(load_benchmark, monkeypatch, capsys):
    bench = load_benchmark("bench_engine")
    out = _run_main(bench, ["--rounds", "1", "--steps", "1", "--threads", "1", "--recipes",
                            "fp32,hdqt,hdqt:unfused,hdqt:channel", "--cases", "fcnet,tiny"], monkeypatch, capsys)
    for case in ("fcnet 405-405-405-19", "tiny 32-32-32-19 batch 8"):
        for recipe in ("fp32", "hdqt", "hdqt:unfused", "hdqt:channel"):
            assert re.search(rf"^{re.escape(case)}\s+{recipe}\s+\d+\.\d+\s+\d+\.\d+", out, re.M), (case, recipe, out)
    assert "conv 16->16" not in out  # --cases picks


def test_bench_engine_names_a_bad_case(load_benchmark, monkeypatch):
    bench = load_benchmark("bench_engine")
    monkeypatch.setattr(sys, "argv", ["bench_engine", "--cases", "fcnet,resnet"])
    with pytest.raises(SystemExit):
        bench.main()


@pytest.mark.skipif(native.load() is None, reason="bench_overhead times native kernel calls: none built here")
def test_bench_overhead_prints_every_entry_point(load_benchmark, monkeypatch, capsys):
    bench = load_benchmark("bench_overhead")
    out = _run_main(bench, ["--rounds", "1", "--calls", "3"], monkeypatch, capsys)
    for name in ("forward product", "exact product", "quantize, nearest", "quantize, stochastic",
                 "transform + stochastic rounding", "pack a saved operand", "unpack it"):
        line = next((row for row in out.splitlines() if row.startswith(name)), None)
        assert line is not None, (name, out)
        assert len(re.findall(r"-?\d+\.\d", line)) == 4, line  # us, bare us, wrapper, ratio
    fused = next(row for row in out.splitlines() if row.startswith("fused calls / separate ones"))
    assert len(re.findall(r"-?\d+\.\d", fused)) == 4, fused  # fused us, separate us, saved, ratio
