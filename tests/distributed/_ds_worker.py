"""One rank of DeepSpeedBackend runs on gloo (CPU), driven like rtrain's train step. Run as a script.

    python tests/distributed/_ds_worker.py --rank R --world W --port P --out DIR [--resume DIR] [options]
        [--case NAME="OPTIONS" ...]

Trains --steps optimizer steps of a tiny conv(+BN)+linear model on data that is a pure function of
(global step, rank, micro-batch), so a resumed run sees exactly the batches the straight run saw. Writes
to --out: final weights (rank 0), shared state (rank 0), per-rank state and per-step outcomes. With
--inf-at S the step whose global index is S gets an infinite loss (inf/nan gradients on every rank).

Each --case is one more run in the same processes, one after the other, with OPTIONS added to the command
line's: it writes to --out/NAME and resumes from --resume/NAME/--resume-from. (Importing DeepSpeed costs
seconds a process: the tests start one pair of processes for many runs.)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rtrain.distributed.deepspeed_backend import DeepSpeedBackend
from rtrain.engine.precision import DTYPES

CLASSES = 5


def tiny_model(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    norm: nn.Module = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, CLASSES))


def batch_for(step: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(size, 3, 8, 8, generator=gen), torch.randint(0, CLASSES, (size,), generator=gen)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", type=Path)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--static-scale", type=float)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--no-bn", action="store_true")
    p.add_argument("--optimizer", choices=["sgd", "lars"], default="sgd")
    p.add_argument("--inf-at", type=int, default=-1)
    p.add_argument("--save-at", type=int, default=-1, help="also save the state after this many steps")
    p.add_argument("--case", action="append", default=[], metavar='NAME="OPTIONS"')
    p.add_argument("--resume-from", default="final", help="with --case: the state folder of a case to resume")
    return p.parse_args(argv)


def runs(argv: list[str]) -> list[argparse.Namespace]:
    """The runs this process makes: the command line's, or one per --case with its options added."""
    args = parse_args(argv)
    if not args.case:
        return [args]
    chosen = []
    for case in args.case:
        name, _, options = case.partition("=")
        run_args = parse_args([*argv, *shlex.split(options)])
        run_args.out = args.out / name
        run_args.resume = args.resume / name / args.resume_from if args.resume else None
        chosen.append(run_args)
    return chosen


def allow_cpu_fp16() -> None:
    """DeepSpeed gates fp16 on mkldnn's fast fp16 kernels (AVX512-FP16), which this CPU may lack; torch
    still computes fp16 on CPU with its portable kernels, so the real fp16 path can be exercised here."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        accelerator.is_fp16_supported = lambda: True


def build_backend(args: argparse.Namespace) -> DeepSpeedBackend:
    if args.precision == "fp16":
        allow_cpu_fp16()
    model = tiny_model(batch_norm=not args.no_bn)
    if args.optimizer == "lars":
        from rtrain.optim.lars import LARS
        optimizer: torch.optim.Optimizer = LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return DeepSpeedBackend(
        model, optimizer, device=torch.device("cpu"), precision_dtype=args.precision,
        fp16_dynamic=args.static_scale is None, init_scale=2.0**8, growth_interval=2,
        static_scale=args.static_scale or 1.0, zero_stage=args.zero, micro_batch_per_gpu=args.micro,
        accumulation_steps=args.accum)


def train_step(backend: DeepSpeedBackend, args: argparse.Namespace, step: int) -> dict:
    """What rtrain.engine.step.TrainStep does, with this script's data."""
    images, labels = batch_for(step, args.rank, args.micro * args.accum)
    amp = args.precision != "fp32"
    logits_dtype = None
    for i, (x, y) in enumerate(zip(images.chunk(args.accum), labels.chunk(args.accum))):
        with backend.micro_context(last=i == args.accum - 1):
            with torch.autocast("cpu", dtype=DTYPES[args.precision], enabled=amp):
                logits = backend.forward(x)
            logits_dtype = str(logits.dtype)
            loss = F.cross_entropy(logits.float(), y) / args.accum
            backend.backward(loss * float("inf") if step == args.inf_at else loss)
    scale = backend.loss_scale()
    outcome = backend.step()
    return {"step": step, "stepped": outcome.stepped, "found_inf": outcome.found_inf, "scale_before": scale,
            "scale_after": backend.loss_scale(), "logits_dtype": logits_dtype}


def save_state(backend: DeepSpeedBackend, rank: int, folder: Path) -> None:
    """What rtrain.checkpoint does with a backend's state: shared once, per-rank on every rank."""
    folder.mkdir(parents=True, exist_ok=True)
    state = backend.state_dict()
    torch.save(state["per_rank"], folder / f"rank{rank}.pt")
    if rank == 0:
        torch.save({"version": state["version"], "shared": state["shared"]}, folder / "shared.pt")


def run(args: argparse.Namespace) -> None:
    backend = build_backend(args)
    if args.resume is not None:
        shared = torch.load(args.resume / "shared.pt", weights_only=True)
        per_rank = torch.load(args.resume / f"rank{args.rank}.pt", weights_only=True)
        backend.load_state_dict({**shared, "per_rank": per_rank})
    first = backend.engine.global_steps
    outcomes, weights = [], []
    for step in range(first, first + args.steps):
        weights.append({k: v.clone() for k, v in backend.module.state_dict().items()})
        outcomes.append(train_step(backend, args, step))
        if step + 1 == args.save_at:
            save_state(backend, args.rank, args.out / f"at{args.save_at}")
    weights.append({k: v.clone() for k, v in backend.module.state_dict().items()})
    save_state(backend, args.rank, args.out / "final")
    if args.rank == 0:
        torch.save(weights, args.out / "weights.pt")
        (args.out / "outcomes.json").write_text(json.dumps(outcomes))
    backend.close()


def main(argv: list[str]) -> int:
    chosen = runs(argv)
    args = chosen[0]
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(args.rank),
                      WORLD_SIZE=str(args.world), LOCAL_RANK=str(args.rank))
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
    try:
        for run_args in chosen:
            run_args.out.mkdir(parents=True, exist_ok=True)
            try:
                run(run_args)
            except Exception as exc:  # the test reads this file: a clear message beats a gloo hang on the peer
                (run_args.out / f"error{run_args.rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
                raise
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
