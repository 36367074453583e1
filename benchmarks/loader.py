"""Train-pipeline throughput per CPU core: rtrain's shard loader against the JPEG decode limit and the classic
torchvision pipeline.

    python benchmarks/loader.py [--data DIR] [--workers 1,2] [--batch 64] [--rounds 2] [--max-side 256,320,384]

DIR holds shards (DIR/train/manifest.json) or JPEGs (DIR/train/<class>/*.JPEG or DIR/<class>/*.JPEG); by
default 1,000 real photos at ImageNet's sizes and JPEG statistics are made with data_prep.photos (`--synthetic`:
data_prep.synthetic's drawn images instead). Every pipeline reads the same images: shards are extracted to
files for the classic pipeline, a JPEG folder is sharded for rtrain.

decode limit: libjpeg-turbo's whole-image decode through simplejpeg (fast integer IDCT, fast upsampling), bytes
already in memory, one process, nothing else: what a loader doing one full decode per image could reach per
core at best. rtrain can exceed it: it decodes at a reduced scale where the crop allows and, with the
rtrain.data._jpeg_region extension, only the crop's region.

classic: ImageFolder-style (one file per sample), PIL full decode + convert("RGB"), torchvision-equivalent
RandomResizedCrop(224) (crop + bilinear resize on the PIL image) + horizontal flip + ToTensor + Normalize,
default collate (float32 batches). rtrain: build_loader(train=True) with the default rrc augmentation
(uint8 batches; normalization happens on the device in the train step).

Each measurement is one epoch through a fresh DataLoader with N worker processes, timed from the first batch
to the last (worker start-up excluded for both); images/s per core = images/s / N. The pipelines run in turn,
round after round, so that each round's figures share the machine's state; the table shows the best of
`--rounds` per pipeline. "rtrain whole" is rtrain with region decoding switched off (the extension's share).
`--max-side` also shards the images with data_prep's re-encoding to that longer side (as FFCV does) and
measures rtrain on those shards against the classic pipeline on the originals.

The ratios are taken within rounds, where the machine was the same, and their median over rounds is kept:
on a shared machine a pipeline's speed drifts by 10-20 % within minutes, so a best-of-rounds over a
best-of-rounds compares two different moments. `ratio_vs_classic: X.XX`: the geometric mean over worker
counts of the median of rtrain / classic; `ratio_vs_decode_limit: X.XX`: at the first worker count, the
median of rtrain's per-core throughput over the decode limit measured right before and right after that run
(their mean), with the range over rounds.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

# The repository first: this folder holds a data_prep.py benchmark that would shadow the data_prep package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtrain.config import DataConfig
from rtrain.data import build_loader, decode
from rtrain.data.format import (
    Manifest,
    ShardEntry,
    decode_cls,
    encode_cls,
    sha256_file,
    shard_name,
)
from rtrain.data.transforms import rrc_box

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SHARD_SAMPLES = 128


class ClassicFolder(Dataset):
    """torchvision.datasets.ImageFolder + RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize."""

    def __init__(self, items: list[tuple[Path, int]], size: int = 224):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")
        box = rrc_box(random, image.width, image.height, (0.08, 1.0), (3 / 4, 4 / 3))
        image = image.crop(box).resize((self.size, self.size), Image.Resampling.BILINEAR)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).view(self.size, self.size, 3)
        tensor = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        return tensor.sub(MEAN).div(STD), label


def folder_items(root: Path) -> list[tuple[Path, int]]:
    base = root / "train" if (root / "train").is_dir() else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    items = [(path, index) for index, name in enumerate(classes) for path in sorted((base / name).iterdir())
             if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not items:
        raise SystemExit(f"{root}: no shards (train/manifest.json) and no class folders of JPEGs")
    return items


def write_shards(items: list[tuple[Path, int]], out: Path) -> None:
    split = out / "train"
    split.mkdir(parents=True)
    order = random.Random(0).sample(items, len(items))
    entries = []
    for index in range(0, len(order), SHARD_SAMPLES):
        path = split / shard_name("train", index // SHARD_SAMPLES)
        chunk = order[index:index + SHARD_SAMPLES]
        with tarfile.open(path, "w") as tar:
            for number, (source, label) in enumerate(chunk):
                key = f"{index + number:08d}"
                for ext, payload in (("cls", encode_cls(label)), ("jpg", source.read_bytes())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        entries.append(ShardEntry(path.name, len(chunk), path.stat().st_size, sha256_file(path)))
    classes = {f"class{i:04d}": i for i in range(max(label for _, label in items) + 1)}
    (split / "manifest.json").write_text(Manifest("train", entries, classes).to_json())


def extract_shards(shard_root: Path, out: Path) -> list[tuple[Path, int]]:
    manifest = Manifest.load(shard_root / "train" / "manifest.json")
    items = []
    for entry in manifest.shards:
        with tarfile.open(shard_root / "train" / entry.name) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name, member in members.items():
                if not name.endswith(".jpg"):
                    continue
                label = decode_cls(tar.extractfile(members[name[:-4] + ".cls"]).read())
                path = out / f"{len(items):08d}.jpg"
                path.write_bytes(tar.extractfile(member).read())
                items.append((path, label))
    return items


def prepare(args: argparse.Namespace, scratch: Path) -> tuple[Path, list]:
    """(shard root, classic file items) over the same images."""
    data = args.data
    if data is not None and (data / "train" / "manifest.json").is_file():
        (scratch / "files").mkdir()
        return data, extract_shards(data, scratch / "files")
    if data is None and args.synthetic:
        from data_prep.synthetic import SyntheticSpec, write_synthetic

        data = scratch / "synthetic"
        write_synthetic(data, SyntheticSpec(classes=args.classes, per_class=args.per_class, val_per_class=0,
                                            quirks=False))
    elif data is None:
        from data_prep.photos import write_photos

        data = scratch / "photos"
        stats = write_photos(data, args.photos)
        print(f"real photos (data_prep.photos): {stats.files}, mean {stats.mean_width:.0f} x "
              f"{stats.mean_height:.0f} px, {100 * stats.short_side_under_224:.1f} % with a short side under 224")
    items = folder_items(data)
    write_shards(items, scratch / "shards")
    return scratch / "shards", items


def max_side_shards(items: list, side: int, scratch: Path) -> Path:
    """The images re-encoded by data_prep (--max-side) into shards; returns the shard root."""
    src = scratch / f"src-{side}" / "train"
    for path, label in items:
        target = src / f"class{label:04d}" / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(Path(path).resolve())
    out = scratch / f"max-side-{side}"
    subprocess.run([sys.executable, "-m", "data_prep.imagenet", "--src", str(src.parent), "--out", str(out),
                    "--max-side", str(side), "--workers", "2", "--no-progress"], check=True,
                   cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    return out


def decode_limit(payloads: list[bytes]) -> float:
    """Whole-image decodes per second, bytes in memory, this process only (see the module docstring)."""
    start = time.perf_counter()
    for data in payloads:
        simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True)
    return len(payloads) / (time.perf_counter() - start)


def timed_epoch(batches) -> tuple[int, float]:
    """Images after the first batch and the seconds they took."""
    iterator = iter(batches)
    next(iterator)
    start, count = time.perf_counter(), 0
    for images, _ in iterator:
        count += len(images)
    return count, time.perf_counter() - start


def run_classic(items: list, workers: int, batch: int) -> float:
    loader = DataLoader(ClassicFolder(items), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    count, seconds = timed_epoch(loader)
    return count / seconds


def run_rtrain(shard_root: Path, workers: int, batch: int, epoch: int, region: bool = True) -> float:
    """One epoch of rtrain's train loader; `region=False` switches region decoding off (the DataLoader's
    forked workers inherit the switch)."""
    extension = decode._jpeg_region
    decode._jpeg_region = extension if region else None
    try:
        cfg = DataConfig(source=str(shard_root), num_workers=workers, pin_memory=False)
        loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=batch, seed=0, train=True)
        loader.set_epoch(epoch)
        count, seconds = timed_epoch(loader)
    finally:
        decode._jpeg_region = extension
    return count / seconds


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="shards or a JPEG folder (default: real photos)")
    parser.add_argument("--photos", type=int, default=1000, help="default set: how many photos")
    parser.add_argument("--synthetic", action="store_true", help="default set: data_prep.synthetic's images")
    parser.add_argument("--workers", default="1,2", help="comma list of DataLoader worker counts")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-side", default="", help="comma list: also shards re-encoded to this longer side")
    parser.add_argument("--classes", type=int, default=8, help="synthetic set: classes")
    parser.add_argument("--per-class", type=int, default=96, help="synthetic set: images per class")
    args = parser.parse_args()
    torch.set_num_threads(1)
    worker_counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="rtrain-loader-bench-") as tmp:
        shard_root, items = prepare(args, Path(tmp))
        sides = {int(side): max_side_shards(items, int(side), Path(tmp)) for side in args.max_side.split(",") if side}
        sizes = [Path(p).stat().st_size for p, _ in items]
        print(f"images: {len(items)}, mean {np.mean(sizes) / 1e3:.0f} KB; batch {args.batch}; "
              f"{decode.region_decoding_state()}; "
              f"load {load_average()}")
        payloads = [Path(p).read_bytes() for p, _ in items]
        limits, limit_ratios, classic_ratios = [], [], []
        for workers in worker_counts:
            runs: dict[str, list[float]] = {"classic": [], "rtrain": [], "rtrain whole": []}
            runs.update({f"rtrain max-side {side}": [] for side in sides})
            first = workers == worker_counts[0]
            for round_index in range(args.rounds):
                if first:  # decode-limit passes right before and right after each rtrain run
                    limits.append(decode_limit(payloads))
                runs["rtrain"].append(run_rtrain(shard_root, workers, args.batch, round_index))
                if first:
                    limits.append(decode_limit(payloads))
                runs["classic"].append(run_classic(items, workers, args.batch))
                if decode.REGION_DECODE:
                    runs["rtrain whole"].append(run_rtrain(shard_root, workers, args.batch, round_index, region=False))
                for side, root in sides.items():
                    runs[f"rtrain max-side {side}"].append(run_rtrain(root, workers, args.batch, round_index))
            classic_ratios.append(statistics.median(r / c for r, c in zip(runs["rtrain"], runs["classic"])))
            if first:
                limit_ratios = [rate / workers / ((limits[2 * i] + limits[2 * i + 1]) / 2)
                                for i, rate in enumerate(runs["rtrain"])]
            best = {name: max(values) for name, values in runs.items() if values}
            print(f"workers={workers}: " + "   ".join(
                f"{name} {value / workers:7.1f} img/s/core ({value / best['classic']:.2f}x classic)"
                for name, value in best.items()))
        print(f"decode limit:   {max(limits):7.1f} img/s/core (whole-image libjpeg-turbo decode, bytes in memory, "
              f"best of {len(limits)} passes; median {statistics.median(limits):.1f})")
        print(f"load after: {load_average()}")
        print(f"rtrain / decode limit per round (workers={worker_counts[0]}): "
              + " ".join(f"{ratio:.2f}" for ratio in limit_ratios) + f"; median {statistics.median(limit_ratios):.2f}")
        print(f"ratio_vs_classic: {geometric_mean(classic_ratios):.2f}")
        print(f"ratio_vs_decode_limit: {statistics.median(limit_ratios):.2f}")


if __name__ == "__main__":
    main()
