"""BiC: Large Scale Incremental Learning (Wu et al., CVPR 2019).

Per task with old classes (the first task trains plain cross-entropy):

* Split: a validation set of ``v`` samples per class is held out, ``v`` =
  max(2, round(bic_val_fraction * exemplars per old class)): ``v`` exemplars of
  every old class and ``v`` new samples of every new class, so that the set is
  balanced between old and new classes, as in the paper. The floor of 2 keeps
  stage 2 from fitting alpha, beta to a single sample per class; a class keeps at
  least one training sample, so a class of 2 samples gives only 1.
* Stage 1 trains the network on the rest (new data + exemplars) with
  ``L = (1 - lambda) * CE(all logits) + lambda * KD_T(old logits)``,
  ``lambda = n_old / (n_old + n_new)`` classes, KD at temperature T against the
  previous network including its bias correction.
* Stage 2 freezes the network and trains the new bias-correction layer
  ``q_k = alpha * o_k + beta`` (new classes only) with cross-entropy on the
  validation set. Old tasks keep their (frozen) alpha, beta.

The correction is elementwise (two scalars per task), not a matmul, so it is the
one parameter block not run through a quantized layer. Stage 2 computes the
frozen network's raw logits once and runs ``bic_steps`` full-batch SGD steps
(lr and momentum of the config, no weight decay, no lr decay) on them. It does
not follow ``epochs``: with 17-40 validation samples an epoch is a single step,
and stopping after ``epochs`` steps left alpha, beta far from converged (new-class
accuracy swung between 0 and 96% over seeds). A few hundred full-batch steps
bring the validation loss to its optimum (within 0.1% at the default 1000 steps on
DSADS and HAPT, against 30000 steps), and cost well under a second.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hdqt.cl.learners.base import Learner, distillation_loss
from hdqt.cl.learners.networks import IncrementalNet
from hdqt.quantization.runtime import derive_seed

# Validation samples per class at least (where a class has more than this).
MIN_VAL_PER_CLASS = 2


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
        self._fit_main(x_train, y_train, self._loss, backbone_and_head, task_index=task.index,
                       on_epoch=on_epoch, total_epochs=epochs + 1)
        return self._train_bias(x_val, y_val, task.index, on_epoch)

    def _split(self, task):
        """(train, validation) sets; validation balanced over old and new classes."""
        per_old = min(len(self.memory.exemplars(c)) for c in self.memory.classes)
        per_class = max(MIN_VAL_PER_CLASS, int(round(self.config.bic_val_fraction * per_old)))
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
        """Stage 2, reported to ``on_epoch`` as one more epoch after stage 1's."""
        net = self.network
        net.eval()
        with torch.no_grad():
            (raw,) = self._in_mixed_batches(x_val, lambda xb: (net.raw_logits(xb),))
        logs = fit_bias(net, raw.to(self.device),
                        torch.as_tensor(np.asarray(y_val), dtype=torch.long, device=self.device),
                        steps=self.config.bic_steps, lr=self.config.lr,
                        momentum=self.config.momentum)
        if on_epoch is not None:
            on_epoch(self.config.epochs + 1, self.config.epochs + 1, logs)
        return logs

    def bias_parameters(self) -> list[tuple[float, float]]:
        """(alpha, beta) of every task, for inspection."""
        return [(float(b.alpha), float(b.beta)) for b in self.network.bias_layers]


def fit_bias(net: BiCNet, raw: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
             momentum: float) -> dict:
    """Train the newest bias layer of ``net`` on cached raw logits, full batch.

    Deterministic (no sampling). No weight decay: it would pull alpha towards 0
    rather than towards 1. Returns the final validation loss and accuracy.
    """
    newest = net.bias_layers[-1]
    newest.requires_grad_(True)
    try:
        optimizer = torch.optim.SGD(newest.parameters(), lr=lr, momentum=momentum)
        for _ in range(steps):
            loss = F.cross_entropy(net.correct(raw), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        newest.requires_grad_(False)
    with torch.no_grad():
        logits = net.correct(raw)
        loss = float(F.cross_entropy(logits, y))
        accuracy = 100.0 * float((logits.argmax(dim=1) == y).float().mean())
    return {"loss": loss, "accuracy": accuracy, "lr": lr, "stage": "bias", "steps": steps}
