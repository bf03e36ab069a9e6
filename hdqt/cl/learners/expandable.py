"""Shared pieces of the dynamically expanding learners (DER and MEMO).

Both add a branch per task whose features are concatenated with the frozen
branches of earlier tasks, classify the concatenation with a grown head, and
train an auxiliary head on the new branch alone that separates the new classes
from "some old class" (|new| + 1 outputs, label 0 for every old class). After a
task with old classes, the new classes' head rows are rescaled to the old rows'
mean norm ("weight aligning", Zhao et al., CVPR 2020), which is how PyCIL
implements the classifier-rebalancing step of both methods.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hdqt.cl.learners.base import Learner
from hdqt.cl.learners.networks import backbone_out_dim, grow_linear


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

    @torch.no_grad()
    def align_weights(self, num_new: int) -> float:
        """Scale the new classes' head rows to the old rows' mean L2 norm; returns the factor."""
        weight = self.head.weight
        old_norm = weight[:-num_new].norm(dim=1).mean()
        new_norm = weight[-num_new:].norm(dim=1).mean()
        gamma = old_norm / new_norm
        weight[-num_new:] *= gamma
        return float(gamma)


class ExpandingLearner(Learner):
    """Loss and training-mode logic common to DER and MEMO."""

    uses_memory = True
    last_alignment: float | None = None  # weight-aligning factor of the last task (for logs)

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
        logs = super().train_task(task, on_epoch)
        if self.known_classes:
            self.last_alignment = self.network.align_weights(len(task.classes))
        return logs
