"""Per-layer fidelity of quantized gradients: noise and bias against float32.

For the convnet on one Fashion-MNIST batch (after a short float warm-up, so that
activations and gradients look like training), every conv and linear layer is run
on its own, with its real input and its real upstream gradient, under each recipe
(unlimited accumulators). The reference is the float32 backward of the same
quantized forward (straight-through estimator), so only the backward's rounding
is measured. Over ``--draws`` stochastic draws it prints, for dW and dX:

* ``noise``: E|g - ref|^2 / |ref|^2 of one draw (the step's gradient noise);
* ``bias``: |E g - ref|^2 / |ref|^2, estimated without the noise floor as the
  inner product of the errors of two independent halves of the draws (can be
  slightly negative when there is none);

and, for the conv weight gradients, the stochastic-rounding noise energy of each
operand over its energy, in the raw domain and after the Hadamard transform along
the positions, which is where the transform's cost shows:

    python benchmarks/bench_grad_fidelity.py --recipes int,hdqt --draws 100
    HDQT_NATIVE=0 python benchmarks/bench_grad_fidelity.py     # the torch path
"""
from __future__ import annotations

import argparse
import copy
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import hdqt
from hdqt.cl.learners.networks import IncrementalNet
from hdqt.data import prepare
from hdqt.models import create_model
from hdqt.quantization.hadamard import block_layout, hadamard_transform
from hdqt.quantization.layers import QuantConv2d, QuantLinear


def warm_network(x, y, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = IncrementalNet(create_model("convnet", tuple(x.shape[1:])))
    net.add_classes(int(y.max()) + 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def capture(net: nn.Module, xb, yb) -> dict:
    """Each conv/linear layer's input and upstream gradient on one float training step."""
    caps, hooks = {}, []
    for name, mod in net.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            def hook(_, inp, out, name=name):
                caps[name] = {"x": inp[0].detach().clone()}
                out.register_hook(lambda g: caps[name].__setitem__("g", g.detach().clone()))
            hooks.append(mod.register_forward_hook(hook))
    net.train()
    net.zero_grad()
    F.cross_entropy(net(xb), yb).backward()
    for h in hooks:
        h.remove()
    return caps


def layer_fidelity(mod: nn.Module, name: str, policy, x, g, draws: int) -> dict:
    float_mod = copy.deepcopy(mod)
    quant = (QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear).from_float(float_mod, policy, name)
    xq = policy.forward_input.quantize(x)
    wq = policy.forward_weight.quantize(float_mod.weight.detach())
    xr = (xq.values * xq.scale).requires_grad_(True)
    wr = (wq.values * wq.scale).requires_grad_(True)
    if isinstance(mod, nn.Conv2d):
        yr = F.conv2d(xr, wr, None, mod.stride, mod.padding, mod.dilation)
    else:
        yr = F.linear(xr, wr)
    yr.backward(g)
    dws, dxs = [], []
    for _ in range(draws):
        xx = x.clone().requires_grad_(True)
        float_mod.weight.grad = None
        out = quant(xx)
        if quant.bias is not None:  # the float bias does not enter dW or dX
            out = out - quant.bias.view(1, -1, *([1] * (out.dim() - 2))).detach()
        out.backward(g)
        dws.append(float_mod.weight.grad.clone())
        dxs.append(xx.grad.clone())
    result = {}
    for key, est, ref in (("dW", torch.stack(dws), wr.grad), ("dX", torch.stack(dxs), xr.grad)):
        norm2 = ref.norm() ** 2
        half = draws // 2
        e1, e2 = est[:half].mean(0) - ref, est[half:].mean(0) - ref
        result[key] = (float(((est - ref) ** 2).flatten(1).sum(1).mean() / norm2),
                       float((e1.flatten() @ e2.flatten()) / norm2))
    return result


def sr_noise(t: torch.Tensor, bits: int = 4) -> float:
    """Expected energy of stochastic rounding on a max-scaled signed grid, over the energy of ``t``."""
    step = t.abs().max() / (2 ** (bits - 1) - 1)
    if step == 0:
        return 0.0
    frac = t / step - (t / step).floor()
    return float((frac * (1 - frac)).sum() * step**2 / t.pow(2).sum())


def operand_noise(mod: nn.Conv2d, policy, x, g) -> str:
    xq = policy.forward_input.quantize(x).values
    cols = F.unfold(xq, mod.kernel_size, mod.dilation, mod.padding, mod.stride).transpose(0, 1)  # (K, B, L)
    positions = cols.shape[2]
    gcols = g.reshape(g.shape[0], g.shape[1], -1).transpose(0, 1)  # (N, B, L)
    parts = [f"L={positions} raw X {sr_noise(cols):.2f} G {sr_noise(gcols):.2f}"]
    for rule in ("paper", "binary"):
        layout = block_layout(positions, rule)
        hx = hadamard_transform(cols.reshape(-1, positions), 1, layout)
        hg = hadamard_transform(gcols.reshape(-1, positions), 1, layout)
        parts.append(f"{rule} {layout.blocks[0]}.. X {sr_noise(hx):.2f} G {sr_noise(hg):.2f}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="int,hdqt,hdqt:binary")
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=30, help="float SGD steps before measuring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = prepare("fashion_mnist", root=args.data_root, seed=args.seed, augment=False)
    x = torch.from_numpy(np.ascontiguousarray(data.x_train[:20000], dtype=np.float32))
    y = torch.from_numpy(np.asarray(data.y_train[:20000])).long()
    net = warm_network(x, y, args.warmup, args.seed)
    caps = capture(net, x[: args.batch], y[: args.batch])
    modules = dict(net.named_modules())
    print(f"convnet, Fashion-MNIST batch {args.batch}, {args.warmup} float warm-up steps, {args.draws} draws, "
          f"native={'off' if os.environ.get('HDQT_NATIVE') == '0' else 'on'}; noise = E|g-ref|^2/|ref|^2, "
          f"bias = |E g-ref|^2/|ref|^2")
    for spec in args.recipes.split(","):
        recipe, _, rule = spec.partition(":")
        policy = hdqt.recipe(recipe, acc_bits=None, hadamard_rule=rule or "paper", seed=args.seed + 1)
        print(f"== {spec}")
        for name, cap in caps.items():
            res = layer_fidelity(modules[name], name, policy, cap["x"], cap["g"], args.draws)
            cells = "  ".join(f"{k} noise {v[0]:6.3f} bias {v[1]:+.4f}" for k, v in res.items())
            print(f"  {name:20s} {cells}")
    print("== stochastic-rounding noise energy / energy of the conv dW operands (4 bits)")
    policy = hdqt.recipe("hdqt", acc_bits=None)
    for name, cap in caps.items():
        if isinstance(modules[name], nn.Conv2d):
            print(f"  {name:20s} {operand_noise(modules[name], policy, cap['x'], cap['g'])}")


if __name__ == "__main__":
    main()
