"""CUDA paths that CI (CPU only) cannot run: run this on a GPU machine and record what it prints.

    python benchmarks/gpu_smoke.py [--steps 20] [--data SHARDS]

Checks, each printed as `ok` / `FAIL`:
- train step on CUDA: bf16 autocast + channels_last, fp16 with dynamic loss scaling, fused SGD, LARS;
- rtrain SyncBatchNorm over NCCL (1 rank) and torch.nn.SyncBatchNorm via convert_sync_batchnorm(impl="torch");
- torchvision interchange: our exported resnet50 state dict loaded into torchvision's resnet50 gives the
  same outputs (only when torchvision is installed);
and a step-overhead ratio: rtrain's step vs a bare PyTorch loop (bf16, channels_last, resnet50); a LARS step
against an SGD step (same model, bf16); with `--data SHARDS` (rtrain shards with a train split) and
nvidia-dali installed (`pip install nvidia-dali-cuda120` or -cuda130 to match the driver): `data.backend:
dali` against the CPU loader over one epoch (each sample once, same labels, pixel statistics within 2 %),
exact resume from its state dict, and img/s of both. Written for a lent GPU machine; not yet run (no GPU was
lent since these checks were added).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rtrain.config import PrecisionConfig
from rtrain.distributed.backend import DDPBackend
from rtrain.distributed.syncbn import convert_sync_batchnorm
from rtrain.distributed.scaler import build_scaler
from rtrain.engine.step import Normalizer, TrainStep
from rtrain.models import build
from rtrain.optim import build_optimizer

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEV = torch.device("cuda", 0)


def _batch(n=64, size=224, classes=1000):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).pin_memory()
    return x, torch.randint(0, classes, (n,), generator=g)


def _train(precision: PrecisionConfig, optim: str, fused: bool | None, steps: int, channels_last: bool):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    model = build("resnet50").to(DEV, memory_format=fmt)
    opt = build_optimizer(model, optim, lr=0.05 if optim == "sgd" else 1.0, weight_decay=1e-4, fused=fused)
    backend = DDPBackend(model, opt, build_scaler(precision, DEV), device=DEV)
    step = TrainStep(backend, Normalizer(MEAN, STD, DEV, channels_last), precision)
    x, y = _batch()
    losses = [float(step(x, y).loss) for _ in range(steps)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], f"loss did not fall on a fixed batch: {losses[0]:.3f} -> {losses[-1]:.3f}"
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, scale {backend.loss_scale():g}"


def _step_seconds(optim: str, steps: int) -> float:
    torch.manual_seed(0)
    model = build("resnet50").to(DEV, memory_format=torch.channels_last)
    opt = build_optimizer(model, optim, lr=0.05 if optim == "sgd" else 1.0, weight_decay=1e-4, fused=None)
    backend = DDPBackend(model, opt, build_scaler(PrecisionConfig(dtype="bf16"), DEV), device=DEV)
    step = TrainStep(backend, Normalizer(MEAN, STD, DEV, True), PrecisionConfig(dtype="bf16"))
    x, y = _batch()
    for _ in range(3):
        step(x, y)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _lars_vs_sgd(steps: int) -> str:
    sgd, lars = _step_seconds("sgd", steps), _step_seconds("lars", steps)
    return f"SGD {1e3 * sgd:.1f} ms, LARS {1e3 * lars:.1f} ms per step: ratio_lars_vs_sgd {lars / sgd:.3f}"


def _epoch(loader, limit: int | None = None):
    labels, total, squares, count, start = [], 0.0, 0.0, 0, time.perf_counter()
    for index, (images, target) in enumerate(loader):
        if limit is not None and index >= limit:
            break
        pixels = images.float()
        total, squares, count = total + float(pixels.sum()), squares + float((pixels ** 2).sum()), count + pixels.numel()
        labels += target.cpu().tolist()
    seconds = time.perf_counter() - start
    mean = total / count
    return sorted(labels), mean, (squares / count - mean ** 2) ** 0.5, len(labels) / seconds


def _dali(data: str) -> str:
    from rtrain.config import DataConfig
    from rtrain.data import build_loader

    def make(backend: str):
        cfg = DataConfig(source=data, backend=backend, num_workers=4)
        loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=64, seed=0, train=True)
        loader.set_epoch(0)
        return loader

    cpu_labels, cpu_mean, cpu_std, cpu_rate = _epoch(make("webdataset"))
    dali_labels, dali_mean, dali_std, dali_rate = _epoch(make("dali"))
    from collections import Counter

    missing = Counter(dali_labels) - Counter(cpu_labels)  # DALI may drop a partial last batch, nothing else
    assert not missing and len(dali_labels) > len(cpu_labels) - 64, \
        f"DALI's epoch holds other samples: {len(dali_labels)} vs {len(cpu_labels)}, extra labels {dict(missing)}"
    assert abs(dali_mean - cpu_mean) < 0.02 * cpu_mean and abs(dali_std - cpu_std) < 0.02 * cpu_std, \
        f"pixel statistics differ: mean {dali_mean:.2f} vs {cpu_mean:.2f}, std {dali_std:.2f} vs {cpu_std:.2f}"
    first = make("dali")
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    state = first.state_dict()
    expected = next(iterator)
    resumed = make("dali")
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert torch.equal(got[1].cpu(), expected[1].cpu()) and torch.equal(got[0], expected[0]), "resume differs"
    return f"same samples and labels, exact resume; CPU {cpu_rate:.0f} img/s, DALI {dali_rate:.0f} img/s"


def _syncbn(impl: str):
    torch.manual_seed(0)
    model = build("resnet18")
    model = convert_sync_batchnorm(model, impl=impl).to(DEV)
    x = torch.randn(8, 3, 64, 64, device=DEV)
    ref = build("resnet18").to(DEV)
    ref.load_state_dict(model.state_dict())
    out, expected = model(x), ref(x)
    out.sum().backward()
    assert torch.allclose(out, expected, atol=1e-3, rtol=1e-3), (out - expected).abs().max()
    return f"max |diff| vs BatchNorm2d {float((out - expected).abs().max()):.2e}"


def _torchvision():
    import torchvision

    from rtrain.models.weights import export_torchvision, import_torchvision

    ours = build("resnet50").eval()
    theirs = torchvision.models.resnet50().eval()
    theirs.load_state_dict(export_torchvision(ours))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = float((ours(x) - theirs(x)).abs().max())
    back = build("resnet50").eval()
    import_torchvision(back, theirs.state_dict())
    assert diff < 1e-4 and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                                   ours.state_dict().values()))
    return f"torchvision {torchvision.__version__}: outputs max |diff| {diff:.2e}, round trip exact"


def _overhead(steps: int):
    precision = PrecisionConfig(dtype="bf16")
    x, y = _batch(n=128)
    torch.manual_seed(0)
    bare = build("resnet50").to(DEV, memory_format=torch.channels_last)
    bare_opt = torch.optim.SGD(bare.parameters(), lr=0.01, momentum=0.9, fused=True)
    xf = Normalizer(MEAN, STD, DEV, True)(x)

    def bare_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(bare(xf).float(), y.to(DEV, non_blocking=True))
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    model = build("resnet50").to(DEV, memory_format=torch.channels_last)
    opt = build_optimizer(model, "sgd", lr=0.01, fused=True)
    ours = TrainStep(DDPBackend(model, opt, build_scaler(precision, DEV), device=DEV),
                     Normalizer(MEAN, STD, DEV, True), precision)

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps

    for _ in range(3):
        bare_step(), ours(x, y)
    ratios = []
    for r in range(6):
        a = timed(bare_step) if r % 2 == 0 else None
        b = timed(lambda: ours(x, y))
        a = a if a is not None else timed(bare_step)
        ratios.append(b / a)
    return f"resnet50 bf16 channels_last batch 128: ratio_vs_bare {statistics.median(ratios):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data", help="rtrain shards (train split) for the DALI check")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(DEV)
    print(torch.__version__, torch.cuda.get_device_name(0))
    checks = {
        "step bf16 channels_last fused SGD": lambda: _train(PrecisionConfig(dtype="bf16"), "sgd", True,
                                                            args.steps, True),
        "step fp16 dynamic scaling SGD": lambda: _train(PrecisionConfig(dtype="fp16", scaler="dynamic"),
                                                        "sgd", None, args.steps, False),
        "step bf16 LARS": lambda: _train(PrecisionConfig(dtype="bf16"), "lars", None, args.steps, True),
        "syncbn rtrain over NCCL": lambda: _syncbn("rtrain"),
        "syncbn torch.nn.SyncBatchNorm": lambda: _syncbn("torch"),
        "torchvision interchange": _torchvision,
        "step overhead": lambda: _overhead(args.steps),
        "LARS vs SGD step": lambda: _lars_vs_sgd(args.steps),
    }
    if args.data:
        checks["dali vs CPU loader"] = lambda: _dali(args.data)
    for name, check in checks.items():
        try:
            print(f"ok    {name}: {check()}", flush=True)
        except Exception:
            print(f"FAIL  {name}:\n{traceback.format_exc()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
