"""The local launcher: 2 real processes on gloo running stand-in workers; failure propagation; the CLI's
validation (recipe errors and unknown model names exit 2 before any worker starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rtrain.config import loads_recipe, recipe_from_dict
from rtrain.distributed.env import detect_env, init_distributed, shutdown_distributed
from rtrain.launch import LaunchError, launch, main

REPO = Path(__file__).resolve().parents[2]


def allreduce_worker(config: dict) -> dict:
    """Stand-in for rtrain.launch.worker.run_worker: joins the group, sums rank+1 over all ranks."""
    recipe = loads_recipe(config["recipe_yaml"])
    env = detect_env()
    init_distributed(env, use_gpu=recipe.dist.use_gpu)
    total = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(total)
    if env.source == "env":  # under Ray Train, Ray owns the group and tears it down
        shutdown_distributed()
    if env.rank != 0:
        return {}
    return {"world_size": env.world_size, "sum": total.item(), "source": env.source,
            "run": recipe.run.name, "output_root": recipe.run.output_root}


def failing_worker(config: dict) -> dict:
    """Rank 1 fails before the collective, so rank 0 blocks in all_reduce until the launcher stops it."""
    env = detect_env()
    init_distributed(env, use_gpu=False)
    if env.rank == 1:
        raise ValueError("boom on rank 1")
    dist.all_reduce(torch.ones(1))
    return {"unreachable": True}


def _raw(tmp_path: Path, **dist_options) -> dict:
    return {
        "run": {"name": "standin", "output_root": str(tmp_path / "runs")},
        "train": {"global_batch": 2},
        "dist": {"num_workers": 2, "launcher": "local", **dist_options},
        "tracking": {"enabled": False},
    }


def _write_recipe(tmp_path: Path, raw: dict) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_two_local_ranks_allreduce_and_rank0_summary_returns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = _raw(tmp_path)
    raw["run"]["output_root"] = "rel/runs"  # workers must see it absolute, pinned to the launcher's cwd
    summary = launch(recipe_from_dict(raw), worker_fn=allreduce_worker)
    assert summary == {"world_size": 2, "sum": 3.0, "source": "env", "run": "standin",
                       "output_root": str(tmp_path / "rel" / "runs")}
    resolved = loads_recipe((tmp_path / "rel" / "runs" / "standin" / "resolved_recipe.yaml").read_text())
    assert resolved.dist.num_workers == 2


@pytest.mark.slow
def test_failing_rank_stops_the_others_and_is_named(tmp_path):
    with pytest.raises(LaunchError, match="rank 1 failed: ValueError: boom on rank 1"):
        launch(recipe_from_dict(_raw(tmp_path)), worker_fn=failing_worker)


def test_worker_must_be_importable(tmp_path):
    def local_fn(config):
        return {}

    with pytest.raises(LaunchError, match="module-level function"):
        launch(recipe_from_dict(_raw(tmp_path)), worker_fn=local_fn)


def _launch_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "rtrain.launch", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)


@pytest.mark.slow
def test_cli_prints_rank0_summary_as_json(tmp_path):
    recipe = _write_recipe(tmp_path, _raw(tmp_path))
    done = _launch_cli(str(recipe), "run.name=cli", "--worker", "test_launch_local:allreduce_worker")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["run"] == "cli"
    assert "resolved recipe" in done.stderr


@pytest.mark.slow
def test_cli_failure_exits_nonzero_with_the_workers_error(tmp_path):
    recipe = _write_recipe(tmp_path, _raw(tmp_path))
    done = _launch_cli(str(recipe), "--worker", "test_launch_local:failing_worker")
    assert done.returncode == 1
    assert "rank 1 failed: ValueError: boom on rank 1" in done.stderr


@pytest.mark.parametrize("overrides, message", [
    (["model.name=resnet9000"], "model.name='resnet9000': not a registered model"),
    (["dist.num_workers=3"], "train.global_batch"),
    (["dist.nodes=2"], "dist.nodes"),
    (["tracking.enabled=true", "tracking.uri=mlruns"], "tracking.uri='mlruns': MLflow's file store is disabled"),
])
def test_bad_recipe_exits_2_naming_the_key(tmp_path, capsys, overrides, message):
    recipe = _write_recipe(tmp_path, _raw(tmp_path))
    assert main([str(recipe), *overrides, "--worker", "test_launch_local:allreduce_worker"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_unknown_worker_reference_is_named(tmp_path, capsys):
    recipe = _write_recipe(tmp_path, _raw(tmp_path))
    assert main([str(recipe), "--worker", "no_such_module:fn"]) == 1
    assert "--worker 'no_such_module:fn': cannot import it" in capsys.readouterr().err
