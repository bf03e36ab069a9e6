"""Every learner trains, evaluates and saves its state on the device the config names
(CUDA where there is one: the torch path of the quantized layers, exemplar memory, the
old-network snapshots, BiC's bias layers, DER/MEMO's branches), and a state saved there
resumes on the CPU."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import hdqt
from hdqt.cl.learners import create_learner, list_learners

from helpers import DIM, FAST, NUM_CLASSES, through_torch_save

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA device on this machine"))]


def make(name, device, recipe="hdqt"):
    config = dataclasses.replace(FAST, device=device)
    return create_learner(name, backbone="fcnet", input_shape=(DIM,), num_classes=NUM_CLASSES,
                          policy=hdqt.recipe(recipe), config=config, seed=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list_learners())
def test_learner_runs_on_device_and_resumes_on_cpu(scenario, name, device):
    learner = make(name, device)
    tasks = list(scenario)[:2]
    for task in tasks:
        learner.before_task(task)
        learner.train_task(task)
        learner.after_task(task)
    params = list(learner.network.parameters())
    assert params and all(p.device.type == device for p in params)
    x_test, y_test = tasks[-1].x_test, tasks[-1].y_test
    on_device = learner.evaluate(x_test, y_test)
    assert set(on_device) >= {"cnn"} and all(np.isfinite(v).all() for v in on_device.values())

    state = through_torch_save(learner.state_dict())  # as a checkpoint: plain CPU tensors
    tensors = [v for v in _leaves(state) if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    resumed = make(name, "cpu")
    resumed.load_state_dict(state)
    on_cpu = resumed.evaluate(x_test, y_test)
    assert set(on_cpu) == set(on_device)
    for key in on_cpu:
        # the same weights: the same labels on the CPU (a GPU's float sums may flip a near tie)
        agree = float(np.mean(on_cpu[key] == on_device[key]))
        assert agree >= (1.0 if device == "cpu" else 0.95), (key, agree)


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value
