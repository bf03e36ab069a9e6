import pytest

from hdqt.cl.learners.base import TrainConfig


def test_defaults_follow_the_paper():
    cfg = TrainConfig(epochs=100, lr=0.01)
    assert (cfg.batch_size, cfg.momentum, cfg.temperature, cfg.memory) == (128, 0.9, 2.0, 200)
    assert cfg.selection == "herding" and cfg.device == "cpu"
    # stages with their own length, independent of epochs
    assert (cfg.bic_steps, cfg.balanced_finetune_epochs) == (1000, 30)


def test_round_trip_through_dict():
    cfg = TrainConfig(epochs=170, lr=0.05, milestones=[60, 100, 140], weight_decay=2e-4,
                      memory=2000)
    assert cfg.milestones == (60, 100, 140)  # lists become tuples: hashable, frozen
    data = cfg.to_dict()
    assert data["milestones"] == [60, 100, 140]
    assert TrainConfig.from_dict(data) == cfg


@pytest.mark.parametrize("milestones", [(0,), (10,), (12,), (5, 3), (5, 5), (2.5,), ("3",)])
def test_milestones_that_would_never_decay_or_are_not_ints_are_rejected(milestones):
    with pytest.raises(ValueError, match=r"milestones must be increasing integers in 1\.\.9"):
        TrainConfig(epochs=10, lr=0.1, milestones=milestones)


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("lr", 0.0), ("batch_size", 1.5), ("momentum", 1.0), ("gamma", 0.0),
    ("memory", -1), ("temperature", -2.0), ("bic_val_fraction", 1.0), ("weight_decay", -1e-4),
    ("bic_steps", 0), ("balanced_finetune_epochs", -1), ("balanced_finetune_epochs", True),
])
def test_invalid_values_name_the_field(field, value):
    kwargs = {"epochs": 10, "lr": 0.1, field: value}
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_selection_and_unknown_keys():
    with pytest.raises(ValueError, match=r"selection must be one of \('herding', 'random'\)"):
        TrainConfig(epochs=1, lr=0.1, selection="kcenter")
    with pytest.raises(ValueError, match="unknown TrainConfig keys \\['lrate'\\]"):
        TrainConfig.from_dict({"epochs": 1, "lr": 0.1, "lrate": 0.1})


def test_every_option_the_docstring_names_exists():
    import re
    from dataclasses import fields

    named = set(re.findall(r"``(\w+)``", TrainConfig.__doc__))
    assert named, "the docstring names no option"
    assert named <= {f.name for f in fields(TrainConfig)}, named - {f.name for f in fields(TrainConfig)}
