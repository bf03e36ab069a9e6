"""Joint: the upper bound. Trains on ALL training data seen so far at every task.

The network (and its grown head) carries over from task to task, and each task
trains it on the union of every task's training set, so nothing needs to be
remembered selectively. The kept data is part of the state_dict, which is what
a resumed run needs (and why it is large on image datasets).
"""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from hdqt.cl.learners.base import Learner
from hdqt.cl.memory import array_to_tensor, tensor_to_array


class Joint(Learner):
    name = "joint"

    def _reset(self) -> None:
        self._seen_x: list[np.ndarray] = []
        self._seen_y: list[np.ndarray] = []
        super()._reset()

    def _training_data(self, task):
        return (np.concatenate([*self._seen_x, task.x_train]),
                np.concatenate([*self._seen_y, task.y_train]))

    def _loss(self, x, y):
        logits = self.network(x)
        return F.cross_entropy(logits, y), logits

    def after_task(self, task) -> None:
        super().after_task(task)
        self._seen_x.append(np.array(task.x_train, copy=True))
        self._seen_y.append(np.array(task.y_train, copy=True))

    def _extra_state(self):
        # tensors, not arrays: a checkpoint holds tensors and plain data only
        return {"x": [array_to_tensor(x) for x in self._seen_x],
                "y": [array_to_tensor(y) for y in self._seen_y]}

    def _load_extra_state(self, state) -> None:
        self._seen_x = [tensor_to_array(x) for x in state["x"]]
        self._seen_y = [tensor_to_array(y) for y in state["y"]]
