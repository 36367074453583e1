"""`rtrain bench RECIPE` as a user runs it: real shards of real photos (data_prep.photos -> data_prep.imagenet),
the recipe's own loader and training step; it names the bottleneck both ways round, and ends a recipe or
data problem with one line and exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rtrain.commands.bench import BenchResult

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration]


def _bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtrain.cli", "bench", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> Path:
    from data_prep.photos import write_photos

    root = tmp_path_factory.mktemp("bench")
    write_photos(root / "photos", 80, seed=1)
    subprocess.run([sys.executable, "-m", "data_prep.imagenet", "--src", str(root / "photos"), "--out",
                    str(root / "shards"), "--shard-size", "20", "--workers", "2", "--no-progress"], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    return root / "shards"


def _rates(stdout: str) -> tuple[float, float]:
    loader = float(re.search(r"^loader:\s+([\d.]+) img/s", stdout, re.M).group(1))
    model = float(re.search(r"^model:\s+([\d.]+) img/s", stdout, re.M).group(1))
    return loader, model


def test_bench_measures_both_and_names_the_bottleneck(photo_shards: Path) -> None:
    common = [f"data.source={photo_shards}", "dist.num_workers=1", "train.global_batch=8", "data.num_workers=1",
              "--loader-batches", "3", "--steps", "2", "--warmup", "1"]
    # ImageNet-sized photos into a 20-layer CIFAR net at 32 px: the loader's decoding is the slower side?
    # Either way the verdict must name the slower of the two measured rates.
    done = _bench("recipes/quickstart.yaml", "data.image_size=32", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    loader, model = _rates(done.stdout)
    assert loader > 0 and model > 0
    slower = "input pipeline" if loader < model else "model step"
    assert f"bottleneck: the {slower}" in done.stdout
    assert "1 worker process(es)" in done.stdout and "8 images per rank" in done.stdout
    # A much heavier model step on the same data: now the model is the bottleneck.
    heavy = _bench("recipes/quickstart.yaml", "model.name=resnet50", "data.augment=rrc", "data.image_size=128", *common)
    assert heavy.returncode == 0, heavy.stderr[-3000:]
    loader, model = _rates(heavy.stdout)
    assert model < loader and "bottleneck: the model step" in heavy.stdout


def test_bench_problems_end_with_one_line(photo_shards: Path, tmp_path: Path) -> None:
    missing = _bench("recipes/quickstart.yaml", f"data.source={tmp_path / 'nothing'}", "--steps", "1")
    assert missing.returncode == 2 and missing.stderr.startswith("rtrain: ")
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr
    too_many = _bench("recipes/quickstart.yaml", f"data.source={photo_shards}", "dist.num_workers=1",
                      "train.global_batch=16", "data.num_workers=0", "--loader-batches", "40")
    assert too_many.returncode == 2 and "fewer than 41 batches" in too_many.stderr
    bad_key = _bench("recipes/quickstart.yaml", "train.no_such_key=1")
    assert bad_key.returncode == 2 and "no_such_key" in bad_key.stderr


def test_verdict_names_the_slower_side_and_the_factor() -> None:
    input_bound = BenchResult(loader_images_per_s=100.0, loader_workers=4, model_images_per_s=300.0, device="x")
    assert "input pipeline" in input_bound.verdict() and "3.00x" in input_bound.verdict()
    assert "25.0 img/s" in input_bound.verdict()  # what one more worker adds
    compute_bound = BenchResult(loader_images_per_s=500.0, loader_workers=2, model_images_per_s=100.0, device="x")
    assert "model step" in compute_bound.verdict() and "5.00x" in compute_bound.verdict()
