"""Cost of the per-rank timing behind the straggler report (tracking.rank_timing): 2 ranks on gloo train
cifar_resnet20 through the real loop (rtrain.engine.loop.fit) with rtrain's SyncBN and DDP. Without it, each
log window averages the loss in one all_reduce; with it, a CollectiveClock times SyncBN's all_reduces and DDP's
waits (hooks on every step) and each window gathers every rank's (loss, data wait, step, collective wait) in
one all_gather instead. Rounds alternate between two identical models, one with the clock; the ratio is the
median of per-round ratios (rank 0 reports). The window collective alone is also timed over 1000 calls.

    python benchmarks/rank_timing.py [--model cifar_resnet20] [--size 32] [--batch 64] [--rounds 7] [--steps 20]
        [--log-every 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rtrain.config import PrecisionConfig, Recipe
from rtrain.distributed.backend import DDPBackend
from rtrain.distributed.scaler import build_scaler
from rtrain.distributed.syncbn import convert_sync_batchnorm
from rtrain.distributed.waits import CollectiveClock
from rtrain.engine.loop import FitParts, _global_mean, fit, gather_rows
from rtrain.engine.state import TrainState
from rtrain.engine.step import Normalizer, TrainStep
from rtrain.models import build
from rtrain.optim.schedule import LRSchedule

CPU = torch.device("cpu")


class FixedBatches:
    """`steps` copies of one uint8 batch, with the loader interface fit() uses."""

    def __init__(self, steps: int, batch: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, 10, (batch,), generator=g)
        self.steps, self.stats = steps, {"skipped_samples": 0}

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.images, self.labels

    def state_dict(self) -> dict:
        return {"epoch": 0}


def _trainer(args: argparse.Namespace, clock: CollectiveClock | None) -> TrainStep:
    torch.manual_seed(0)
    model = convert_sync_batchnorm(build(args.model, num_classes=10), clock=clock)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    backend = DDPBackend(model, opt, build_scaler(PrecisionConfig(), CPU), device=CPU, clock=clock)
    return TrainStep(backend, Normalizer((0.5,) * 3, (0.25,) * 3, CPU), PrecisionConfig())


def _rank(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    recipe = Recipe().with_overrides([f"train.global_batch={2 * args.batch}",
                                      f"train.log_every_steps={args.log_every}"])
    clock = CollectiveClock()
    plain, timed = _trainer(args, None), _trainer(args, clock)

    def seconds_per_step(step: TrainStep, timing: bool) -> float:
        parts = FitParts(train=recipe.train, precision=recipe.precision, evaluation=recipe.eval,
                         checkpoint=recipe.checkpoint, backend=step.backend, train_step=step,
                         train_loader=FixedBatches(args.steps, args.batch, args.size),
                         evaluate=lambda m: {"top1": 0.0, "top5": 0.0, "loss": 0.0, "samples": 0},
                         schedule=LRSchedule("constant", 0.01, args.steps), total_steps=args.steps,
                         steps_per_epoch=args.steps, rank=rank, state=TrainState(),
                         collective_s=(lambda: clock.seconds) if timing else None,
                         rank_times=(lambda s, table: {}) if timing and rank == 0 else None)
        dist.barrier()
        start = time.perf_counter()
        fit(parts)
        dist.barrier()
        return (time.perf_counter() - start) / args.steps

    seconds_per_step(plain, False), seconds_per_step(timed, True)  # warm-up
    ratios, base_times, timed_times = [], [], []
    for _ in range(args.rounds):
        base, with_timing = seconds_per_step(plain, False), seconds_per_step(timed, True)
        base_times.append(base)
        timed_times.append(with_timing)
        ratios.append(with_timing / base)
    loss = torch.tensor(1.0)
    alone = {}
    for name, call in (("loss all_reduce", lambda: _global_mean(loss)),
                       ("4-number all_gather", lambda: gather_rows(torch.zeros(4, dtype=torch.float64)))):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(1000):
            call()
        alone[name] = (time.perf_counter() - start) / 1000
    if rank == 0:
        for name, seconds in alone.items():
            print(f"{name} alone: {seconds * 1e6:.0f} us per window (1000 calls)")
        print(f"{args.model} batch {args.batch}x{args.size}px per rank, 2 ranks gloo, {args.rounds} rounds x "
              f"{args.steps} steps, a log window every {args.log_every}; the clock measured "
              f"{clock.seconds:.1f} s of collective wait on rank 0 over all timed rounds")
        print(f"step without rank timing: {statistics.median(base_times) * 1e3:.2f} ms (median)")
        print(f"step with rank timing:    {statistics.median(timed_times) * 1e3:.2f} ms (median)")
        print(f"ratio with/without: {statistics.median(ratios):.4f} (median of per-round ratios; "
              f"min {min(ratios):.4f}, max {max(ratios):.4f})")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # DDP + gloo's C++ teardown aborts now and then at exit (tests/distributed/test_syncbn.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    from rtrain.launch.workers import free_port

    mp.spawn(_rank, args=(args, free_port()), nprocs=2)


if __name__ == "__main__":
    main()
