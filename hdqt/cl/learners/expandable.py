"""Shared pieces of the dynamically expanding learners (DER and MEMO).

Both add a branch per task whose features are concatenated with the frozen
branches of earlier tasks, classify the concatenation with a grown head, and
train an auxiliary head on the new branch alone that separates the new classes
from "some old class" (|new| + 1 outputs, label 0 for every old class).

After a task with old classes, the head is retrained on class-balanced data:
DER's classifier-learning stage (Yan et al., 2021, Sec. 3.3). The head was
trained on many new samples against few exemplars, so it favours the new
classes; ``balanced_finetune_epochs`` epochs of cross-entropy on the exemplars
plus as many samples of each new class as an old class has exemplars, with the
features frozen (computed once), undo that.

PyCIL replaces this stage by weight aligning (Zhao et al., 2020): rescaling the
new classes' rows to the old rows' mean norm, by gamma = old / new. On DSADS and
HAPT gamma was 1.2-1.6 at every task, so it enlarged the new rows and made the
bias worse (23-51% of the test predictions went to the new classes, ~12% being
right). Nor does a shrink-only variant help: after the balanced stage gamma is
still above 1 at every task, so it would never apply. It is not implemented;
docs/continual.md has the numbers.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hdqt.cl.learners.base import Learner
from hdqt.cl.learners.networks import backbone_out_dim, grow_linear
from hdqt.quantization.runtime import derive_seed


class ExpandingHeads(nn.Module):
    """Branches + grown head + auxiliary head; subclasses define ``features``."""

    branches: nn.ModuleList

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList()
        self.head: nn.Linear | None = None
        self.aux_head: nn.Linear | None = None
        self.branch_dims: list[int] = []

    @property
    def num_classes(self) -> int:
        return 0 if self.head is None else self.head.out_features

    def add_branch(self, branch: nn.Module, num_new: int) -> None:
        """Append a branch for a task bringing ``num_new`` classes; freeze the others."""
        for old in self.branches:
            old.requires_grad_(False)
        branch.requires_grad_(True)
        self.branches.append(branch)
        self.branch_dims.append(backbone_out_dim(branch))
        self.head = grow_linear(self.head, sum(self.branch_dims), self.num_classes + num_new)
        # The first task has no old classes to tell apart from, hence no auxiliary head.
        self.aux_head = (nn.Linear(self.branch_dims[-1], num_new + 1)
                         if len(self.branches) > 1 else None)

    def next_branch(self, fresh: nn.Module) -> nn.Module:
        """The branch for a new task: ``fresh`` (a float module of the branch's
        architecture) loaded with the newest branch's weights, so that it starts from
        what was learnt, as in DER's and MEMO's reference code. A fresh module rather
        than a deepcopy, so that quantize_model converts it under its own name."""
        if len(self.branches):
            state = {k: v for k, v in self.branches[-1].state_dict().items()
                     if not k.endswith("_extra_state")}  # the quantizers' state is per layer
            fresh.load_state_dict(state)
        return fresh

    def freeze_old_branches_mode(self) -> None:
        """Training mode for the newest branch, eval (frozen BatchNorm statistics) for the rest."""
        for branch in self.branches[:-1]:
            branch.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.features(x)
        logits = self.head(feats)
        if self.aux_head is None:
            return logits, None
        return logits, self.aux_head(feats[:, -self.branch_dims[-1]:])


class ExpandingLearner(Learner):
    """Loss, training modes and the balanced classifier stage common to DER and MEMO."""

    uses_memory = True

    def _set_train_mode(self) -> None:
        self.network.train()
        self.network.freeze_old_branches_mode()

    def _loss(self, x, y):
        logits, aux_logits = self.network.forward_with_aux(x)
        loss = F.cross_entropy(logits, y)
        if aux_logits is not None:
            known = self.known_classes
            # new class c -> c - known + 1; every old class -> 0
            aux_targets = torch.where(y >= known, y - known + 1, torch.zeros_like(y))
            loss = loss + self.config.aux_loss_weight * F.cross_entropy(aux_logits, aux_targets)
        return loss, logits

    def train_task(self, task, on_epoch=None) -> dict:
        """The main stage, then (with old classes) the balanced classifier stage;
        ``on_epoch`` counts the epochs of both."""
        self._check_current(task)
        cfg = self.config
        balanced = cfg.balanced_finetune_epochs if self.known_classes else 0
        x, y = self._training_data(task)
        logs = self._fit_main(x, y, self._loss, self.network.parameters(),
                              task_index=task.index, on_epoch=on_epoch,
                              total_epochs=cfg.epochs + balanced)
        if balanced:
            logs = self._train_balanced_head(task, on_epoch)
        return logs

    def _balanced_data(self, task) -> tuple[np.ndarray, np.ndarray]:
        """Every exemplar (the old classes) and, of each new class, a seeded random
        sample as large as the smallest old class's exemplar set."""
        per_class = min(len(self.memory.exemplars(c)) for c in self.memory.classes)
        rng = np.random.default_rng(derive_seed(self.seed, "balanced", task.index))
        picks = [rng.permutation(np.flatnonzero(task.y_train == label))[:per_class]
                 for label in np.unique(task.y_train)]
        new = np.sort(np.concatenate(picks))
        x_mem, y_mem = self.memory.data()
        return (np.concatenate([x_mem, task.x_train[new]]),
                np.concatenate([y_mem, task.y_train[new]]))

    def _train_balanced_head(self, task, on_epoch) -> dict:
        """Cross-entropy on class-balanced data, the head alone. The features are
        frozen, so they are computed once (eval mode, no augmentation)."""
        x, y = self._balanced_data(task)
        net = self.network
        net.eval()
        with torch.no_grad():
            (features,) = self._in_mixed_batches(x, lambda xb: (self._features(xb),))

        def loss_fn(f, labels):
            logits = net.head(f)
            return F.cross_entropy(logits, labels), logits

        return self._fit(features, y, loss_fn, net.head.parameters(), task_index=task.index,
                         stage="balanced", on_epoch=on_epoch, epoch_offset=self.config.epochs,
                         total_epochs=self.config.epochs + self.config.balanced_finetune_epochs,
                         set_mode=net.eval, augment=False,
                         epochs=self.config.balanced_finetune_epochs, milestones=())
