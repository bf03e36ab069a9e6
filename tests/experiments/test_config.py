"""Config layering (dataset defaults < TOML < flags) and validation messages."""
from __future__ import annotations

import pytest

from hdqt.experiments.config import (
    FILE_ONLY_KEYS, Choices, ConfigError, RunConfig, load_toml, resolve_config, scaled_milestones,
)

# Fixed choices keep these tests independent of which components are registered.
CHOICES = Choices(datasets=("digits", "dsads", "hapt", "pamap2", "cifar100", "fashion_mnist"),
                  methods=("icarl", "lwf"), recipes=("fp32", "hdqt", "int"),
                  backbones=("fcnet", "resnet32", "convnet"))


def resolve(file_values=None, flags=None, **kwargs):
    return resolve_config(file_values, flags, choices=CHOICES, **kwargs)


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_dataset_defaults_follow_the_paper():
    har = resolve(flags={"dataset": "hapt"})
    assert (har.backbone, har.lr, har.epochs, har.memory) == ("fcnet", 0.01, 100, 200)
    assert (har.init_classes, har.increment, har.batch_size, har.momentum) == (2, 2, 128, 0.9)
    cifar = resolve(flags={"dataset": "cifar100"})
    assert (cifar.backbone, cifar.lr, cifar.epochs, cifar.milestones) == ("resnet32", 0.05, 170, (60, 100, 140))
    assert (cifar.weight_decay, cifar.memory, cifar.init_classes, cifar.increment) == (2e-4, 2000, 20, 20)


def test_flags_override_file_which_overrides_dataset_defaults(tmp_path):
    path = write(tmp_path, 'dataset = "hapt"\nepochs = 7\nlr = 0.5\nmilestones = [3, 5]\n')
    config = resolve(load_toml(path), {"lr": 0.25, "seed": 3}, source=str(path))
    assert config.dataset == "hapt"  # file
    assert config.epochs == 7  # file over the dataset's 100
    assert config.lr == 0.25  # flag over file
    assert config.seed == 3  # flag over the built-in default
    assert config.milestones == (3, 5)
    assert config.memory == 200  # dataset default untouched


def test_unknown_toml_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "epochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"run\.toml.*unknown key 'learning_rate'.*valid keys.*lr"):
        load_toml(path)


