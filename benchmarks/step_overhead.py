"""Step overhead: rtrain's train step vs a bare PyTorch loop on the same model, batch and in-memory data.

The bare loop gets pre-normalized float batches (the work rtrain does on the device from uint8 is counted
against rtrain); rtrain runs its full step: uint8 -> device normalize, autocast context, backend step with
the non-finite check, the schedule setting the lr. Rounds alternate between the two to share the machine's
noise; the ratio is the median of per-round ratios.

    python benchmarks/step_overhead.py [--model resnet18] [--size 64] [--batch 32] [--rounds 7] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rtrain.config import PrecisionConfig
from rtrain.distributed.backend import DDPBackend
from rtrain.distributed.scaler import build_scaler
from rtrain.engine.step import Normalizer, TrainStep
from rtrain.models import build
from rtrain.optim.schedule import LRSchedule

CPU = torch.device("cpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_model(name: str, classes: int):
    torch.manual_seed(0)
    return build(name, num_classes=classes)


def bare_runner(name, classes, x_float, y):
    model = make_model(name, classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step():
        loss = F.cross_entropy(model(x_float), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def rtrain_runner(name, classes, x_uint8, y):
    model = make_model(name, classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    precision = PrecisionConfig()
    backend = DDPBackend(model, opt, build_scaler(precision, CPU), device=CPU)
    train_step = TrainStep(backend, Normalizer(MEAN, STD, CPU), precision)
    schedule = LRSchedule("cosine", 0.01, total_steps=10_000, warmup_steps=100)
    counter = iter(range(10**9))

    def step():
        schedule.apply(opt, next(counter))
        train_step(x_uint8, y)
    return step


def timed(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    classes = 1000 if not args.model.startswith("cifar") else 10
    g = torch.Generator().manual_seed(0)
    x_uint8 = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (args.batch,), generator=g)
    x_float = Normalizer(MEAN, STD, CPU)(x_uint8)
    bare = bare_runner(args.model, classes, x_float, y)
    ours = rtrain_runner(args.model, classes, x_uint8, y)
    timed(bare, 2), timed(ours, 2)  # warm-up: allocator, thread pools
    ratios, bare_s, ours_s = [], [], []
    for r in range(args.rounds):
        pair = (bare, ours) if r % 2 == 0 else (ours, bare)
        t = {id(fn): timed(fn, args.steps) for fn in pair}
        bare_s.append(t[id(bare)])
        ours_s.append(t[id(ours)])
        ratios.append(t[id(ours)] / t[id(bare)])
    print(f"model {args.model} {args.size}px batch {args.batch} threads {args.threads} "
          f"rounds {args.rounds} x {args.steps} steps")
    print(f"bare pytorch step: median {statistics.median(bare_s) * 1e3:.1f} ms")
    print(f"rtrain step:       median {statistics.median(ours_s) * 1e3:.1f} ms")
    ratio = statistics.median(ratios)
    print(f"overhead: {100 * (ratio - 1):+.2f} %")
    print(f"ratio_vs_bare: {ratio:.4f}")


if __name__ == "__main__":
    main()
