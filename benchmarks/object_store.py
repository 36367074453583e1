"""Checkpoints and shards in an object store: what they cost training, against a real S3 server (moto's
standalone server, started here on 127.0.0.1 and stopped by PID).

    python -m benchmarks.object_store [--rounds 3] [--epochs 3] [--steps-per-epoch 11] [--batch 128] [--model M]

Training is the quickstart's model (cifar_resnet20, SGD, 32 px, the quickstart's global batch on one process,
synthetic batches so that only the checkpoint differs) for --epochs epochs of --steps-per-epoch steps (11: the
quickstart's epoch), with one checkpoint per epoch into the bucket. Per round, alternating (so that drifting
load hits every variant alike), and the median over --rounds is reported:
  none       no checkpoint: the baseline
  background checkpoint.async_save: the snapshot blocks, the upload runs in a thread
  sync       the upload blocks the step loop
ratios: step time background / none (the issue's bar: <= 1.05), sync / none, and how long save() blocked
training: background / sync.
Shard cache: the digits shards (data_prep, uploaded to the bucket) read for two epochs through
data.cache_dir; shard GETs counted in the server's own log: the hit ratio of epoch 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from rtrain._ports import LOOPBACK, unused_port
from rtrain.checkpoint import open_checkpoints
from rtrain.config import loads_recipe
from rtrain.models import model_from_config

BUCKET = "rtrain-bench"


class Moto:
    def __init__(self, scratch: Path) -> None:
        self.port = unused_port(LOOPBACK)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = scratch / "moto.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        os.environ.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit(f"moto did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)

    def shard_gets(self, prefix: str) -> list[str]:
        text = self.log.read_text(errors="replace")
        return re.findall(rf'"(?:\x1b\[[0-9;]*m)*GET /{BUCKET}/({re.escape(prefix)}[^ ?"]*\.tar)', text)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def train_epochs(mode: str, epochs: int, steps: int, batch: int, scratch: Path, tag: str,
                 model_name: str) -> tuple[float, float]:
    """(seconds of the step loop including saves, median seconds a save blocked it)."""
    torch.manual_seed(0)
    recipe = loads_recipe((Path(__file__).resolve().parents[1] / "recipes/quickstart.yaml").read_text())
    model = model_from_config(recipe.model.model_copy(update={"name": model_name}), 10, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    manager = None
    if mode != "none":
        manager = open_checkpoints(f"s3://{BUCKET}/{tag}", keep=2, staging=scratch / f"stage-{tag}",
                                   save_tag=tag, async_save=mode == "background")
    blocked = []
    started = time.perf_counter()
    for epoch in range(epochs):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        if manager is not None:
            manager.save((epoch + 1) * steps, {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                         {"rng": {"cpu": torch.get_rng_state()}}, {"epoch": epoch})
            blocked.append(manager.last_save_blocking_s)
    if manager is not None:
        manager.close()  # the last upload, as a run's end waits for it
    return time.perf_counter() - started, statistics.median(blocked) if blocked else 0.0


def checkpoint_mb(scratch: Path) -> float:
    """Size of one checkpoint in the bucket (the last sync round's newest)."""
    checkpoints = open_checkpoints(f"s3://{BUCKET}/warm", staging=scratch / "stage-size")
    newest = checkpoints.list()[0]
    return sum(checkpoints._listing(newest.name).values()) / 1e6


def cache_hit_ratio(moto: Moto, scratch: Path) -> tuple[int, int, int]:
    """(shards, GETs in epoch 1, GETs in epoch 2) of the digits shards read through data.cache_dir."""
    from data_prep.storage import upload_output
    from rtrain.config.sections import DataConfig
    from rtrain.data import build_loader

    run = [sys.executable, "-m"]
    subprocess.run([*run, "data_prep.samples", "digits", "--out", str(scratch / "folders")], check=True,
                   capture_output=True)
    subprocess.run([*run, "data_prep.imagenet", "--src", str(scratch / "folders"), "--out", str(scratch / "shards"),
                    "--shard-size", "200", "--workers", "2", "--no-progress"], check=True, capture_output=True)
    upload_output(scratch / "shards", f"s3://{BUCKET}/digits")
    cfg = DataConfig(source=f"s3://{BUCKET}/digits", num_workers=2, image_size=32, eval_resize=36,
                     pin_memory=False, cache_dir=str(scratch / "cache"))
    counts = []
    for epoch in range(2):
        before = len(moto.shard_gets("digits/train/"))
        loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=128, seed=0, train=True)
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        counts.append(len(moto.shard_gets("digits/train/")) - before)
    shards = len(list((scratch / "shards" / "train").glob("*.tar")))
    return shards, counts[0], counts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=11)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", default="cifar_resnet20", help="the quickstart's; e.g. resnet50 for a "
                        "checkpoint of ~200 MB (model + momentum)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="rtrain-objstore-bench-"))
    moto = Moto(scratch)
    try:
        seconds: dict[str, list[float]] = {"none": [], "background": [], "sync": []}
        blocking: dict[str, list[float]] = {"background": [], "sync": []}
        train_epochs("background", 1, 2, args.batch, scratch, "warm", args.model)  # imports, first connection
        for round_ in range(args.rounds):
            for mode in seconds:
                took, blocked = train_epochs(mode, args.epochs, args.steps_per_epoch, args.batch, scratch,
                                             f"{mode}-{round_}", args.model)
                seconds[mode].append(took)
                if mode in blocking:
                    blocking[mode].append(blocked)
            print(f"round {round_ + 1}: " + ", ".join(f"{m} {v[-1]:.2f} s" for m, v in seconds.items())
                  + ", save() blocked " + ", ".join(f"{m} {v[-1]:.3f} s" for m, v in blocking.items()), flush=True)
        median = {mode: statistics.median(values) for mode, values in seconds.items()}
        block = {mode: statistics.median(values) for mode, values in blocking.items()}
        steps = args.epochs * args.steps_per_epoch
        for mode, value in median.items():
            blocks = f", save() blocks {block[mode]:.3f} s" if mode in block else ""
            print(f"{mode:<11} {value / steps * 1000:7.1f} ms/step ({value:.2f} s for {steps} steps, one checkpoint "
                  f"per {args.steps_per_epoch} steps){blocks}")
        print(f"model {args.model}, checkpoint {checkpoint_mb(scratch):.1f} MB")
        shards, first, second = cache_hit_ratio(moto, scratch)
        print(f"shard cache: {shards} shards, epoch 1 fetched {first} shard GET(s), epoch 2 {second}")
        print(f"ratio step_time_background_vs_none={median['background'] / median['none']:.3f} "
              f"step_time_sync_vs_none={median['sync'] / median['none']:.3f} "
              f"save_blocking_background_vs_sync={block['background'] / block['sync']:.3f} "
              f"cache_hit_ratio_epoch2={1 - second / shards:.3f}")
    finally:
        moto.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
