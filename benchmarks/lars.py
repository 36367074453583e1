"""LARS step time: multi-tensor (torch._foreach_*) vs a per-parameter loop with the same math.

Runs on the parameters of a real model (default ResNet-152: 467 tensors, 60.2 M parameters) split by
``rtrain.optim.param_groups`` exactly as training does, with random gradients. Both variants are timed in
the same run, interleaved, and the script prints ms/step for each and the speed-up ratio; torch's foreach SGD
step on the same parameters is printed for scale. A one-step equivalence check between the two runs first.

    python -m benchmarks.lars                       # CPU
    python -m benchmarks.lars --device cuda         # GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from rtrain.models import build
from rtrain.optim import LARS, param_groups


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet152", help="rtrain model registry name")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args()


def _with_random_grads(model: torch.nn.Module, device: str) -> torch.nn.Module:
    model = model.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-2
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _ms_per_step(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    _sync(device)
    return (time.perf_counter() - start) * 1e3 / steps


def _lars(model: torch.nn.Module, foreach: bool) -> LARS:
    return LARS(param_groups(model, 5e-5), lr=1.0, momentum=0.9, weight_decay=5e-5, foreach=foreach)


def _max_difference_after_one_step(model: torch.nn.Module) -> float:
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    _lars(a, foreach=True).step()
    _lars(b, foreach=False).step()
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def main() -> None:
    args = _parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _with_random_grads(build(args.model), args.device)
    params = list(model.parameters())
    print(f"model={args.model} tensors={len(params)} parameters={sum(p.numel() for p in params):,} "
          f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"one-step max |multi-tensor - loop| = {_max_difference_after_one_step(model):.3e}")

    variants = {
        "lars multi-tensor": _lars(model, foreach=True),
        "lars per-parameter loop": _lars(model, foreach=False),
        "sgd foreach (torch, for scale)": torch.optim.SGD(param_groups(model, 5e-5), lr=0.1, momentum=0.9,
                                                          foreach=True),
    }
    for opt in variants.values():  # warm-up: allocates momentum buffers, caches kernels
        _ms_per_step(opt, 1, args.device)
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, opt in variants.items():
            timings[name].append(_ms_per_step(opt, args.steps, args.device))

    medians = {name: statistics.median(values) for name, values in timings.items()}
    for name, median in medians.items():
        spread = ", ".join(f"{v:.2f}" for v in timings[name])
        print(f"{name:32s} {median:9.2f} ms/step  (rounds: {spread})")
    ratio = medians["lars per-parameter loop"] / medians["lars multi-tensor"]
    print(f"speed-up multi-tensor vs loop: {ratio:.2f}x")


if __name__ == "__main__":
    main()
