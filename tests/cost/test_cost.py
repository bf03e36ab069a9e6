"""The cost model: counts against hand computation, and ratios that move the right way."""
import json

import pytest
import torch.nn as nn

import hdqt
from hdqt.cli import main
from hdqt.cost import EnergyTable, count_costs, estimate


def _by_part(cost, part, op):
    return {(n, b, ob): c for (p, n, o, b, ob), c in cost.operations.items() if p == part and o == op}


def test_a_tiny_linear_layer_counts_as_computed_by_hand():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    policy = hdqt.recipe("hdqt", bits=4, acc_bits=8, tile=2)
    first, second = count_costs(model, (4,), policy, batch=2)
    # the first layer is fed the data: no dX product, transform or quantizers for it
    assert first.macs == {"forward": 2 * 3 * 4, "dx": 0, "dw": 2 * 3 * 4}
    # the second: K = 3, N = 2, batch 2 -> 12 MACs per product
    assert second.macs == {"forward": 12, "dx": 12, "dw": 12}
    assert _by_part(second, "forward", "mul") == {("int", 4, 4): 12}
    # a tile of 2 adds at 8 bits per product; 4 outputs x ceil(3 / 2) tiles combined at 32 bits
    assert _by_part(second, "forward", "add") == {("int", 8, None): 12, ("int", 32, None): 8}
    assert _by_part(second, "dx", "add") == {("int", 32, None): 12}  # unlimited backward accumulators
    assert _by_part(second, "dw", "mul") == {("int", 4, 4): 12}
    # Hadamard: dX along N = 2 (one block of 2: 2 adds a vector) over 2 rows of G and 3 of W^T;
    # dW along the batch of 2 over N + K = 5 vectors
    assert _by_part(second, "hadamard", "add") == {("float", 32, None): 2 * (2 + 3) + 2 * 5}
    # bytes: W read twice at 4 bits (6 bytes); X at 4 bits for each product (3 + 3), Y written (16);
    # G read at 4 bits for each product (4), dX (24) and dW (24) written at 32 bits
    assert dict(second.bytes) == {"weights": 6, "activations": 22, "gradients": 52}


def test_a_tiny_conv_layer_counts_as_computed_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 2, 3))
    policy = hdqt.recipe("hdqt", bits=4, acc_bits=8, tile=4)
    _, conv = count_costs(model, (1, 4, 4), policy, batch=2)
    # K = 1 * 3 * 3 = 9, N = 2, L = 2 * 2 positions, batch 2: 2 * 4 * 2 * 9 = 144 MACs
    assert conv.kind == "conv2d" and conv.macs == {"forward": 144, "dx": 144, "dw": 144}
    # 16 outputs, ceil(9 / 4) = 3 tiles each
    assert _by_part(conv, "forward", "add") == {("int", 8, None): 144, ("int", 32, None): 16 * 3}
    # dX along N = 2 over B*L = 8 rows of G and K = 9 of W; dW along L = 4 (one block: 4 * 2 adds)
    # over B * (N + K) = 22 vectors
    assert _by_part(conv, "hadamard", "add") == {("float", 32, None): 2 * (8 + 9) + 8 * 22}


def test_a_binarized_product_counts_xnor_popcount_and_the_betas_by_hand():
    """hadanet: an XNOR (1-bit multiply) and a popcount add per MAC, two float multiplies
    and a float add per output and group; the backward stays float32."""
    model = nn.Sequential(nn.Linear(8, 40), nn.Linear(40, 2))
    for group, groups in ((None, 1), (16, 3)):  # K = 40: one group per row, or 16 + 16 + 8
        policy = hdqt.recipe("hadanet", group=group)
        _, second = count_costs(model, (8,), policy, batch=2)
        outputs, macs = 2 * 2, 2 * 2 * 40
        g = 40 if group is None else 16
        count_bits = {40: 6, 16: 5}[g]  # ceil(log2(g + 1)): a count of 0..g
        assert _by_part(second, "forward", "mul") == {("int", 1, 1): macs,
                                                      ("float", 32, 32): 2 * outputs * groups}
        assert _by_part(second, "forward", "add") == {("int", count_bits, None): macs,
                                                      ("float", 32, None): outputs * groups}
        assert _by_part(second, "dx", "mul") == {("float", 32, 32): macs}
        assert _by_part(second, "dw", "mul") == {("float", 32, 32): macs}
        # binarizing X (2 x 40) and W (2 x 40): sign and |x| sum a value, a mean a group
        assert _by_part(second, "quantize", "add") == {("float", 32, None): 2 * (80 + 80)}
        assert _by_part(second, "quantize", "mul") == {("float", 32, 32): (2 + 2) * groups}
        # signs at 1 bit and a 4-byte beta per row and group; W's backward copy is float32
        assert second.bytes["weights"] == 80 / 8 + 2 * groups * 4 + 80 * 4
    table = EnergyTable()
    fp32 = estimate(model, (8,), hdqt.recipe("fp32"), batch=2, table=table)
    hadanet = estimate(model, (8,), hdqt.recipe("hadanet"), batch=2, table=table)
    forward = {name: sum(c * table.operation(n, o, b, ob) for (p, n, o, b, ob), c in
                         step.layers[1].operations.items() if p == "forward")
               for name, step in (("fp32", fp32), ("hadanet", hadanet))}
    assert forward["hadanet"] < forward["fp32"] / 10


