"""Shared helpers for the learner tests."""
from __future__ import annotations

import io

import numpy as np
import torch

import hdqt
from hdqt.cl.learners import TrainConfig, create_learner

NUM_CLASSES = 6
DIM = 16


def make_blobs(num_classes: int = NUM_CLASSES, dim: int = DIM, train_per_class: int = 40,
               test_per_class: int = 10, seed: int = 0):
    """Gaussian blobs around well-separated centres: any learner that learns beats chance."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 3.0

    def draw(per_class):
        y = np.repeat(np.arange(num_classes), per_class)
        x = centres[y] + rng.normal(size=(len(y), dim))
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = draw(train_per_class)
    x_test, y_test = draw(test_per_class)
    return x_train, y_train, x_test, y_test


# Enough to learn the blobs: 10 epochs of 4 SGD steps (lr 0.05 trains these unnormalised
# blobs unstably at 4 bits). The odd batch of 25 (and odd last batches) gives the dW
# products an odd reduction length; with ODD_DIM the layers' widths are odd too.
LEARN = TrainConfig(epochs=10, lr=0.01, batch_size=25, memory=30)
ODD_DIM = 15
# Cheapest run that still exercises a milestone; for tests that compare runs, not accuracy.
FAST = TrainConfig(epochs=2, lr=0.05, batch_size=32, memory=30, milestones=(1,))


def build(name, recipe="hdqt", seed=3, config=FAST, **kwargs):
    return create_learner(name, backbone="fcnet", input_shape=(DIM,), num_classes=NUM_CLASSES,
                          policy=hdqt.recipe(recipe), config=config, seed=seed, **kwargs)


def run_tasks(learner, tasks, on_epoch=None):
    for task in tasks:
        learner.before_task(task)
        learner.train_task(task, on_epoch=on_epoch)
        learner.after_task(task)
    return learner


def weights(learner) -> torch.Tensor:
    return torch.cat([v.flatten().float() for v in learner.network.state_dict().values()
                      if isinstance(v, torch.Tensor)])


def through_torch_save(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def accuracy(pred, y) -> float:
    return 100.0 * float(np.mean(np.asarray(pred) == np.asarray(y)))
