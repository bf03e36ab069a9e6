"""Class-incremental learners, one per file, built by name.

    from hdqt.cl.learners import create_learner, list_learners
    learner = create_learner("icarl", backbone="fcnet", input_shape=(405,),
                             num_classes=19, policy=hdqt.recipe("hdqt"),
                             config=TrainConfig(epochs=100, lr=0.01), seed=0)
"""
from __future__ import annotations

from hdqt.cl.learners.base import Learner, TrainConfig
from hdqt.cl.learners.bic import BiC
from hdqt.cl.learners.config import TrainConfigError
from hdqt.cl.learners.der import DER
from hdqt.cl.learners.finetune import Finetune
from hdqt.cl.learners.icarl import ICaRL
from hdqt.cl.learners.joint import Joint
from hdqt.cl.learners.lwf import LwF
from hdqt.cl.learners.memo import MEMO

_LEARNERS: dict[str, type[Learner]] = {
    cls.name: cls for cls in (Finetune, Joint, LwF, ICaRL, BiC, DER, MEMO)
}

__all__ = ["BiC", "DER", "Finetune", "ICaRL", "Joint", "Learner", "LwF", "MEMO", "TrainConfig",
           "TrainConfigError", "create_learner", "list_learners"]


def list_learners() -> list[str]:
    return list(_LEARNERS)


def create_learner(name: str, *, backbone: str, input_shape: tuple, num_classes: int, policy,
                   config: TrainConfig, seed: int, augment=None, schedule=None) -> Learner:
    """Build the learner called ``name`` (see ``list_learners()``); ``schedule``: the
    steps of its main training stage (``hdqt.cl.schedules``), or None for one stage."""
    if name not in _LEARNERS:
        raise ValueError(f"unknown learner {name!r}; choose one of {list_learners()}")
    return _LEARNERS[name](backbone=backbone, input_shape=input_shape, num_classes=num_classes,
                           policy=policy, config=config, seed=seed, augment=augment,
                           schedule=schedule)
