"""BiC: Large Scale Incremental Learning (Wu et al., CVPR 2019).

Per task with old classes (the first task trains plain cross-entropy):

* Split: a validation set of ``v`` samples per class is held out, ``v`` =
  round(bic_val_fraction * exemplars per old class) (at least 1): ``v`` exemplars
  of every old class and ``v`` new samples of every new class, so that the set is
  balanced between old and new classes, as in the paper.
* Stage 1 trains the network on the rest (new data + exemplars) with
  ``L = (1 - lambda) * CE(all logits) + lambda * KD_T(old logits)``,
  ``lambda = n_old / (n_old + n_new)`` classes, KD at temperature T against the
  previous network including its bias correction.
* Stage 2 freezes the network and trains the new bias-correction layer
  ``q_k = alpha * o_k + beta`` (new classes only) with cross-entropy on the
  validation set. Old tasks keep their (frozen) alpha, beta.

The correction is elementwise (two scalars per task), not a matmul, so it is the
one parameter block not run through a quantized layer. Stage 2 computes the
frozen network's raw logits once and trains alpha, beta on them: the same
optimisation, without re-running the frozen quantized network every epoch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hdqt.cl.learners.base import Learner, derive_seed, distillation_loss
from hdqt.cl.learners.networks import IncrementalNet


class BiasLayer(nn.Module):
    """q = alpha * o + beta on one task's block of logits."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.alpha * logits + self.beta


class BiCNet(IncrementalNet):
    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.bias_layers = nn.ModuleList()
        self.task_sizes: list[int] = []

    def add_classes(self, count: int) -> None:
        super().add_classes(count)
        self.task_sizes.append(count)
        layer = BiasLayer()
        layer.requires_grad_(False)  # trained only in stage 2 of its own task
        self.bias_layers.append(layer)

    def raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        blocks = torch.split(logits, self.task_sizes, dim=1)
        return torch.cat([layer(b) for layer, b in zip(self.bias_layers, blocks)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.correct(self.raw_logits(x))


class BiC(Learner):
    name = "bic"
    uses_memory = True
    keeps_old_network = True

    def _build_network(self) -> nn.Module:
        return BiCNet(self._new_backbone())

    def _logits_from_features(self, features):
        return self.network.correct(self.network.head(features))

    def _loss(self, x, y):
        logits = self.network(x)
        known = self.known_classes
        if not known:
            return F.cross_entropy(logits, y), logits
        lam = known / self.total_classes
        old_logits = self.old_network(x).detach()
        loss = (1 - lam) * F.cross_entropy(logits, y) + lam * distillation_loss(
            logits[:, :known], old_logits, self.config.temperature)
        return loss, logits

    def train_task(self, task, on_epoch=None) -> dict:
        self._check_current(task)
        if not self.known_classes:
            return super().train_task(task, on_epoch)
        epochs = self.config.epochs
        (x_train, y_train), (x_val, y_val) = self._split(task)
        backbone_and_head = [p for n, p in self.network.named_parameters()
                             if not n.startswith("bias_layers.")]
        self._fit(x_train, y_train, self._loss, backbone_and_head, task_index=task.index,
                  stage="main", on_epoch=on_epoch, total_epochs=2 * epochs)
        return self._train_bias(x_val, y_val, task.index, on_epoch)

    def _split(self, task):
        """(train, validation) sets; validation balanced over old and new classes."""
        per_old = min(len(self.memory.exemplars(c)) for c in self.memory.classes)
        per_class = max(1, int(round(self.config.bic_val_fraction * per_old)))
        rng = np.random.default_rng(derive_seed(self.seed, "bic-split", task.index))
        x_mem, y_mem = self.memory.data()
        # Old classes (memory) and new classes (task data) are disjoint, so one pass
        # over the labels of the union treats both alike.
        x_cat = np.concatenate([x_mem, task.x_train])
        y_cat = np.concatenate([y_mem, task.y_train])
        train_parts, val_parts = [], []
        for label in np.unique(y_cat):
            idx = rng.permutation(np.flatnonzero(y_cat == label))
            take = min(per_class, len(idx) - 1)  # leave every class >= 1 training sample
            val_parts.append(idx[:take])
            train_parts.append(idx[take:])
        train_idx = np.sort(np.concatenate(train_parts))
        val_idx = np.sort(np.concatenate(val_parts))
        return (x_cat[train_idx], y_cat[train_idx]), (x_cat[val_idx], y_cat[val_idx])

    def _train_bias(self, x_val, y_val, task_index: int, on_epoch) -> dict:
        net = self.network
        net.eval()
        with torch.no_grad():
            (raw,) = self._in_mixed_batches(x_val, lambda xb: (net.raw_logits(xb),))
        newest = net.bias_layers[-1]
        newest.requires_grad_(True)

        def loss_fn(z, y):
            logits = net.correct(z)
            return F.cross_entropy(logits, y), logits

        try:
            # No weight decay: it would pull alpha towards 0 rather than towards 1.
            logs = self._fit(raw, y_val, loss_fn, newest.parameters(), task_index=task_index,
                             stage="bias", on_epoch=on_epoch, epoch_offset=self.config.epochs,
                             total_epochs=2 * self.config.epochs, weight_decay=0.0,
                             set_mode=net.eval, augment=False)
        finally:
            newest.requires_grad_(False)
        return logs

    def bias_parameters(self) -> list[tuple[float, float]]:
        """(alpha, beta) of every task, for inspection."""
        return [(float(b.alpha), float(b.beta)) for b in self.network.bias_layers]
