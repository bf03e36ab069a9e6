"""The shared base of every class-incremental learner.

A run drives a learner task by task::

    learner.before_task(task)      # grow heads / add extractors, (re)quantize, reseed
    learner.train_task(task, on_epoch=callback)
    learner.after_task(task)       # memory update, class means, old-model snapshot
    predictions = learner.evaluate(task.x_test, task.y_test)   # {"cnn": ..., "nme": ...}

Subclasses override small hooks (``_loss``, ``_grow``, ``_training_data``,
``train_task``...), PyCIL style. Everything random is derived from
``(seed, purpose, task index)``: module initialisation runs under
``torch.random.fork_rng`` with a derived seed, batches are shuffled by a
``torch.Generator`` with a derived seed, and the quantizers are reseeded at
every task. Nothing depends on the global RNG history, so a learner restored
with ``load_state_dict`` after task t continues exactly like the original.

A learner built with ``schedule`` (``hdqt.cl.schedules``: CTMQ's chain of bit widths)
trains its main stage as the schedule's steps, each under its own policy
(``_fit_main``). Between two steps, ``schedule_state`` holds what a resumed run needs
on top of the state before the task; ``load_schedule_state`` (after ``before_task``)
continues after the last finished step, exactly like the original.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import hdqt
from hdqt.cl.learners.config import TrainConfig
from hdqt.cl.learners.networks import IncrementalNet
from hdqt.cl.memory import ExemplarMemory
from hdqt.cl.scenario import Task
from hdqt.cl.schedules import TrainingStep, check_steps, step_milestones
# The engine's seed derivation, shared: one function for both layers.
from hdqt.quantization import quant_layers
from hdqt.quantization.runtime import derive_seed

__all__ = ["Learner", "TrainConfig", "derive_seed", "EpochCallback"]

EpochCallback = Callable[[int, int, dict], None]
STATE_VERSION = 1


class Learner:
    """Base class: one network, optional exemplar memory, optional frozen old network.

    Class attributes set by subclasses:
        name: registry name.
        uses_memory: keeps an ExemplarMemory (rehearsal and NME classification).
        keeps_old_network: snapshots the network after each task (distillation).
    """

    name: ClassVar[str] = "base"
    uses_memory: ClassVar[bool] = False
    keeps_old_network: ClassVar[bool] = False
    # Called before every optimizer step as on_step(learner, x, y, task_index, stage) with
    # the batch about to be trained on (hdqt run --diagnose-every); it must leave the
    # learner as it found it. None: nothing is called.
    on_step: Callable[..., None] | None = None
    # Called after every finished step of a schedule as on_schedule_step(learner,
    # task_index, steps_done) (hdqt run writes its checkpoint there). None: nothing is called.
    on_schedule_step: Callable[..., None] | None = None

    def __init__(self, *, backbone: str, input_shape: tuple, num_classes: int, policy,
                 config: TrainConfig, seed: int, augment=None,
                 schedule: "tuple[TrainingStep, ...] | None" = None):
        _check_args(backbone, input_shape, num_classes, policy, config, seed, augment)
        if schedule is not None and policy is None:
            raise ValueError("a schedule sets quantization policies: it needs a quantized "
                             "learner (policy=None trains float layers)")
        self.schedule: tuple[TrainingStep, ...] = (
            () if schedule is None else check_steps(schedule, config.epochs))
        if self.uses_memory and config.memory < num_classes:
            raise ValueError(
                f"memory={config.memory} cannot keep one exemplar for each of the "
                f"{num_classes} classes that {self.name} will see; use memory >= {num_classes}")
        self.backbone_name = backbone
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.policy = policy
        self.config = config
        self.seed = int(seed)
        self.augment = augment
        self.device = torch.device(config.device)
        self._reset()

    def _reset(self) -> None:
        """Fresh state: the network before any task, empty memory, nothing learnt."""
        self.task_sizes: list[int] = []  # new classes per task started; replayed on load
        self.known_classes = 0  # classes of finished tasks
        self.finished_tasks = 0
        self._current_task: int | None = None
        self._steps_done = 0  # schedule steps finished in the current task
        self.memory = (ExemplarMemory(self.config.memory, self.config.selection)
                       if self.uses_memory else None)
        self.old_network: nn.Module | None = None
        with self._seeded("init"):
            self.network = self._build_network()
            self._quantize()

    # ------------------------------------------------------------------ hooks
    def _build_network(self) -> nn.Module:
        return IncrementalNet(self._new_backbone())

    def _new_backbone(self) -> nn.Module:
        from hdqt.models import create_model

        return create_model(self.backbone_name, self.input_shape)

    def _grow(self, task_index: int, num_new: int) -> None:
        """Make room for ``num_new`` classes (called under a seed derived from the task)."""
        self.network.add_classes(num_new)

    def _training_data(self, task: Task) -> tuple[np.ndarray, np.ndarray]:
        """The samples trained on in this task: new data, plus exemplars when kept."""
        if self.memory is not None and len(self.memory):
            x_mem, y_mem = self.memory.data()
            return (np.concatenate([task.x_train, x_mem]),
                    np.concatenate([task.y_train, y_mem]))
        return task.x_train, task.y_train

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits over all seen classes) for one batch."""
        raise NotImplementedError

    def _set_train_mode(self) -> None:
        self.network.train()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The features the memory herds on and NME classifies with."""
        return self.network.features(x)

    def _logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The network's logits given ``_features`` (evaluation computes features once)."""
        return self.network.head(features)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ task protocol
    @property
    def total_classes(self) -> int:
        """Classes the network currently outputs (known + the current task's)."""
        return sum(self.task_sizes)

    def before_task(self, task: Task) -> None:
        if self._current_task is not None:
            raise RuntimeError(f"task {self._current_task} was started but not finished "
                               f"with after_task")
        if task.index != self.finished_tasks:
            raise ValueError(f"tasks must run in order: expected task {self.finished_tasks}, "
                             f"got task {task.index}")
        classes = np.asarray(task.classes)
        expected = np.arange(self.known_classes, self.known_classes + len(classes))
        if len(classes) == 0 or not np.array_equal(classes, expected):
            raise ValueError(f"task {task.index} must bring the labels that follow the "
                             f"{self.known_classes} known ones ({expected.tolist()}), got "
                             f"{classes.tolist()}; use ClassIncrementalScenario")
        if self.known_classes + len(classes) > self.num_classes:
            raise ValueError(f"task {task.index} would bring the classes seen to "
                             f"{self.known_classes + len(classes)}, more than "
                             f"num_classes={self.num_classes}")
        self._current_task = task.index
        self._steps_done = 0
        self.task_sizes.append(len(classes))
        with self._seeded("grow", task.index):
            self._grow(task.index, len(classes))
            self._quantize()
        self._reseed_quantizers(task.index)

    def train_task(self, task: Task, on_epoch: EpochCallback | None = None) -> dict:
        """Train on the task; returns the last epoch's logs."""
        self._check_current(task)
        x, y = self._training_data(task)
        return self._fit_main(x, y, self._loss, self.network.parameters(),
                              task_index=task.index, on_epoch=on_epoch)

    def after_task(self, task: Task) -> None:
        self._check_current(task)
        if self.memory is not None:
            self.memory.update(task.x_train, task.y_train, self.extract_features,
                               seed=derive_seed(self.seed, "memory", task.index))
        self.known_classes = self.total_classes
        self.finished_tasks += 1
        self._current_task = None
        if self.keeps_old_network:
            self._snapshot_old_network()

    @torch.no_grad()
    def evaluate(self, x, y=None) -> dict[str, np.ndarray]:
        """Predicted labels of the network's classifier ("cnn") and, when the
        learner has exemplar means, of the nearest-mean-of-exemplars ("nme").
        ``y`` is accepted for symmetry with the metrics and not used."""
        if self.total_classes == 0:
            raise RuntimeError("evaluate needs at least one task: call before_task first")
        self.network.eval()

        def predict(xb):
            features = self._features(xb)
            return self._logits_from_features(features).argmax(dim=1), features

        preds, feats = self._in_mixed_batches(x, predict)
        out = {"cnn": preds.numpy().astype(np.int64)}
        if self.memory is not None and self.memory.has_means:
            out["nme"] = self.memory.nme_predict(feats.double().numpy())
        return out

    @torch.no_grad()
    def extract_features(self, x) -> np.ndarray:
        self.network.eval()
        (features,) = self._in_mixed_batches(x, lambda xb: (self._features(xb),))
        return features.double().numpy()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last finished task."""
        if self._current_task is not None:
            raise RuntimeError(f"state_dict is only defined between tasks; task "
                               f"{self._current_task} is still running")
        return _to_cpu({
            "version": STATE_VERSION, "learner": self.name, "backbone": self.backbone_name,
            "input_shape": list(self.input_shape), "num_classes": self.num_classes,
            "seed": self.seed, "task_sizes": list(self.task_sizes),
            "network": self.network.state_dict(),
            "memory": None if self.memory is None else self.memory.state_dict(),
            "extra": self._extra_state(),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict saved by a learner built with the same arguments."""
        expected = {"version": STATE_VERSION, "learner": self.name, "backbone": self.backbone_name,
                    "input_shape": list(self.input_shape), "num_classes": self.num_classes}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"state_dict has {key}={state.get(key)!r} but this learner has "
                                 f"{key}={value!r}")
        self._reset()
        for index, size in enumerate(state["task_sizes"]):
            self.task_sizes.append(int(size))
            with self._seeded("grow", index):
                self._grow(index, int(size))
                self._quantize()
        self.network.load_state_dict(state["network"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        self._load_extra_state(state["extra"])
        self.known_classes = self.total_classes
        self.finished_tasks = len(self.task_sizes)
        if self.keeps_old_network and self.finished_tasks:
            # The snapshot after_task takes is a copy of the network at that point,
            # which is exactly the network just loaded.
            self._snapshot_old_network()

    def schedule_state(self) -> dict[str, Any]:
        """Mid-task state between two schedule steps: the task, the steps finished, and
        the networks as they stand (weights, BatchNorm statistics, the quantizers'
        policies, generator and scaling states). Training changes nothing else of a
        learner (memory and snapshots change in ``after_task``), so this plus the
        ``state_dict`` from before the task is all a resumed run needs."""
        if self._current_task is None:
            raise RuntimeError("schedule_state is only defined during a task")
        return _to_cpu({
            "task": self._current_task, "steps_done": self._steps_done,
            "network": self.network.state_dict(),
            "old_network": None if self.old_network is None else self.old_network.state_dict(),
        })

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        """Continue the current task (``before_task`` called) after the schedule steps
        that ``state`` (from ``schedule_state``) had finished."""
        if self._current_task is None or state.get("task") != self._current_task:
            raise ValueError(f"schedule state of task {state.get('task')!r} cannot continue "
                             f"task {self._current_task!r}: call before_task on its task first")
        steps_done = state.get("steps_done")
        if not isinstance(steps_done, int) or not 0 <= steps_done <= len(self.schedule):
            raise ValueError(f"schedule state has steps_done={steps_done!r}; this learner's "
                             f"schedule has {len(self.schedule)} steps")
        self.network.load_state_dict(state["network"])
        if (state["old_network"] is None) != (self.old_network is None):
            raise ValueError("schedule state and learner disagree on the old network")
        if self.old_network is not None:
            self.old_network.load_state_dict(state["old_network"])
        self._steps_done = steps_done

    # ------------------------------------------------------------------ machinery
    def _fit_main(self, x, y, loss_fn, parameters, *, task_index: int,
                  on_epoch: EpochCallback | None, total_epochs: int | None = None) -> dict:
        """The task's main training stage: one ``_fit``, or with a schedule its steps in
        turn from the first not yet finished. Before a step every quantized layer takes
        the step's policy; after it, ``on_schedule_step`` is called."""
        if not self.schedule:
            return self._fit(x, y, loss_fn, parameters, task_index=task_index, stage="main",
                             on_epoch=on_epoch, total_epochs=total_epochs)
        parameters = list(parameters)  # iterated once per step
        total_epochs = self.config.epochs if total_epochs is None else total_epochs
        logs: dict = {}
        for index in range(self._steps_done, len(self.schedule)):
            step = self.schedule[index]
            self._set_policy(step.policy)
            logs = self._fit(x, y, loss_fn, parameters, task_index=task_index, stage="main",
                             on_epoch=on_epoch, step=index, total_epochs=total_epochs,
                             epoch_offset=sum(s.epochs for s in self.schedule[:index]),
                             epochs=step.epochs,
                             milestones=step_milestones(self.config.milestones,
                                                        self.config.epochs, step.epochs))
            self._steps_done = index + 1
            if self.on_schedule_step is not None:
                self.on_schedule_step(self, task_index, self._steps_done)
        return logs

    def _set_policy(self, policy) -> None:
        """Every quantized layer of the network (old branches included) under ``policy``;
        the old network, a teacher, keeps the policy it was trained under last."""
        for _, layer in quant_layers(self.network):
            layer.set_policy(policy)

    def _fit(self, x, y, loss_fn, parameters, *, task_index: int, stage: str,
             on_epoch: EpochCallback | None, epoch_offset: int = 0,
             total_epochs: int | None = None, weight_decay: float | None = None,
             set_mode: Callable[[], None] | None = None, augment: bool = True,
             epochs: int | None = None, milestones: tuple[int, ...] | None = None,
             step: int | None = None) -> dict:
        """SGD + MultiStepLR over (x, y) for ``epochs`` epochs (default: the config's,
        with the config's milestones; a stage with its own ``epochs`` passes its own
        ``milestones``, since the config's are validated against ``config.epochs``).

        Batches are shuffled (and augmented) by a generator seeded by
        (seed, task, stage), and (seed, task, stage, step) for a schedule's step
        (0-based; its logs carry ``step`` 1-based and ``bits``); anything else random
        in training (dropout) runs under a forked global RNG seeded the same way.
        """
        cfg = self.config
        params = [p for p in parameters if p.requires_grad]
        if not params:
            raise RuntimeError(f"{self.name}: nothing to train in stage {stage!r}")
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay if weight_decay is None
                                    else weight_decay)
        if epochs is None:
            epochs, milestones = cfg.epochs, cfg.milestones
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones or ()),
                                                         gamma=cfg.gamma)
        keys = (task_index, stage) if step is None else (task_index, stage, step)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "batches", *keys))
        x_all = _as_float_tensor(x)
        y_all = torch.as_tensor(np.asarray(y), dtype=torch.long)
        total_epochs = epochs if total_epochs is None else total_epochs
        set_mode = set_mode or self._set_train_mode
        logs: dict = {}
        with self._seeded("train", *keys):
            for epoch in range(epochs):
                set_mode()
                loss_sum, correct = 0.0, 0
                for idx in _batch_indices(len(y_all), cfg.batch_size, generator):
                    xb = x_all[idx]
                    if augment and self.augment is not None:
                        xb = self.augment(xb, generator)
                    xb, yb = xb.to(self.device), y_all[idx].to(self.device)
                    if self.on_step is not None:
                        self.on_step(self, xb, yb, task_index, stage)
                    loss, logits = loss_fn(xb, yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += float(loss.detach()) * len(idx)
                    correct += int((logits.detach().argmax(dim=1) == yb).sum())
                logs = {"loss": loss_sum / len(y_all), "accuracy": 100.0 * correct / len(y_all),
                        "lr": optimizer.param_groups[0]["lr"], "stage": stage}
                if step is not None:
                    logs.update(step=step + 1, bits=self.schedule[step].bits)
                scheduler.step()
                if on_epoch is not None:
                    on_epoch(epoch_offset + epoch + 1, total_epochs, logs)
        return logs

    @contextmanager
    def _seeded(self, *keys: object) -> Iterator[None]:
        """Run a block under the global RNG seeded from (seed, keys), then restore it."""
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None
                       else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(self.seed, *keys))
            yield

    def _quantize(self) -> None:
        # Idempotent in the engine: converts only float layers added since the last call
        # (a grown head, a new extractor); the rest keep their state.
        if self.policy is not None:
            hdqt.quantize_model(self.network, self.policy)
        self.network.to(self.device)

    def _reseed_quantizers(self, task_index: int) -> None:
        if self.policy is None:
            return
        hdqt.reseed_quantizers(self.network, derive_seed(self.seed, "quantizers", task_index))
        if self.old_network is not None:
            hdqt.reseed_quantizers(self.old_network,
                                   derive_seed(self.seed, "old-quantizers", task_index))

    def _snapshot_old_network(self) -> None:
        self.old_network = copy.deepcopy(self.network).eval()
        for p in self.old_network.parameters():
            p.requires_grad_(False)

    def _check_current(self, task: Task) -> None:
        if self._current_task != task.index:
            raise RuntimeError(f"call before_task(task {task.index}) first"
                               if self._current_task is None else
                               f"task {self._current_task} is running, got task {task.index}")

    def _in_mixed_batches(self, x, fn: Callable[[torch.Tensor], tuple]) -> tuple:
        """``fn`` (batch -> tuple of tensors) over ``x`` in inference batches; the
        results, on the CPU, in the order of ``x``.

        The batches follow a fixed shuffled order seeded by (seed, len(x)): quantized
        layers scale activations per tensor, so a sample's output depends on the batch
        it shares, and test sets come sorted by label, which in input order would make
        every batch mostly one class. Shuffled, every batch mixes the classes, and the
        same data always gives the same batches (reproducible, resumable).
        """
        x_all = _as_float_tensor(x)
        n = len(x_all)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "inference-order", n))
        order = torch.randperm(n, generator=generator)
        size = max(self.config.batch_size, 256)
        parts = [tuple(out.cpu() for out in fn(x_all[idx].to(self.device)))
                 for idx in order.split(size)]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n)
        return tuple(torch.cat(column)[inverse] for column in zip(*parts))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backbone={self.backbone_name!r}, "
                f"classes={self.total_classes}/{self.num_classes}, "
                f"finished_tasks={self.finished_tasks})")