def test_fp32_counts_float_operations_only():
    (cost,) = count_costs(nn.Sequential(nn.Linear(8, 8)), (8,), hdqt.recipe("fp32"), batch=4)
    numbers = {n for (_, n, _, _, _) in cost.operations}
    assert numbers == {"float"} and _by_part(cost, "forward", "mul") == {("float", 32, 32): 256}


def _energy(**overrides):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return estimate(model, (64,), hdqt.recipe("hdqt", **overrides), batch=32)


def test_ratios_move_the_right_way():
    base = _energy()
    assert _energy(bits=3).compute_pj < base.compute_pj < _energy(bits=6, acc_bits=16).compute_pj
    assert base.compute_pj < _energy(acc_bits=16).compute_pj < _energy(acc_bits=None).compute_pj
    assert _energy(tile=8).compute_pj > base.compute_pj > _energy(tile=64).compute_pj  # more tiles to combine
    assert base.memory_pj < _energy(bits=8, acc_bits=16).memory_pj
    fp32 = estimate(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), (64,), hdqt.recipe("fp32"),
                    batch=32)
    integer = estimate(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), (64,), hdqt.recipe("int"),
                       batch=32)
    assert integer.total_pj < base.total_pj < fp32.total_pj  # the transform costs adds, not multiplies


def test_energy_table_interpolates_and_scales():
    table = EnergyTable()
    assert table.operation("int", "add", 8) == pytest.approx(0.03)
    assert table.operation("int", "add", 16) == pytest.approx(0.03 + 0.07 / 3)  # linear between 8 and 32
    assert table.operation("int", "add", 4) == pytest.approx(0.015)  # proportional below the table
    assert table.operation("int", "mul", 4, 4) == pytest.approx(0.2 * 16 / 64)  # product of the widths
    assert table.operation("int", "mul", 4, 8) == pytest.approx(0.2 * 32 / 64)
    assert table.operation("float", "mul", 32, 32) == pytest.approx(3.7)


def test_a_user_table_replaces_entries_and_bad_ones_are_named(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[int]\nmul = { 8 = 1.0 }\n[memory]\nuse = "dram"\ndram = 1300.0\n')
    table = EnergyTable.from_toml(path)
    assert table.operation("int", "mul", 8, 8) == 1.0 and table.memory_access() == 1300.0
    assert table.operation("int", "add", 8) == pytest.approx(0.03)  # the rest stays default
    path.write_text("[int]\nmul = 3\n")
    with pytest.raises(ValueError, match=r"mine.toml: \[int\] mul must map bit widths to pJ"):
        EnergyTable.from_toml(path)
    path.write_text("[gpu]\n")
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['gpu'\]"):
        EnergyTable.from_toml(path)


def test_hdqt_energy_prints_json_and_tables(capsys):
    assert main(["energy", "--dataset", "digits", "--compare", "fp32,int", "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    totals = {s["policy"]: s["total_pj"] for s in steps}
    assert totals["int"] < totals["hdqt"] < totals["fp32"]
    assert steps[0]["batch"] == 32 and steps[0]["layers"][0]["macs"]["dx"] == 0
    assert main(["energy", "--compare", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "| **total** |" in out and "total / hdqt" in out
    assert main(["energy", "--bits", "8"]) == 2  # an 8-bit accumulator cannot hold 8-bit products
    assert "acc_bits=8 cannot hold" in capsys.readouterr().err


def test_hdqt_info_names_the_kernels(capsys, monkeypatch):
    from hdqt.quantization import native

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "kernels: " in out and ("native: " in out or "pure-torch path" in out)
    fused = "linear layers: one native call a direction" in out
    assert fused == (native.load() is not None), out
    monkeypatch.setenv("HDQT_FUSED", "0")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert ("linear layers: separate native calls from Python (HDQT_FUSED=0)" in out) == (native.load() is not None)


def test_a_model_off_the_cpu_is_counted_where_it_is():
    """The probing forward's samples go to the model's device (a GPU's, here torch's
    shape-only "meta" device, which any other device's tensors cannot meet)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to("meta")
    layers = count_costs(model, (3, 8, 8), hdqt.recipe("hdqt"), batch=2)
    assert [layer.macs["forward"] for layer in layers] == [2 * 4 * 27 * 36, 2 * 5 * 144]
