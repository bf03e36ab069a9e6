"""A recipe's name says what it computes."""
import pytest

import hdqt
from hdqt.quantization import int_quantizer


def test_overriding_what_a_recipe_computes_renames_it():
    assert hdqt.recipe("hdqt").name == "hdqt"
    assert hdqt.recipe("hdqt", hadamard=False).name == "hdqt[hadamard=False]"
    assert hdqt.recipe("int", hadamard=True, hadamard_rule="binary").name == \
        "int[hadamard=True, hadamard_rule='binary']"
    assert hdqt.recipe("hdqt", grad_output_dx=int_quantizer(8)).name == "hdqt[grad_output_dx]"


def test_knobs_seeds_and_unchanged_values_keep_the_name():
    assert hdqt.recipe("hdqt", bits=3, acc_bits=12, tile=16).name == "hdqt"
    assert hdqt.recipe("hdqt", seed=4, nonfinite="propagate").name == "hdqt"
    assert hdqt.recipe("hdqt", hadamard=True).name == "hdqt"  # what hdqt already does
    assert hdqt.recipe("hdqt", hadamard=False, name="mine").name == "mine"


@pytest.mark.parametrize("overrides, message", [
    (dict(bits=8), r"acc_bits=8 cannot hold one product of two forward codes \(255 x 127 = 32385 > 127.*acc_bits >= 16"),
    (dict(bits=5), r"\(31 x 15 = 465 > 127.*acc_bits >= 10"),
    (dict(bits=4, acc_bits=6), r"acc_bits=6 .*\(15 x 7 = 105 > 31.*acc_bits >= 8"),
])
def test_an_accumulator_that_cannot_hold_one_product_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        hdqt.recipe("hdqt", **overrides)


def test_accumulators_that_hold_a_product_are_accepted():
    assert hdqt.recipe("hdqt", bits=4).acc_bits == 8  # 15 x 7 = 105 <= 127: the paper's setting
    assert hdqt.recipe("hdqt", bits=8, acc_bits=16).acc_bits == 16
    assert hdqt.recipe("hdqt", bits=8, acc_bits=None).acc_bits is None
    # the backward products count only when they saturate too (15 x 15 = 225 > 127)
    with pytest.raises(ValueError, match="two dX codes"):
        hdqt.recipe("hdqt", bits=5, acc_bits=8, saturate_backward=True, forward_input=int_quantizer(4),
                    forward_weight=int_quantizer(4))
