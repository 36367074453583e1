"""Checkpoint throughput and how long save() blocks training, against a plain write of the same bytes.

    python -m benchmarks.checkpoint [--model resnet152] [--device cpu|cuda] [--repeats 3] [--dir /tmp]

State saved (on --device): the model's state_dict plus SGD momentum buffers (about 2 x params fp32)
and this rank's RNG streams, i.e. what a training step hands CheckpointManager; one sync and one
async manager each save once untimed first, as a training run's managers have. Baseline, measured in the same run on
the same filesystem: open/write/fsync of one file holding the same number of bytes. Reported per
variant is the median over --repeats (alternating variants so drifting load hits all alike):
  plain write   MB/s of open/write/fsync
  sync save     MB/s of CheckpointManager.save (serialise + sha256 + fsync + manifest + rename)
  async save    time save() blocks the caller (host snapshot), and until wait() returns
  latest()      MB/s of verify (sha256 of every file) + torch.load(weights_only=True)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rtrain.checkpoint import CheckpointManager
from rtrain.engine.rng import capture_rng_state
from rtrain.models import build

CHUNK_BYTES = 64 << 20


def training_state(model_name: str, device: str) -> dict:
    model = build(model_name).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for param in model.parameters():  # one step with synthetic grads creates every momentum buffer
        param.grad = torch.full_like(param, 1e-3)
    optimizer.step()
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def checkpoint_bytes(step_dir: Path) -> int:
    return sum(path.stat().st_size for path in step_dir.rglob("*") if path.is_file())


def plain_write_s(path: Path, payload: memoryview) -> float:
    started = time.perf_counter()
    with open(path, "wb") as file:
        for offset in range(0, len(payload), CHUNK_BYTES):
            file.write(payload[offset: offset + CHUNK_BYTES])
        file.flush()
        os.fsync(file.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def timed_save(manager: CheckpointManager, step: int, shared: dict, per_rank: dict) -> tuple[float, float]:
    """(seconds save() blocked the caller, seconds until the checkpoint was complete)."""
    started = time.perf_counter()
    manager.save(step, shared, per_rank, meta={"benchmark": True})
    blocked = time.perf_counter() - started
    manager.wait()
    return blocked, time.perf_counter() - started


def latest_s(root: Path, step: int) -> float:
    started = time.perf_counter()
    loaded = CheckpointManager(root).latest()
    elapsed = time.perf_counter() - started
    assert loaded is not None and loaded.step == step
    return elapsed


def run(model_name: str, device: str, repeats: int, scratch: Path) -> tuple[dict[str, float], int]:
    """Prints the table; returns (median seconds per timing, checkpoint bytes)."""
    shared, per_rank = training_state(model_name, device), {"rng": capture_rng_state()}
    params = sum(t.numel() for t in shared["model"].values())
    # one manager per mode, as in training; a first save warms it (async keeps its host buffers)
    sync_manager = CheckpointManager(scratch / "sync", keep=1)
    async_manager = CheckpointManager(scratch / "async", keep=1, async_save=True)
    timed_save(sync_manager, 0, shared, per_rank)
    timed_save(async_manager, 0, shared, per_rank)
    total_bytes = checkpoint_bytes(scratch / "sync" / "step-000000000")
    payload = memoryview(torch.randint(0, 256, (total_bytes,), dtype=torch.uint8).numpy())
    print(f"model {model_name} on {device}: {params / 1e6:.1f}M elements in model tensors, checkpoint "
          f"{total_bytes / 1e6:.0f} MB, {repeats} repeats in {scratch}")

    timings: dict[str, list[float]] = {key: [] for key in
                                       ("plain", "sync", "sync_block", "async_block", "async_total", "latest")}
    for step in range(1, repeats + 1):
        timings["plain"].append(plain_write_s(scratch / "plain.bin", payload))
        blocked, total = timed_save(sync_manager, step, shared, per_rank)
        timings["sync_block"].append(blocked)
        timings["sync"].append(total)
        timings["latest"].append(latest_s(scratch / "sync", step))
        blocked, total = timed_save(async_manager, step, shared, per_rank)
        timings["async_block"].append(blocked)
        timings["async_total"].append(total)
        print(f"  repeat {step}: " + " ".join(f"{key}={values[-1]:.3f}s" for key, values in timings.items()))
    async_manager.close()

    median = {key: statistics.median(values) for key, values in timings.items()}
    megabytes = total_bytes / 1e6
    print(f"plain write      {megabytes / median['plain']:8.1f} MB/s  ({median['plain']:.3f} s)")
    print(f"sync save        {megabytes / median['sync']:8.1f} MB/s  ({median['sync']:.3f} s, blocks "
          f"{median['sync_block']:.3f} s)")
    print(f"async save       {megabytes / median['async_total']:8.1f} MB/s  ({median['async_total']:.3f} s, "
          f"blocks {median['async_block']:.3f} s)")
    print(f"latest() verify+load {megabytes / median['latest']:8.1f} MB/s  ({median['latest']:.3f} s)")
    print(f"ratio sync_save_vs_plain_write_MBps={median['plain'] / median['sync']:.3f} "
          f"async_vs_sync_blocking={median['async_block'] / median['sync_block']:.3f}")
    return median, total_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet152")
    parser.add_argument("--device", default="cpu", help="where the training state lives: cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="parent of the scratch dir (default: system temp dir)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="rtrain-ckpt-bench-", dir=args.dir))
    try:
        run(args.model, args.device, args.repeats, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
