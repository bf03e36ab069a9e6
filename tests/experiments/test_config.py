"""Config layering (dataset defaults < TOML < flags) and validation messages."""
from __future__ import annotations

import pytest

from hdqt.experiments.config import (
    Choices, ConfigError, RunConfig, load_toml, resolve_config, scaled_milestones,
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
    with pytest.raises(ConfigError, match="epochs must be positive"):
        resolve(flags={"epochs": 0})
    with pytest.raises(ConfigError, match="memory must be >= 0"):
        resolve(flags={"memory": -1})
    with pytest.raises(ConfigError, match="milestones must be increasing epochs in 1..9"):
        resolve(flags={"epochs": 10, "milestones": "5,12"})


def test_shorter_schedule_scales_default_milestones_so_lr_still_decays():
    config = resolve(flags={"dataset": "cifar100", "epochs": 17})
    assert config.milestones == (6, 10, 14)
    assert scaled_milestones((60, 100, 140), 170, 2) == (1,)
    # Explicit milestones are taken as given.
    assert resolve(flags={"dataset": "cifar100", "epochs": 17, "milestones": "8"}).milestones == (8,)


def test_identity_ignores_where_the_run_happens():
    a = resolve(flags={"device": "cpu", "data_root": "/a"})
    b = resolve(flags={"device": "cuda", "data_root": "/b"})
    assert a.identity() == b.identity()
    assert a.identity() != resolve(flags={"seed": 1}).identity()
    assert RunConfig.from_dict(a.to_dict()) == a