def test_bad_toml_and_missing_file_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(write(tmp_path, "epochs = = 3\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")


def test_wrong_type_in_file_names_the_source(tmp_path):
    path = write(tmp_path, 'epochs = "many"\n')
    with pytest.raises(ConfigError, match=r"epochs \(from .*run\.toml\) must be an integer"):
        resolve(load_toml(path), source=str(path))


@pytest.mark.parametrize("key, value, listed", [
    ("dataset", "mnist", "digits, dsads"),
    ("method", "ewc", "icarl, lwf"),
    ("recipe", "fp8", "fp32, hdqt, int"),
    ("backbone", "vgg", "fcnet, resnet32, convnet"),
])
def test_unknown_names_list_valid_choices(key, value, listed):
    with pytest.raises(ConfigError, match=f"unknown {key} '{value}'.*valid choices: {listed}"):
        resolve(flags={key: value})


def test_ranges_are_checked():
    with pytest.raises(ConfigError, match="--epochs must be a positive integer, got 0"):
        resolve(flags={"epochs": 0})
    with pytest.raises(ConfigError, match="--memory must be a non-negative integer"):
        resolve(flags={"memory": -1})
    with pytest.raises(ConfigError, match=r"--milestones must be increasing integers in 1\.\.9"):
        resolve(flags={"epochs": 10, "milestones": "5,12"})


# Values the learners' TrainConfig rejects; `hdqt run` used to check its own, looser
# rules (momentum >= 0, gamma >= 0) and let some of these through to the learner.
@pytest.mark.parametrize("key, value", [
    ("epochs", 0), ("lr", 0.0), ("batch_size", 0), ("momentum", 1.0), ("momentum", -0.1),
    ("gamma", 0.0), ("gamma", 1.5), ("weight_decay", -1e-4), ("memory", -1),
    ("temperature", 0.0), ("bic_val_fraction", 1.0), ("bic_steps", 0),
    ("aux_loss_weight", -1.0), ("balanced_finetune_epochs", -1),
])
def test_training_options_follow_the_learners_rules_under_the_name_given(key, value, tmp_path):
    from hdqt.cl.learners import TrainConfig

    with pytest.raises(ValueError) as rule:
        TrainConfig(**{"epochs": 10, "lr": 0.1, key: value})
    detail = str(rule.value)[len(key):]  # the learner's wording, after the field name
    path = write(tmp_path, f"{key} = {value!r}\n".replace("True", "true"))
    with pytest.raises(ConfigError) as from_file:
        resolve(load_toml(path), source=str(path))
    assert str(from_file.value) == f"{key} (from {path}){detail}"
    if key not in FILE_ONLY_KEYS:
        with pytest.raises(ConfigError) as from_flag:
            resolve(flags={key: value})
        assert str(from_flag.value) == f"--{key.replace('_', '-')}{detail}"


@pytest.mark.parametrize("recipe", ["fp32", "hdqt"])
@pytest.mark.parametrize("key, value, message", [
    ("bits", 0, "bits must be an integer in 2..16, got 0"),
    ("bits", 17, "bits must be an integer in 2..16, got 17"),
    ("acc_bits", 1, "acc-bits must be 0 (unlimited) or an integer in 2..32, got 1"),
    ("acc_bits", -8, "acc-bits must be 0 (unlimited) or an integer in 2..32, got -8"),
    ("tile", -1, "tile must be 0 (the whole reduction, one tile) or an integer >= 1, got -1"),
    ("hadamard_rule", "odd", "hadamard-rule must be one of ('paper', 'binary'), got 'odd'"),
])
def test_quantization_options_name_the_flag_and_the_valid_range(recipe, key, value, message):
    # fp32 ignores them, but checks them too: a typo must not wait for another recipe.
    with pytest.raises(ConfigError) as error:
        resolve(flags={"recipe": recipe, key: value})
    assert str(error.value) == "--" + message
    assert "recipe" not in str(error.value)


def test_options_that_do_not_fit_together_name_the_flags_given():
    # The engine refuses an accumulator that cannot hold one product of two codes.
    with pytest.raises(ConfigError, match=r"^the hdqt recipe with --acc-bits 6: acc_bits=6 cannot "
                                          r"hold one product .* or acc_bits 0 \(unlimited\)$"):
        resolve(flags={"recipe": "hdqt", "acc_bits": 6})
    with pytest.raises(ConfigError, match=r"^the int recipe with --bits 8: acc_bits=8 cannot hold"):
        resolve(flags={"recipe": "int", "bits": 8})
    assert resolve(flags={"recipe": "int", "bits": 8, "acc_bits": 0}).acc_bits == 0
    assert resolve(flags={"recipe": "fp32", "acc_bits": 6}).acc_bits == 6  # fp32 ignores it


def test_quantization_options_from_a_file_name_key_and_file(tmp_path):
    path = write(tmp_path, 'bits = 1\n')
    with pytest.raises(ConfigError, match=r"^bits \(from .*run\.toml\) must be an integer in "
                                          r"2\.\.16, got 1$"):
        resolve(load_toml(path), source=str(path))
    path = write(tmp_path, 'saturate_backward = "yes"\n')
    with pytest.raises(ConfigError, match=r"saturate_backward \(from .*\) must be true or false"):
        resolve(load_toml(path), source=str(path))
    path = write(tmp_path, 'saturate_backward = true\nhadamard_rule = "binary"\nacc_bits = 0\n')
    config = resolve(load_toml(path), source=str(path))
    assert (config.saturate_backward, config.hadamard_rule, config.acc_bits) == (True, "binary", 0)


def test_hadamard_select_reaches_the_policy_and_the_identity(tmp_path):
    from hdqt.experiments.runner import build_policy

    default = resolve(flags={"recipe": "hdqt"})
    assert build_policy(default).hadamard_select == "always"  # the recipe's, the paper's rule
    noise = resolve(flags={"recipe": "hdqt", "hadamard_select": "noise"})
    assert build_policy(noise).hadamard_select == "noise"
    assert noise.identity()["hadamard_select"] == "noise" and noise.identity() != default.identity()
    path = write(tmp_path, 'hadamard_select = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"hadamard_select \(from .*run.toml\) must be one of \('always', 'noise'\)"):
        resolve(file_values=load_toml(path), source=str(path))


def test_backward_scales_reach_the_policy_and_the_identity(tmp_path):
    from hdqt.experiments.runner import build_policy

    default = resolve(flags={"recipe": "hdqt"})
    assert build_policy(default).grad_output_dw.granularity == "tensor"
    sample = resolve(flags={"recipe": "hdqt", "backward_scales": "sample"})
    assert build_policy(sample).grad_output_dw.granularity == "sample"
    assert sample.identity()["backward_scales"] == "sample" and sample.identity() != default.identity()
    path = write(tmp_path, 'backward_scales = "row"\n')
    with pytest.raises(ConfigError, match=r"backward_scales \(from .*run.toml\) must be one of tensor, sample, got 'row'"):
        resolve(file_values=load_toml(path), source=str(path))
    with pytest.raises(ConfigError, match=r"--backward-scales sample.*per-sample scales"):
        resolve(flags={"recipe": "hdqt", "backward_scales": "sample", "saturate_backward": True})


def test_saturate_backward_and_hadamard_rule_reach_the_policy_and_the_identity():
    from hdqt.experiments.runner import build_policy

    default = resolve(flags={"recipe": "hdqt"})
    assert (default.saturate_backward, default.hadamard_rule) == (None, None)
    policy = build_policy(default)
    assert (policy.saturate_backward, policy.hadamard_rule) == (False, "paper")  # the recipe's
    custom = resolve(flags={"recipe": "hdqt", "saturate_backward": True,
                            "hadamard_rule": "binary", "acc_bits": 10, "tile": 16})
    policy = build_policy(custom)
    assert (policy.saturate_backward, policy.hadamard_rule) == (True, "binary")
    assert (policy.acc_bits, policy.tile, policy.hadamard) == (10, 16, True)
    assert policy.name.startswith("hdqt")
    assert build_policy(resolve(flags={"recipe": "hdqt", "acc_bits": 0})).acc_bits is None
    # A changed option is another run (another directory, a refused resume).
    for key, value in (("saturate_backward", True), ("saturate_backward", False),
                       ("hadamard_rule", "binary")):
        assert resolve(flags={"recipe": "hdqt", key: value}).identity()[key] == value
        assert resolve(flags={"recipe": "hdqt", key: value}).identity() != default.identity()
    # fp32 quantizes nothing and ignores them, as it ignores bits.
    fp32 = build_policy(resolve(flags={"recipe": "fp32", "saturate_backward": True,
                                       "hadamard_rule": "binary", "bits": 8}))
    assert fp32 == build_policy(resolve(flags={"recipe": "fp32"})) and fp32.is_float


def test_device_must_exist_here(tmp_path):
    here = Choices(**{**CHOICES.__dict__, "devices": ("cpu", "cuda:0", "cuda:1")})
    for device in ("cpu", "cuda", "cuda:1"):
        assert resolve_config(None, {"device": device}, choices=here).device == device
    with pytest.raises(ConfigError, match=r"^--device 'cuda:2' is not a device of this machine; "
                                          r"devices here: cpu, cuda:0, cuda:1$"):
        resolve_config(None, {"device": "cuda:2"}, choices=here)
    with pytest.raises(ConfigError, match=r"--device 'cuda' is not a device of this machine "
                                          r"\(torch sees no CUDA device.*; devices here: cpu$"):
        resolve(flags={"device": "cuda"})
    path = write(tmp_path, 'device = "nosuch"\n')
    with pytest.raises(ConfigError, match=r"^device \(from .*run\.toml\) 'nosuch' is not a "
                                          r"device of this machine; devices here: cpu$"):
        resolve(load_toml(path), source=str(path))


def test_shorter_schedule_scales_default_milestones_so_lr_still_decays():
    config = resolve(flags={"dataset": "cifar100", "epochs": 17})
    assert config.milestones == (6, 10, 14)
    assert scaled_milestones((60, 100, 140), 170, 2) == (1,)
    # Explicit milestones are taken as given.
    assert resolve(flags={"dataset": "cifar100", "epochs": 17, "milestones": "8"}).milestones == (8,)


def test_identity_ignores_where_the_run_happens():
    with_gpu = Choices(**{**CHOICES.__dict__, "devices": ("cpu", "cuda:0")})
    a = resolve(flags={"device": "cpu", "data_root": "/a"})
    b = resolve_config(None, {"device": "cuda", "data_root": "/b"}, choices=with_gpu)
    assert a.identity() == b.identity()
    assert a.identity() != resolve(flags={"seed": 1}).identity()
    assert RunConfig.from_dict(a.to_dict()) == a


def test_train_per_class_is_a_key_a_flag_and_part_of_the_identity():
    default = resolve()
    assert default.train_per_class is None
    small = resolve(flags={"train_per_class": 300})
    assert small.train_per_class == 300 and small.identity() != default.identity()
    assert resolve({"train_per_class": 300}).identity() == small.identity()
    with pytest.raises(ConfigError, match="--train-per-class must be a number of samples >= 1"):
        resolve(flags={"train_per_class": 0})
    with pytest.raises(ConfigError, match="train_per_class"):
        resolve({"train_per_class": "many"})


def test_forward_hadamard_and_input_clip_keys():
    """Issue 9: --forward-hadamard and --input-clip are config keys, flags and part of the
    run's identity; the default clip (3) is one identity however it is written."""
    from hdqt.experiments.config import data_clip, policy_overrides

    default = resolve()
    assert default.input_clip is None and data_clip(default) == 3.0
    assert resolve(flags={"input_clip": "3"}).identity() == default.identity()
    none = resolve(flags={"input_clip": "none"})
    assert none.input_clip == 0.0 and data_clip(none) is None and none.identity() != default.identity()
    assert data_clip(resolve(flags={"input_clip": 2.5})) == 2.5
    with pytest.raises(ConfigError, match="input_clip.*standard deviations"):
        resolve(flags={"input_clip": "wide"})
    with pytest.raises(ConfigError, match="input_clip"):
        resolve(flags={"input_clip": -1})
    fh = resolve(flags={"forward_hadamard": True})
    assert fh.identity() != default.identity() and policy_overrides(fh)["forward_hadamard"] is True
    with pytest.raises(ConfigError, match="forward_hadamard.*true or false"):
        resolve(flags={"forward_hadamard": "yes"})
