"""MEMO: Memory-efficient Expandable MOdel (Zhou et al., ICLR 2023, "A Model or 603
Exemplars").

The backbone is split (``hdqt.models.split_backbone``) into shallow generalised
blocks, shared by all tasks, and deep specialised blocks: each task adds a new
specialised block (initialised from the previous one), earlier ones are frozen
(weights and BatchNorm statistics). The features of all specialised blocks are
concatenated and classified by a grown head; as in DER, an auxiliary head on the
newest block's features (|new| + 1 classes) adds its cross-entropy with weight
``aux_loss_weight``, and after training the head is retrained on class-balanced
data (DER's classifier-learning stage, see ``expandable.py``).
The generalised blocks keep training in every task, as in the reference
configuration (``train_base: true``). Exemplar memory by herding on the
concatenated features, used for rehearsal and NME.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hdqt.cl.learners.expandable import ExpandingHeads, ExpandingLearner


class MEMONet(ExpandingHeads):
    def __init__(self, generalized: nn.Module):
        super().__init__()
        self.generalized = generalized

    def features(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.generalized(x)
        return torch.cat([branch(shared) for branch in self.branches], dim=1)


class MEMO(ExpandingLearner):
    name = "memo"

    def _build_network(self):
        from hdqt.models import split_backbone

        generalized, self._make_specialized = split_backbone(self._new_backbone())
        return MEMONet(generalized)

    def _grow(self, task_index: int, num_new: int) -> None:
        net = self.network
        net.add_branch(net.next_branch(self._make_specialized()), num_new)
