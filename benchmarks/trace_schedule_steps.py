"""Trace a run's training at the first batch of every schedule step: why a CTMQ chain diverges.

Reruns the run that a config describes (``hdqt run --config``'s TOML; a fresh output folder)
and, before the first optimizer step of each (task, policy) -- every step of a CTMQ schedule,
or each task without one -- prints one line per quantized layer, on that batch and the
network as it stands, in train mode, on copies (the run itself is not touched):

* ``max|w|``: the largest weight entry;
* ``max|dW|``: the largest weight-gradient entry under the step's policy, and under the same
  policy with a float backward (forward quantized alike, backward quantizers off): the
  quantized backward's gradient should be of the same size;
* ``zero rows``: for a linear layer, how many rows of its weight the forward quantizer
  rounds to all zeros (their outputs are constant over the batch);
* ``flat BN``: for the BatchNorm right after the layer, how many of its input features or
  channels have a batch variance below 1e-6 (BatchNorm then divides their gradient by
  sqrt(eps)).

    HDQT_DATA=/path/to/data python benchmarks/trace_schedule_steps.py CONFIG.toml --out DIR
        [--from-step N] [--stop-task T]

The loss is cross-entropy over the seen classes (the learners' own losses add distillation
terms from the second task). A ``NonFiniteError`` ends the trace with its message.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from hdqt.experiments.config import load_toml, resolve_config
from hdqt.experiments.runner import run_experiment
from hdqt.quantization import NonFiniteError, quant_layers


class _Done(Exception):
    pass


def float_backward(policy):
    """``policy`` with its forward kept and every backward quantizer off (a float backward)."""
    return dataclasses.replace(policy, backward_input=None, backward_weight=None, grad_output_dx=None,
                               grad_output_dw=None, hadamard=False)


def weight_grads(network: nn.Module, x, y, classes: int, policy_of) -> dict[str, float]:
    """max|dW| of every quantized layer of a copy of ``network``, its policies set by ``policy_of``."""
    net = copy.deepcopy(network)
    for _, layer in quant_layers(net):
        layer.set_policy(policy_of(layer._rt.policy))
    net.train()
    F.cross_entropy(net(x)[:, :classes], y).backward()
    return {name: float(layer.weight.grad.abs().max()) for name, layer in quant_layers(net)}


def flat_batchnorm_inputs(network: nn.Module, x) -> dict[str, tuple[int, int]]:
    """Per quantized layer followed by a BatchNorm (the next module in its container):
    (inputs of that BatchNorm with batch variance < 1e-6, its inputs)."""
    net = copy.deepcopy(network)
    net.train()
    after = {}
    for name, module in net.named_modules():
        children = list(module.named_children())
        for (a, first), (_, second) in zip(children, children[1:]):
            if isinstance(second, nn.modules.batchnorm._BatchNorm):
                after[f"{name}.{a}" if name else a] = second
    seen = {}
    hooks = [bn.register_forward_hook(lambda m, i, o, key=key: seen.setdefault(key, i[0].detach()))
             for key, bn in after.items()]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    out = {}
    for key, t in seen.items():
        var = t.var(dim=0) if t.dim() == 2 else t.var(dim=(0, 2, 3))
        out[key] = (int((var < 1e-6).sum()), var.numel())
    return out


def zero_rows(layer) -> int | None:
    """Rows of a linear layer's weight that its forward quantizer rounds to all zeros."""
    if layer.weight.dim() != 2 or layer._rt.policy.forward_weight is None:
        return None
    q = layer._rt.policy.forward_weight.quantize(layer.weight.detach())
    values = q.values * (q.scale if isinstance(q.scale, torch.Tensor) else 1.0)
    return int((values.abs().sum(dim=1) == 0).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a run's config.toml")
    parser.add_argument("--out", required=True, help="output folder of the rerun (replaced)")
    parser.add_argument("--from-step", type=int, default=1, help="trace from this (task, policy) step on")
    parser.add_argument("--stop-task", type=int, default=None, help="stop before this task (1-based)")
    args = parser.parse_args()
    config = resolve_config(load_toml(args.config))
    shutil.rmtree(args.out, ignore_errors=True)
    state = {"key": None, "step": 0}

    def on_step(learner, x, y, task_index, stage):
        if args.stop_task is not None and task_index + 1 >= args.stop_task:
            raise _Done
        layers = quant_layers(learner.network)
        key = (task_index, stage, id(layers[0][1]._rt.policy))
        if key == state["key"]:
            return
        state["key"] = key
        state["step"] += 1
        if state["step"] < args.from_step:
            return
        classes = learner.total_classes
        policy = layers[0][1]._rt.policy
        bits = getattr(getattr(policy.forward_weight, "format", None), "bits", None)
        quantized = weight_grads(learner.network, x, y, classes, lambda p: p)
        reference = weight_grads(learner.network, x, y, classes, float_backward)
        flat = flat_batchnorm_inputs(learner.network, x)
        print(f"task {task_index + 1} ({stage}), step {state['step']}: {policy.name}, {bits} bits", flush=True)
        for name, layer in layers:
            rows = zero_rows(layer)
            bn = flat.get(name)
            print(f"  {name:<22} max|w| {float(layer.weight.detach().abs().max()):>8.4g}, "
                  f"max|dW| {quantized[name]:>10.4g} (float backward {reference[name]:.4g})"
                  + (f", zero rows {rows} of {layer.weight.shape[0]}" if rows is not None else "")
                  + (f", flat BN inputs {bn[0]} of {bn[1]}" if bn else ""), flush=True)

    try:
        run_experiment(config, args.out, overwrite=True, on_step=on_step)
    except _Done:
        print(f"stopped before task {args.stop_task}")
    except NonFiniteError as error:
        print(f"NonFiniteError: {error}")
        sys.exit(0)


if __name__ == "__main__":
    main()
