"""The SLURM scripts' worker count (cluster/slurm/workers.py): one worker per GPU SLURM gave the job, one per node
on a CPU allocation; the scripts ask for GPUs by default. (The scripts' runs on real SLURM daemons, with
--gpus-per-node=0, are in tests/integration/test_slurm.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.slurm.workers import AllocationError, allocation_workers, extra_overrides, parse_gpus
from rtrain.config.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "cluster" / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("text, gpus", [
    ("8", 8), ("a100:8", 8), ("gpu:a100:8", 8), ("gpu:8", 8), (" 4 ", 4), ("a100:4,v100:2", 6),
    ("gpu:a100:8(S:0-1)", 8), ("", 0), (None, 0), ("0", 0),
])
def test_gpu_counts_in_every_form_slurm_writes(text, gpus):
    assert parse_gpus(text) == gpus


@pytest.mark.parametrize("text", ["eight", "a100:", "a100:x", "-1"])
def test_a_malformed_gpu_count_is_refused_naming_the_variable(text):
    with pytest.raises(AllocationError, match="SLURM_GPUS_PER_NODE"):
        parse_gpus(text)


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "8"}, (16, True)),
    ({"SLURM_JOB_NUM_NODES": "32", "SLURM_GPUS_PER_NODE": "a100:8"}, (256, True)),  # r152_256gpu's 256
    ({"SLURM_NNODES": "4", "SLURM_GPUS_PER_NODE": "gpu:h100:4"}, (16, True)),  # SLURM_NNODES when it is alone
    ({"SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "2"}, (6, True)),  # --gres=gpu:2 sets only this one
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "0"}, (2, False)),  # --gpus-per-node=0: CPU nodes
    ({"SLURM_JOB_NUM_NODES": "2"}, (2, False)),  # no GPU variable at all: one worker per node, as before
    ({}, (1, False)),  # outside SLURM
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "8", "RTRAIN_WORKERS_PER_NODE": "4"}, (8, True)),
    ({"SLURM_JOB_NUM_NODES": "2", "RTRAIN_WORKERS_PER_NODE": "3"}, (6, False)),
])
def test_workers_are_nodes_times_gpus_per_node(env, expected):
    assert allocation_workers(env) == expected


@pytest.mark.parametrize("env, match", [
    ({"SLURM_JOB_NUM_NODES": "two"}, "SLURM_JOB_NUM_NODES"),
    ({"SLURM_JOB_NUM_NODES": "0"}, "at least one node"),
    ({"RTRAIN_WORKERS_PER_NODE": "0"}, "RTRAIN_WORKERS_PER_NODE"),
    ({"SLURM_GPUS_ON_NODE": "x"}, "SLURM_GPUS_ON_NODE"),
])
def test_malformed_variables_are_refused(env, match):
    with pytest.raises(AllocationError, match=match):
        allocation_workers(env)


def test_overrides_the_user_gave_are_kept():
    gpus = {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "a100:8"}
    assert extra_overrides([], gpus) == ["dist.num_workers=16", "dist.use_gpu=true"]
    assert extra_overrides(["dist.num_workers=4", "train.epochs=1"], gpus) == ["dist.use_gpu=true"]
    assert extra_overrides(["dist.use_gpu=false"], gpus) == ["dist.num_workers=16"]
    assert extra_overrides([], {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "0"}) == ["dist.num_workers=2"]


def _run(*overrides: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RTRAIN_WORKERS"))}
    return subprocess.run([sys.executable, "-m", "cluster.slurm.workers", *overrides], cwd=REPO,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_the_command_the_scripts_call_prints_the_overrides_to_add():
    done = _run("train.epochs=1", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_PER_NODE="gpu:a100:8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["dist.num_workers=16", "dist.use_gpu=true"]
    assert "2 node(s) x 8 worker(s) per node (8 GPU(s)) = 16 worker(s)" in done.stderr
    cpu = _run(SLURM_JOB_NUM_NODES="2", SLURM_GPUS_PER_NODE="0")
    assert cpu.returncode == 0 and cpu.stdout.split() == ["dist.num_workers=2"]
    given = _run("dist.num_workers=3", SLURM_JOB_NUM_NODES="2")
    assert given.returncode == 0 and given.stdout.split() == []
    bad = _run(SLURM_JOB_NUM_NODES="2", SLURM_GPUS_PER_NODE="lots")
    assert bad.returncode == 2 and bad.stderr.startswith("rtrain: SLURM_GPUS_PER_NODE='lots'")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_ask_for_eight_gpus_per_node_and_count_workers_in_python(script):
    text = script.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --gpus-per-node=8" in directives
    assert "-m cluster.slurm.workers" in text


def test_r152_on_two_8_gpu_nodes_divides_and_a_batch_that_does_not_is_a_recipe_error():
    """The allocation sets the worker count; the batch is never changed: one that does not divide stops the
    launch with the recipe's error on train.global_batch."""
    recipe = REPO / "recipes" / "r152_256gpu.yaml"
    workers, use_gpu = allocation_workers({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "8"})
    fits = load_recipe(recipe, [*extra_overrides([], {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "8"})])
    assert (fits.dist.num_workers, fits.dist.use_gpu, fits.train.global_batch) == (workers, use_gpu, 8192)
    with pytest.raises(RecipeError, match="train.global_batch"):
        load_recipe(recipe, extra_overrides([], {"SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_PER_NODE": "a100:8"}))
