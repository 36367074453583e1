"""Every recipe on disk runs: a real `python -m rtrain.launch` of the shipped file for 2 steps at CPU scale
(the local launcher, digits shards, small images, a small batch, a temp sqlite MLflow), so no recipe rots.

Parametrized over the files found under recipes/, so a new recipe is covered without touching this file.
The overrides shrink a recipe to CPU scale and nothing else: its model, optimizer, schedule, precision,
augmentation, channels_last, activation checkpointing, async checkpoints and evaluation mode stay as shipped,
except where `cpu_scale` says why a CUDA-only choice is swapped for its CPU counterpart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtrain.config import Recipe, load_recipe
from rtrain.models.registry import model_info

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
STEPS = 2


def cpu_scale(recipe: Recipe, shards: Path, out: Path, name: str) -> list[str]:
    """The overrides that bring `recipe` to 1-2 CPU processes for STEPS steps; each CUDA-only swap says why."""
    workers = 2 if recipe.dist.num_workers > 1 and recipe.dist.syncbn != "off" else 1  # SyncBN across 2 ranks
    o = [f"data.source={shards}", "data.num_workers=0", "data.shuffle_buffer=16", f"run.output_root={out}",
         f"run.name={name}", "dist.launcher=local", "dist.use_gpu=false", f"dist.num_workers={workers}",
         "dist.cpus_per_worker=1", f"train.global_batch={2 * workers}", f"train.max_steps={STEPS}",
         "train.accumulation_steps=1", "eval.batch_size=16", "checkpoint.every_steps=1",
         f"tracking.uri=sqlite:///{out}/mlflow.db", f"tracking.experiment={name}", "tracking.enabled=true"]
    if model_info(recipe.model.name).family == "imagenet":  # 224 px crops of 256-480 px images -> 32 of 36-48
        o += ["data.image_size=32", "data.eval_resize=36", "data.scale_min=36", "data.scale_max=48"]
    if recipe.eval.scales:
        o.append("eval.scales=[32,40]")
    if recipe.dist.syncbn in ("torch", "apex"):  # CUDA-only SyncBN kernels: rtrain's SyncBN is the gloo twin
        o.append("dist.syncbn=rtrain")
    if recipe.data.backend == "dali":  # DALI decodes on the GPU only
        o.append("data.backend=webdataset")
    if recipe.optim.impl != "torch":  # apex / DeepSpeed kernels are CUDA builds
        o.append("optim.impl=torch")
    if recipe.precision.dtype == "fp16":  # fp16 autocast is a CUDA path; bf16 autocast runs on the CPU
        o += ["precision.dtype=bf16", "precision.scaler=none"]
    return o


@pytest.fixture(scope="module")
def small_val_shards(tmp_path_factory):
    """The digits with a 27-image val split: every recipe evaluates at its end (the 1202-layer net too)."""
    from testkit import run_module

    root = tmp_path_factory.mktemp("recipe-digits")
    run_module("data_prep.samples", "digits", "--out", str(root / "folders"), "--val-fraction", "0.015")
    run_module("data_prep.imagenet", "--src", str(root / "folders"), "--out", str(root / "shards"),
               "--shard-size", "400", "--workers", "2", "--no-progress")
    return root / "shards"


def _id(path: Path) -> str:
    return str(path.relative_to(REPO / "recipes"))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_runs_a_few_steps_at_cpu_scale(path, small_val_shards, tmp_path):
    name = path.stem
    overrides = cpu_scale(load_recipe(path), small_val_shards, tmp_path, name)
    done = subprocess.run([sys.executable, "-m", "rtrain.launch", str(path), *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{_id(path)}: exit {done.returncode}\n{done.stderr[-5000:]}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["step"], summary["total_steps"]) == (STEPS, STEPS)
    assert 0.0 <= summary["val_top1"] <= 1.0
    assert (tmp_path / name / "checkpoints" / f"step-{STEPS:09d}").is_dir()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == name
    assert run.data.params["model.name"] == load_recipe(path).model.name
