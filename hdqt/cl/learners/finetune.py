"""Finetune: the lower bound. Plain cross-entropy on the new task's data only.

No memory, no distillation: the network is trained on each task in turn with the
head grown to all classes seen so far, which shows how much catastrophic
forgetting the other methods avoid.
"""
from __future__ import annotations

import torch.nn.functional as F

from hdqt.cl.learners.base import Learner


class Finetune(Learner):
    name = "finetune"

    def _loss(self, x, y):
        logits = self.network(x)
        return F.cross_entropy(logits, y), logits
