"""Memory a training step keeps for the backward, per recipe, against fp32 in the same process.

Two measures, at batch 128:

* saved bytes: every tensor that autograd saves during the forward, seen through
  ``torch.autograd.graph.saved_tensors_hooks``, counted once per distinct storage (a
  weight and its transposed view are one), at the storage's size. Parameters count
  (fp32 keeps its weights for dX, the quantized layers their packed codes), and so do
  BatchNorm's input and statistics. "model" counts the model's forward, "step" the
  loss too: the two-conv case's loss, ``out.square().mean()``, keeps the float output
  (8.4 MB) whatever the layers do. ``--detail`` splits the step's bytes by the
  autograd node that saved them.
* peak: how far memory rises above its level before the step, during forward +
  backward + SGD. On CUDA ``torch.cuda.max_memory_allocated`` (allocator bytes); on
  CPU the resident set: each case runs in a child process (after two warm-up steps),
  which resets the kernel's high-water mark (``/proc/self/clear_refs``, "5") and reads
  ``VmHWM - VmRSS`` from ``/proc/self/status``, with glibc's mmap threshold fixed at
  128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set. The RSS peak includes the allocator's
  slack and the step's temporaries (gradients, the backward's working tensors), so it
  falls less than the saved bytes do.

Models: FCNet 405-405-405-19 (ReLU, no bias), two 16->16 3x3 convs each followed by a
ReLU on 32x32 maps, and ResNet-32 (``hdqt.models``, 3x32x32, with a 100-way linear
head). Quantized models are converted by ``hdqt.quantize_model`` with its defaults
(``pack_activations=True``: ``PackedMaskReLU``, ``CompactBatchNorm2d``);
``--no-pack-activations`` keeps ``nn.ReLU`` and ``nn.BatchNorm2d``.
Targets (issue 13): hdqt saved bytes <= 0.3x fp32 for FCNet and the two convs, <= 0.5x for ResNet-32
(judged on the model's bytes; the exit status is 1 when one is missed).

    python benchmarks/bench_memory.py [--recipes fp32,hdqt,int,luq] [--models fcnet,twoconv,resnet32]
                                      [--device cpu] [--no-peak] [--detail]
    python benchmarks/bench_memory.py --speed [--recipes hdqt] [--models fcnet,twoconv] [--threads 1] [--cpu-time]

``--speed`` times a training step (forward, backward, SGD) with everything packed against
the float-saving path in the same process (``HDQT_PACK=0`` and ``pack_activations=False``),
the two taking turns in every round: what packing costs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import hdqt
from hdqt.models import create_model

BATCH = 128
TARGETS = {"fcnet": 0.3, "twoconv": 0.3, "resnet32": 0.5}


def fcnet() -> nn.Module:
    return nn.Sequential(
        nn.Linear(405, 405, bias=False), nn.ReLU(),
        nn.Linear(405, 405, bias=False), nn.ReLU(),
        nn.Linear(405, 19, bias=False),
    )


def twoconv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
    )


def resnet32() -> nn.Module:
    return nn.Sequential(create_model("resnet32", (3, 32, 32)), nn.Linear(64, 100))


MODELS = {"fcnet": fcnet, "twoconv": twoconv, "resnet32": resnet32}


def case(name: str, device: torch.device, batch: int = BATCH):
    """(model builder, input, loss function) of a named model; the same data every call."""
    gen = torch.Generator().manual_seed(0)
    if name == "fcnet":
        x, y = torch.randn(batch, 405, generator=gen), torch.randint(0, 19, (batch,), generator=gen)
        return fcnet, x.to(device), lambda out: F.cross_entropy(out, y.to(device))
    if name == "twoconv":
        return twoconv, torch.randn(batch, 16, 32, 32, generator=gen).to(device), lambda out: out.square().mean()
    if name == "resnet32":
        x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 100, (batch,), generator=gen)
        return resnet32, x.to(device), lambda out: F.cross_entropy(out, y.to(device))
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")


def build(model_name: str, recipe: str, device: torch.device, pack_activations: bool = True):
    """(model under ``recipe``, input, loss function); fp32 is the plain float model."""
    make, x, loss_fn = case(model_name, device)
    torch.manual_seed(0)
    model = make().to(device)
    if recipe != "fp32":
        model = hdqt.quantize_model(model, hdqt.recipe(recipe), pack_activations=pack_activations)
    return model, x, loss_fn


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return storage.data_ptr(), t.device, storage.nbytes()


def saved_bytes(forward) -> int:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        seen[key] = key[2]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def saved_by_node(loss: torch.Tensor) -> dict[str, int]:
    """Bytes saved per kind of autograd node in ``loss``'s graph (each storage counted once,
    for the first node found holding it): where the saved bytes come from."""
    by_node: dict[str, int] = defaultdict(int)
    seen, stack, visited = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(node, attr)
                except RuntimeError:  # already freed
                    continue
                values = value if isinstance(value, (tuple, list)) else (value,)
                tensors += [v for v in values if isinstance(v, torch.Tensor)]
        if hasattr(node, "saved_tensors"):  # custom autograd.Function
            tensors += list(node.saved_tensors)
        for t in tensors:
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                by_node[node.name()] += key[2]
        stack += [next_fn for next_fn, _ in node.next_functions]
    return dict(by_node)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_bytes(model: nn.Module, x: torch.Tensor, loss_fn) -> int:
    """How far memory rises during one training step (forward, backward, SGD), after two
    warm-up steps: allocator bytes on CUDA, resident set (VmHWM - VmRSS) on CPU."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
        opt.step()

    for _ in range(2):
        step()
    opt.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one (Linux >= 4.0)
    before = _status_kb("VmRSS")
    step()
    return 1024 * (_status_kb("VmHWM") - before)


