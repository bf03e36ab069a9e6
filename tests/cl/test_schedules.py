"""CTMQ's schedule: the steps it yields, and learners that train their main stage as them."""
from __future__ import annotations

import pytest
import torch

import hdqt
from hdqt.cl.learners import TrainConfig, list_learners
from hdqt.cl.schedules import CTMQSchedule, ScheduleError, TrainingStep, step_milestones
from hdqt.quantization import quant_layers

from helpers import DIM, NUM_CLASSES, run_tasks, through_torch_save, weights


def int_policy(bits: int):
    return hdqt.recipe("int", bits=bits, acc_bits=None)


def build(method, config, steps, policy=None):
    """A learner whose own policy is the target's (default 2 bits; new layers start there)."""
    from hdqt.cl.learners import create_learner

    return create_learner(method, backbone="fcnet", input_shape=(DIM,), num_classes=NUM_CLASSES,
                          policy=policy or int_policy(2), config=config, seed=3, schedule=steps)


def layer_bits(network) -> set[int]:
    return {layer.policy.forward_weight.format.bits for _, layer in quant_layers(network)}


# ---------------------------------------------------------------------- the schedule
def test_ctmq_8_to_2_in_2_cycles_descends_one_bit_a_step_twice():
    schedule = CTMQSchedule(start_bits=8, target_bits=2, cycles=2)
    assert schedule.num_steps == 14
    assert schedule.bit_widths() == (8, 7, 6, 5, 4, 3, 2, 8, 7, 6, 5, 4, 3, 2)
    # 30 epochs: 2 a step, the 2 left over to the last two steps (the target last)
    assert schedule.split_epochs(30) == (2,) * 12 + (3, 3)
    assert schedule.split_epochs(14) == (1,) * 14
    steps = schedule.plan(30, int_policy)
    assert [s.bits for s in steps] == list(schedule.bit_widths())
    assert [s.cycle for s in steps] == [1] * 7 + [2] * 7
    assert sum(s.epochs for s in steps) == 30
    for step in steps:
        assert step.policy.forward_weight.format.bits == step.bits
        assert step.policy.grad_output_dx.format.bits == step.bits
    # one policy object per width, shared by the cycles
    assert steps[0].policy is steps[7].policy
    assert CTMQSchedule(3, 2, 1).bit_widths() == (3, 2)
    assert CTMQSchedule(2, 1, 3).bit_widths() == (2, 1) * 3  # a binary target


@pytest.mark.parametrize("kwargs, field, fragment", [
    (dict(start_bits=2, target_bits=2), "start_bits", "in 3..16, wider than the target width (2 bits), got 2"),
    (dict(start_bits=17, target_bits=2), "start_bits", "in 3..16"),
    (dict(start_bits=8, target_bits=0), "target_bits", "in 1..15"),
    (dict(start_bits=8, target_bits=2, cycles=0), "cycles", "must be an integer >= 1"),
    (dict(start_bits=8.0, target_bits=2), "start_bits", "got 8.0"),
])
def test_invalid_settings_name_the_field_and_the_range(kwargs, field, fragment):
    with pytest.raises(ScheduleError) as caught:
        CTMQSchedule(**kwargs)
    assert caught.value.field == field and str(caught.value).startswith(field + " ")
    assert fragment in str(caught.value)


def test_fewer_epochs_than_steps_is_an_error_that_says_how_many():
    with pytest.raises(ScheduleError, match=r"^epochs must be at least 14, one epoch for each "
                                            r"step of CTMQ \(8 down to 2 bits, 2 cycles: 14 "
                                            r"steps\).*got 10"):
        CTMQSchedule(8, 2, 2).split_epochs(10)


def test_step_milestones_keep_the_fractions_of_the_task():
    assert step_milestones((10,), 15, 5) == (3,)
    assert step_milestones((60, 100, 140), 170, 17) == (6, 10, 14)
    assert step_milestones((1,), 2, 1) == ()  # a milestone on the step's end is dropped


def test_a_learner_refuses_a_schedule_that_does_not_split_its_epochs():
    steps = CTMQSchedule(4, 2, 1).plan(3, int_policy)
    with pytest.raises(ValueError, match="train 3 epochs in all, but the config's epochs is 2"):
        build("finetune", TrainConfig(epochs=2, lr=0.05), steps)
    with pytest.raises(ValueError, match="policy must be a QuantPolicy"):
        build("finetune", TrainConfig(epochs=1, lr=0.05),
              (TrainingStep(policy="int", epochs=1, bits=4),))
    with pytest.raises(ValueError, match="needs a quantized learner"):
        from hdqt.cl.learners import create_learner

        create_learner("finetune", backbone="fcnet", input_shape=(DIM,), num_classes=NUM_CLASSES,
                       policy=None, config=TrainConfig(epochs=3, lr=0.05), seed=0, schedule=steps)


# ---------------------------------------------------------------------- learners
SCHEDULE_CONFIG = TrainConfig(epochs=4, lr=0.05, batch_size=32, memory=30, milestones=(2,),
                              balanced_finetune_epochs=1, bic_steps=20)


class Recorder:
    """Records, for every optimizer step of the main stage, the widths of every
    quantized layer; and the weights at the ends of the steps and at their first batch."""

    def __init__(self, learner):
        self.learner = learner
        self.widths: list[tuple[int, int, frozenset]] = []  # (task, step, layer widths)
        self.ends: dict[tuple[int, int], torch.Tensor] = {}
        self.starts: dict[tuple[int, int], torch.Tensor] = {}
        learner.on_step = self.on_step
        learner.on_schedule_step = self.on_schedule_step

    def on_step(self, learner, x, y, task_index, stage):
        if stage != "main":
            return
        step = learner._steps_done
        self.widths.append((task_index, step, frozenset(layer_bits(learner.network))))
        self.starts.setdefault((task_index, step), weights(learner))

    def on_schedule_step(self, learner, task_index, steps_done):
        self.ends[(task_index, steps_done - 1)] = weights(learner)


