"""Benchmark data_prep: files/s per core against a full PIL decode, and 1 vs 2 Ray workers.

    python benchmarks/data_prep.py [--files 800] [--repeats 3] [--src DIR]

Both are measured in this run on the same synthetic ImageNet-like JPEGs (data_prep.synthetic: 500x375-ish,
~90 KB). Baseline: one process reads each file and fully decodes it with PIL (``convert("RGB")``).
data_prep: one process runs the real shard jobs (read, verify, write deterministic tars with sha256, fsync,
receipts) in pass-through mode, once per JPEG check: ``decode`` (1/8-scale decode) and ``structure``
(libjpeg header parse + scan walk to the end-of-image marker); both catch truncated files (checked first).
Scaling: the same job on a local Ray with 1 and then 2 CPUs (Ray start-up excluded).
Targets: per-core ratio >= 2.0, scaling >= 1.7. Prints medians over ``repeats``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.build import BuildOptions, plan_jobs  # noqa: E402
from data_prep.imagenet import discover_classes, index_class_folders  # noqa: E402
from data_prep.parallel import run_shard_jobs, run_shard_jobs_in_process  # noqa: E402
from data_prep.plan import ShardSize  # noqa: E402
from data_prep.quirks import ImageOptions, jpeg_decode_error, jpeg_structure_error  # noqa: E402
from data_prep.synthetic import SyntheticSpec, write_synthetic  # noqa: E402

SHARD_SAMPLES = 100


def full_pil_decode_rate(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.convert("RGB")
    return len(paths) / (time.perf_counter() - start)


def prep_rate(src: Path, work: Path, runner, check: str = "decode") -> float:
    """Files/s of the shard jobs for train/ (fresh output, so nothing is reused)."""
    classes = discover_classes(src)
    source = index_class_folders("train", src, classes)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    (out / "train").mkdir(parents=True)
    jobs = plan_jobs(source, src, out / "train", BuildOptions(
        shard_size=ShardSize(SHARD_SAMPLES), image_options=ImageOptions(check=check), progress=False))
    start = time.perf_counter()
    results = runner(jobs, False, "bench")
    elapsed = time.perf_counter() - start
    assert not any(reused for _, reused in results.values())
    return len(source.files) / elapsed


def ray_rate(src: Path, work: Path, cpus: int, repeats: int) -> float:
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        prep_rate(src, work, run_shard_jobs)  # warm the worker processes
        return statistics.median(prep_rate(src, work, run_shard_jobs) for _ in range(repeats))
    finally:
        ray.shutdown()


def make_source(files: int, work: Path) -> Path:
    src = work / "src"
    per_class = max(1, files // 4)
    write_synthetic(src, SyntheticSpec(classes=4, per_class=per_class, val_per_class=0, quirks=True))
    return src


def check_truncation_is_caught(paths: list[Path]) -> None:
    raw = paths[0].read_bytes()
    if jpeg_decode_error(raw[: len(raw) // 2]) is None or jpeg_structure_error(raw[: len(raw) // 2]) is None:
        raise SystemExit("the fast verification missed a truncated JPEG: the comparison would be unfair")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--src", type=Path, default=None, help="reuse a synthetic source folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-prep-") as tmp:
        work = Path(tmp)
        src = args.src or make_source(args.files, work)
        paths = sorted(p for p in (src / "train").rglob("*") if p.is_file())
        jpegs = [p for p in paths if p.stat().st_size and "_" in p.stem
                 and p.stem.split("_")[-1].isdigit()]
        check_truncation_is_caught(jpegs)
        for path in paths:
            path.read_bytes()  # page cache warm for both sides
        mean_kb = sum(p.stat().st_size for p in jpegs) / len(jpegs) / 1000
        print(f"source: {len(paths)} train files ({len(jpegs)} plain JPEGs, mean {mean_kb:.0f} KB)")
        baseline = statistics.median(full_pil_decode_rate(jpegs) for _ in range(args.repeats))
        print(f"full PIL decode, 1 process:                     {baseline:8.1f} files/s")
        for check in ("decode", "structure"):
            prep = statistics.median(
                prep_rate(src, work, run_shard_jobs_in_process, check) for _ in range(args.repeats))
            print(f"data_prep --check {check:9s} (+ shard), 1 process: {prep:8.1f} files/s")
            print(f"  per-core ratio vs full PIL decode: {prep / baseline:.2f}x (target >= 2.0)")
        one = ray_rate(src, work, 1, args.repeats)
        two = ray_rate(src, work, 2, args.repeats)
        print(f"Ray 1 worker: {one:8.1f} files/s   Ray 2 workers: {two:8.1f} files/s")
        print(f"scaling 1 -> 2 workers: {two / one:.2f}x (target >= 1.7)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