def _child_peak(model_name: str, recipe: str, device: str, pack_activations: bool) -> int | None:
    """``peak_bytes`` of one case in a fresh process (the CPU measure: RSS is per process)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", model_name, recipe, "--device", device]
    if not pack_activations:
        cmd.append("--no-pack-activations")
    # glibc keeps freed blocks resident once its mmap threshold has grown; a fixed threshold
    # returns every tensor over 128 KiB to the system when freed, so RSS follows live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


def _train_step(model: nn.Module, x: torch.Tensor, loss_fn, env: dict[str, str]):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # read by the engine at every forward
        try:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x)).backward()
            opt.step()
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return step


def speed(model_name: str, recipe: str, device: torch.device, rounds: int, steps: int, clock) -> dict:
    """Step time with everything packed (the default) over the float-saving path
    (``HDQT_PACK=0``, ``pack_activations=False``), the two taking turns in every round;
    the ratio of each round, its median and quartiles."""
    variants = {}
    for name, packed in (("packed", True), ("float", False)):
        model, x, loss_fn = build(model_name, recipe, device, packed)
        variants[name] = _train_step(model, x, loss_fn, {} if packed else {"HDQT_PACK": "0"})
    for step in variants.values():
        for _ in range(3):
            step()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((clock() - t0) / steps)
    ratios = sorted(p / f for p, f in zip(times["packed"], times["float"]))
    median = statistics.median
    return {"packed_ms": 1e3 * median(times["packed"]), "float_ms": 1e3 * median(times["float"]),
            "ratio": median(ratios), "q1": ratios[len(ratios) // 4], "q3": ratios[(3 * len(ratios)) // 4]}


def measure(model_name: str, recipes: list[str], device: torch.device, pack_activations: bool = True,
            detail: bool = False) -> dict[str, dict]:
    """{recipe: {"model": bytes, "step": bytes, "by_node": {...} (detail)}} for one model,
    in this process: what the model's forward saves, and with the loss."""
    results = {}
    for recipe in recipes:
        model, x, loss_fn = build(model_name, recipe, device, pack_activations)
        entry = {"model": saved_bytes(lambda: model(x)), "step": saved_bytes(lambda: loss_fn(model(x)))}
        if detail:
            entry["by_node"] = saved_by_node(loss_fn(model(x)))
        results[recipe] = entry
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fp32,hdqt,int,luq")
    parser.add_argument("--models", default="fcnet,twoconv,resnet32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak memory of a step")
    parser.add_argument("--no-pack-activations", action="store_true",
                        help="keep nn.ReLU and nn.BatchNorm2d (quantize_model(pack_activations=False))")
    parser.add_argument("--detail", action="store_true", help="saved bytes per autograd node kind")
    parser.add_argument("--speed", action="store_true",
                        help="instead: step time packed / float-saving (HDQT_PACK=0, pack_activations=False)")
    parser.add_argument("--rounds", type=int, default=15, help="--speed: rounds, the two paths taking turns")
    parser.add_argument("--steps", type=int, default=5, help="--speed: steps per path and round")
    parser.add_argument("--cpu-time", action="store_true",
                        help="--speed: time by process CPU time (steadier than wall time on a shared machine)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "RECIPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pack_activations = not args.no_pack_activations
    if args.child:
        model, x, loss_fn = build(*args.child, device, pack_activations)
        print(json.dumps({"peak": peak_bytes(model, x, loss_fn)}))
        return 0
    recipes = ["fp32"] + [r for r in args.recipes.split(",") if r and r != "fp32"]
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.speed:
        clock = time.process_time if args.cpu_time else time.perf_counter
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, batch {BATCH}; "
              f"{args.rounds} rounds x {args.steps} steps, {'CPU' if args.cpu_time else 'wall'} time; packed: "
              f"the default, float: HDQT_PACK=0 and pack_activations=False (the path before issue 13)")
        print(f"{'model':<10}{'recipe':<10}{'packed ms':>11}{'float ms':>10}{'ratio':>8}{'IQR':>13}")
        for m in models:
            for r in recipes[1:]:
                res = speed(m, r, device, args.rounds, args.steps, clock)
                print(f"{m:<10}{r:<10}{res['packed_ms']:>11.2f}{res['float_ms']:>10.2f}{res['ratio']:>8.3f}"
                      f"{res['q1']:>7.3f}-{res['q3']:.3f}")
        return 0
    peak_how = ("allocator (max_memory_allocated)" if device.type == "cuda"
                else "RSS high-water mark, one process a case")
    print(f"torch {torch.__version__}, device {device}, batch {BATCH}, pack_activations={pack_activations}; "
          f"saved = distinct storages saved for the backward; peak: {peak_how}")
    print(f"{'model':<10}{'recipe':<10}{'model MB':>10}{'x fp32':>8}{'target':>8}{'step MB':>10}{'x fp32':>8}"
          f"{'peak MB':>10}{'x fp32':>8}")
    failed = False
    for m in models:
        results = measure(m, recipes, device, pack_activations, args.detail)
        peaks = {} if args.no_peak else {
            r: (peak_bytes(*build(m, r, device, pack_activations)) if device.type == "cuda"
                else _child_peak(m, r, args.device, pack_activations)) for r in recipes}
        base, base_step, base_peak = results["fp32"]["model"], results["fp32"]["step"], peaks.get("fp32")
        for r in recipes:
            saved, step = results[r]["model"], results[r]["step"]
            ratio = saved / base
            target = f"<={TARGETS[m]:g}" if r == "hdqt" else ""
            failed |= r == "hdqt" and ratio > TARGETS[m]
            peak = peaks.get(r)
            peak_text = f"{peak / 1e6:>10.2f}" if peak is not None else f"{'-':>10}"
            peak_ratio = f"{peak / base_peak:>8.2f}" if peak is not None and base_peak else f"{'-':>8}"
            print(f"{m:<10}{r:<10}{saved / 1e6:>10.3f}{ratio:>8.2f}{target:>8}{step / 1e6:>10.3f}"
                  f"{step / base_step:>8.2f}{peak_text}{peak_ratio}")
            if args.detail:
                for node, size in sorted(results[r]["by_node"].items(), key=lambda kv: -kv[1]):
                    print(f"{'':<38}{size / 1e6:>10.3f}  {node}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