@pytest.mark.parametrize("method", list_learners())
def test_every_learner_trains_each_step_at_its_width_from_the_previous_steps_weights(
        method, scenario):
    schedule = CTMQSchedule(start_bits=4, target_bits=2, cycles=1)  # 4, 3, 2 bits
    steps = schedule.plan(SCHEDULE_CONFIG.epochs, int_policy)
    assert [s.epochs for s in steps] == [1, 1, 2]
    learner = build(method, SCHEDULE_CONFIG, steps)
    recorder = Recorder(learner)
    epochs = []
    run_tasks(learner, scenario.tasks[:2],
              on_epoch=lambda epoch, total, logs: epochs.append((epoch, total, logs)))

    for task in (0, 1):
        seen = [(step, widths) for t, step, widths in recorder.widths if t == task]
        # every quantized layer (grown heads, new branches, frozen old branches) at the step's width
        assert sorted({(step, w) for step, w in seen}) == [
            (0, frozenset({4})), (1, frozenset({3})), (2, frozenset({2}))]
        for step in (1, 2):  # a step starts from the weights the step before left
            assert torch.equal(recorder.starts[(task, step)], recorder.ends[(task, step - 1)])
            assert not torch.equal(recorder.ends[(task, step)], recorder.ends[(task, step - 1)])
    # after the schedule (and any later stage): the target width everywhere
    assert layer_bits(learner.network) == {2}
    main = [(e, logs["step"], logs["bits"]) for e, _, logs in epochs[-6:] if logs["stage"] == "main"]
    assert main[-4:] == [(1, 1, 4), (2, 2, 3), (3, 3, 2), (4, 3, 2)]  # epochs count across steps
    accuracy = learner.evaluate(scenario.tasks[1].x_test)
    assert set(accuracy) >= {"cnn"}


@pytest.mark.parametrize("method, stop_after", [("icarl", 2), ("der", 2), ("bic", 2),
                                                ("der", 3), ("bic", 3)])
def test_resuming_between_two_steps_equals_the_uninterrupted_learner(method, stop_after,
                                                                     scenario):
    """Stopped after step 2 of 3, or after the last (before BiC's bias correction and
    DER's balanced classifier stage), then resumed in a new learner."""
    steps = CTMQSchedule(start_bits=4, target_bits=2, cycles=1).plan(SCHEDULE_CONFIG.epochs,
                                                                     int_policy)
    reference = build(method, SCHEDULE_CONFIG, steps)
    run_tasks(reference, scenario.tasks[:2])

    learner = build(method, SCHEDULE_CONFIG, steps)
    run_tasks(learner, scenario.tasks[:1])
    before = through_torch_save(learner.state_dict())
    saved = {}

    def stop(learner, task_index, steps_done):
        if steps_done == stop_after:
            saved["state"] = through_torch_save(learner.schedule_state())
            raise KeyboardInterrupt

    learner.on_schedule_step = stop
    task = scenario.tasks[1]
    learner.before_task(task)
    with pytest.raises(KeyboardInterrupt):
        learner.train_task(task)
    assert saved["state"]["steps_done"] == stop_after and saved["state"]["task"] == 1

    resumed = build(method, SCHEDULE_CONFIG, steps)
    resumed.load_state_dict(before)
    resumed.before_task(task)
    resumed.load_schedule_state(saved["state"])
    trained = []
    resumed.train_task(task, on_epoch=lambda epoch, total, logs: trained.append(
        (epoch, logs.get("step"))))
    resumed.after_task(task)
    # only the steps left: the last step's two epochs, or none
    assert [e for e in trained if e[1] is not None] == [(3, 3), (4, 3)][:2 * (3 - stop_after)]
    if method in ("bic", "der"):  # the later stage ran
        assert any(e[1] is None for e in trained)
    assert torch.equal(weights(resumed), weights(reference))
    x = scenario.tasks[1].x_test
    for name, preds in reference.evaluate(x).items():
        assert (resumed.evaluate(x)[name] == preds).all(), name


def test_schedule_state_refuses_another_task(scenario):
    steps = CTMQSchedule(3, 2, 1).plan(2, int_policy)
    learner = build("finetune", TrainConfig(epochs=2, lr=0.05), steps)
    learner.before_task(scenario.tasks[0])
    state = learner.schedule_state()
    learner.train_task(scenario.tasks[0])
    learner.after_task(scenario.tasks[0])
    learner.before_task(scenario.tasks[1])
    with pytest.raises(ValueError, match="schedule state of task 0 cannot continue task 1"):
        learner.load_schedule_state(state)


@pytest.mark.skipif("hadanet" not in hdqt.list_recipes(),
                    reason="the hadanet recipe (binary targets) has not landed in this tree")
def test_a_binary_target_trains_its_last_steps_under_hadanet(scenario):
    schedule = CTMQSchedule(start_bits=3, target_bits=1, cycles=1)
    binary = hdqt.recipe("hadanet")
    steps = schedule.plan(3, lambda bits: binary if bits == 1 else int_policy(bits))
    learner = build("icarl", TrainConfig(epochs=3, lr=0.05, memory=30), steps, policy=binary)
    recorder = Recorder(learner)
    run_tasks(learner, scenario.tasks[:1])
    assert [step for _, step, _ in recorder.widths][-1] == 2
    assert {layer.policy.name for _, layer in quant_layers(learner.network)} == {binary.name}