# ---------------------------------------------------------------------- losses
def distillation_loss(logits: torch.Tensor, old_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Cross-entropy between temperature-softened old and new outputs (Hinton et al.;
    the form LwF, iCaRL-in-PyCIL and BiC use), averaged over the batch."""
    soft_targets = F.softmax(old_logits / temperature, dim=1)
    log_probs = F.log_softmax(logits / temperature, dim=1)
    return -(soft_targets * log_probs).sum(dim=1).mean()


# ---------------------------------------------------------------------- helpers
def _batch_indices(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    starts = list(range(0, n, batch_size))
    # A trailing batch of one sample breaks BatchNorm in training mode; fold it into
    # the previous batch instead of dropping the sample.
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    ends = starts[1:] + [n]
    return [order[s:e] for s, e in zip(starts, ends)]


def _as_float_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _to_cpu(obj):
    """A copy on the CPU of tensors and plain data; numpy arrays become tensors, so
    that ``torch.load(..., weights_only=True)`` reads a saved state (subclasses'
    ``_load_extra_state`` turns them back, see ``hdqt.cl.memory.tensor_to_array``)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _check_args(backbone, input_shape, num_classes, policy, config, seed, augment) -> None:
    if not isinstance(backbone, str) or not backbone:
        raise ValueError(f"backbone must be a model name such as 'fcnet', got {backbone!r}")
    try:
        dims = tuple(input_shape)
    except TypeError:
        dims = ()
    if not dims or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                       for d in dims):
        raise ValueError(f"input_shape must be a tuple of positive integers (one sample's "
                         f"shape), got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if policy is not None and not isinstance(policy, hdqt.QuantPolicy):
        raise ValueError(f"policy must be a QuantPolicy from hdqt.recipe(...) or None for plain "
                         f"float layers, got {type(policy).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if augment is not None and not callable(augment):
        raise ValueError(f"augment must be None or a callable (x, generator) -> x, "
                         f"got {type(augment).__name__}")
