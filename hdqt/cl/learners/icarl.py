"""iCaRL: Incremental Classifier and Representation Learning (Rebuffi et al., CVPR 2017).

* Training data: the new task's data plus the exemplar memory.
* Representation learning: classification on all seen classes plus distillation
  of the old classes' outputs from the network frozen after the previous task.
* Memory: a fixed budget shared by the classes, filled by herding on
  L2-normalised features, shrunk by keeping each class's first exemplars.
* Classification: nearest mean of exemplars ("nme", the paper's classifier);
  the network's head ("cnn") is reported too.

Deviation, as in PyCIL and the HDQT paper's setup: the paper's per-class sigmoid
binary cross-entropy (with the old network's sigmoid outputs as targets for the
old classes) is replaced by softmax cross-entropy plus temperature-T knowledge
distillation on the old classes (T = config.temperature).
"""
from __future__ import annotations

import torch.nn.functional as F

from hdqt.cl.learners.base import Learner, distillation_loss


class ICaRL(Learner):
    name = "icarl"
    uses_memory = True
    keeps_old_network = True

    def _loss(self, x, y):
        logits = self.network(x)
        loss = F.cross_entropy(logits, y)
        known = self.known_classes
        if known:
            old_logits = self.old_network(x).detach()
            loss = loss + distillation_loss(logits[:, :known], old_logits[:, :known],
                                            self.config.temperature)
        return loss, logits
