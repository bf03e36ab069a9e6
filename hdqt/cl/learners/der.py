"""DER: Dynamically Expandable Representation (Yan et al., CVPR 2021).

At each task a new feature extractor is added (initialised from the previous
one); all earlier extractors are frozen (weights and BatchNorm statistics).
Their features are concatenated, ``u = [F_1(x), ..., F_t(x)]``, and classified
by a head grown to all seen classes. The auxiliary head on ``F_t(x)`` alone
(|new| + 1 classes, old classes pooled into one) adds its cross-entropy with
weight ``aux_loss_weight`` (1 in the paper). Exemplar memory by herding on the
concatenated features, used for rehearsal and NME.

After each task with old classes, the classifier-learning stage of the paper
retrains the head on class-balanced data with the features frozen
(``balanced_finetune_epochs``, see ``expandable.py``).

Deviation, as in PyCIL: no channel-mask pruning (the paper's sparsity loss is
for model size, not accuracy).
"""
from __future__ import annotations

import torch

from hdqt.cl.learners.expandable import ExpandingHeads, ExpandingLearner


class DERNet(ExpandingHeads):
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class DER(ExpandingLearner):
    name = "der"

    def _build_network(self):
        return DERNet()

    def _grow(self, task_index: int, num_new: int) -> None:
        net = self.network
        net.add_branch(net.next_branch(self._new_backbone()), num_new)
