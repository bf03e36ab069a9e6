"""LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

No exemplars. The loss on a batch of new data is

    L = CE(logits[:, new classes], y - known) + lambda_o * KD_T(logits[:, old], old_logits)

The classification term covers the new classes only: in the paper each task has
its own head and new data only trains the new one; the class-incremental
adaptation (as in PyCIL) keeps one grown head and restricts the cross-entropy to
its new rows. The old classes are kept by distillation from the network frozen
after the previous task, at temperature T (config.temperature, 2 as in the
paper). lambda_o = 1, the paper's setting for most experiments.

Not implemented, as in PyCIL: the paper's warm-up step (train the new head alone,
shared layers frozen, before joint training).
"""
from __future__ import annotations

import torch.nn.functional as F

from hdqt.cl.learners.base import Learner, distillation_loss

LAMBDA_OLD = 1.0


class LwF(Learner):
    name = "lwf"
    keeps_old_network = True

    def _loss(self, x, y):
        logits = self.network(x)
        known = self.known_classes
        loss = F.cross_entropy(logits[:, known:], y - known)
        if known:
            old_logits = self.old_network(x).detach()
            loss = loss + LAMBDA_OLD * distillation_loss(
                logits[:, :known], old_logits[:, :known], self.config.temperature)
        return loss, logits
