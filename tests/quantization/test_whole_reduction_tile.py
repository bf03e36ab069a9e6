"""tile=None: the whole reduction is one tile, its sum clamped (or rounded) once, which
is how the official code limits LUQ's accumulator (issue 9). It must give exactly what a
tile as long as the reduction gives, on every path (linear, conv, backward products
saturated too), and be plain policy data."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import hdqt
from hdqt.quantization.policy import QuantPolicy

RECIPES = ["hdqt", "int", "luq", "fp134", "fp8_e4m3"]


def _step(layer_fn, x, policy):
    torch.manual_seed(0)
    model = hdqt.quantize_model(nn.Sequential(layer_fn()), policy)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), model[0].weight.grad.clone()


@pytest.mark.parametrize("name,saturate_backward", [(name, False) for name in RECIPES] +
                         [("hdqt", True), ("int", True)])  # the float recipes' backward is unlimited
def test_none_equals_a_tile_as_long_as_the_reduction(name, saturate_backward):
    """The forward's reduction is K; saturated backward products reduce over N (dX) and
    the batch (dW), so only a tile longer than every reduction matches None there."""
    cases = [(lambda: nn.Linear(100, 7, bias=False), torch.randn(16, 100) * 3, 100),
             (lambda: nn.Conv2d(3, 5, 3, padding=1, bias=False), torch.randn(4, 3, 6, 6) * 3, 27)]
    for layer_fn, x, k in cases:
        tiles = (10**6,) if saturate_backward else (k, 10**6)
        runs = {tile: _step(layer_fn, x, hdqt.recipe(name, tile=tile, seed=5, saturate_backward=saturate_backward))
                for tile in (None, *tiles)}
        for tile in tiles:
            assert torch.equal(runs[None][0], runs[tile][0]), (name, tile)
            assert torch.equal(runs[None][1], runs[tile][1]), (name, tile)


def test_one_clamp_of_the_whole_sum_differs_from_tiles_of_8():
    """With 4-bit codes and an 8-bit accumulator, tiles of 8 saturate less than one
    tile of 100 products: the setting changes the result (it is not ignored)."""
    x = torch.randn(16, 100) * 3
    whole = _step(lambda: nn.Linear(100, 7, bias=False), x, hdqt.recipe("int", tile=None, seed=5))
    tiles = _step(lambda: nn.Linear(100, 7, bias=False), x, hdqt.recipe("int", tile=8, seed=5))
    assert not torch.equal(whole[0], tiles[0])


def test_tile_none_is_plain_policy_data():
    policy = hdqt.recipe("luq", tile=None)
    assert policy.tile is None
    assert QuantPolicy.from_json(policy.to_json()) == policy
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="tile must be None"):
            hdqt.recipe("hdqt", tile=bad)


def test_run_energy_and_config_spell_it_tile_0(capsys):
    from hdqt.cli import main
    from hdqt.experiments.config import ConfigError, policy_overrides, resolve_config

    config = resolve_config(None, {"tile": 0, "recipe": "luq"})
    assert config.tile == 0 and policy_overrides(config)["tile"] is None
    with pytest.raises(ConfigError, match="--tile must be 0 .the whole reduction"):
        resolve_config(None, {"tile": -2})
    assert main(["energy", "--dataset", "dsads", "--recipe", "int", "--tile", "0", "--json"]) == 0
    whole = capsys.readouterr().out
    assert main(["energy", "--dataset", "dsads", "--recipe", "int", "--tile", "32", "--json"]) == 0
    assert whole != capsys.readouterr().out  # fewer wide adds: one tile sum per output
