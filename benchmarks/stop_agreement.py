"""Cost of the per-step stop agreement (preemption): 2 ranks on gloo train a DDP model; each step either
does nothing more (baseline) or also checks the stop-request file and agrees with the peer on whether to
stop (rtrain.launch.signals.RankStopWatch: a stat and a 1-element gloo all_reduce). Rounds alternate
between the two; the ratio is the median of per-round ratios (rank 0 reports). The check alone is also
timed over 1000 calls, which a 2-core machine's step-time noise would otherwise hide.

    python benchmarks/stop_agreement.py [--model cifar_resnet20] [--size 32] [--batch 64] [--rounds 7] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from rtrain.distributed.agree import StepAgreement
from rtrain.launch.signals import RankStopWatch
from rtrain.models import build


def _rank(rank: int, args: argparse.Namespace, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(build(args.model, num_classes=10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    watch = RankStopWatch(run_dir, StepAgreement())

    def steps(check: bool) -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if check and watch.requested():
                raise RuntimeError("unexpected stop")
        dist.barrier()
        return (time.perf_counter() - start) / args.steps

    steps(True)  # warm-up
    ratios, base_times, checked_times = [], [], []
    for _ in range(args.rounds):
        base, checked = steps(False), steps(True)
        base_times.append(base)
        checked_times.append(checked)
        ratios.append(checked / base)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(1000):
        watch.requested()
    alone = (time.perf_counter() - start) / 1000
    if rank == 0:
        print(f"the stop check alone: {alone * 1e6:.0f} us per step (1000 calls; "
              f"{alone / statistics.median(base_times) * 100:.3f} % of a step)")
        print(f"{args.model} batch {args.batch}x{args.size}px, 2 ranks gloo, {args.rounds} rounds x {args.steps} steps")
        print(f"step without stop check: {statistics.median(base_times) * 1e3:.2f} ms (median)")
        print(f"step with stop check:    {statistics.median(checked_times) * 1e3:.2f} ms (median)")
        print(f"ratio with/without: {statistics.median(ratios):.4f} (median of per-round ratios; "
              f"min {min(ratios):.4f}, max {max(ratios):.4f})")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from rtrain.launch.workers import free_port

    with tempfile.TemporaryDirectory() as run_dir:
        mp.spawn(_rank, args=(args, free_port(), run_dir), nprocs=2)


if __name__ == "__main__":
    main()
