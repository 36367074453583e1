"""Exact resumption after a real kill: a run killed mid-epoch (SIGKILL to the whole launcher process group) and
resumed ends with weights bit-identical to an uninterrupted run. 2 processes on gloo, real shards, real loader
workers, real checkpoints; DDP (against the session's reference run, conftest.py) and DeepSpeed ZeRO-1 (against
a straight DeepSpeed run of its own). The DDP run is tracked: its goodput across the kill (the time it was
down, the steps it ran twice) is checked against its own logs, in one MLflow run."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch
from ray_runs import REPO, assert_same_weights, launch_command, mlflow_runs, quickstart_overrides, run_env

from rtrain.checkpoint import CheckpointManager
from rtrain.tracking.events import read_events
from rtrain.tracking.goodput import attempts_of
from rtrain.tracking.status import read_status

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_STEPS = 14  # 1437 digits / global batch 128 -> 11 steps per epoch: the run crosses an epoch
EVERY = 3  # as the reference run's checkpoint.every_steps
DOWN_S = 3.0  # how long the killed run stays dead before its rerun


def _command(shards: Path, out: Path, name: str, extra: list[str], tracked: bool = False) -> list[str]:
    return launch_command(quickstart_overrides(shards, out, name, MAX_STEPS, "dist.launcher=local",
                                               *([] if tracked else ["tracking.enabled=false"]),
                                               "train.log_every_steps=1", *extra))


def _run(cmd: list[str], timeout: float = 900) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=run_env())
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.exists():
        return []
    return sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("step-*"))


def _logged_step(ckpt_dir: Path) -> int:
    return max((r.get("step", 0) for r in read_events(ckpt_dir.parent / "logs" / "rank-0.jsonl")
                if r["event"] == "window"), default=0)


def _run_and_kill(cmd: list[str], ckpt_dir: Path, kill_after_step: int) -> int:
    """Killed once a checkpoint of kill_after_step or later exists and rank 0 logged a step past it (steps
    that the rerun runs again)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=run_env(),
                            start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not any(kill_after_step <= s < min(MAX_STEPS, _logged_step(ckpt_dir)) for s in _steps(ckpt_dir)):
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {kill_after_step}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(_steps(ckpt_dir))
    assert killed_at < MAX_STEPS, "the run finished before it could be killed"
    return killed_at


def _final_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    loaded = CheckpointManager(ckpt_dir).latest()
    assert loaded is not None and loaded.step == MAX_STEPS
    return loaded.shared["model"]


@pytest.mark.parametrize("engine", [
    pytest.param([], id="ddp"),
    pytest.param(["dist.engine=deepspeed", "dist.zero_stage=1"], id="deepspeed-zero1",
                 marks=pytest.mark.deepspeed),
])
def test_killed_and_resumed_equals_straight(digits_shards, request, tmp_path, engine):
    if engine:  # DeepSpeed's own uninterrupted run; DDP's is the session's reference run
        straight = tmp_path / "straight"
        _run(_command(digits_shards, straight, "r", engine))
        expected = _final_weights(straight / "r" / "checkpoints")
    else:
        expected = request.getfixturevalue("reference_run").weights()
    killed = tmp_path / "killed"
    cmd = _command(digits_shards, killed, "r", engine, tracked=not engine)
    ckpt_dir = killed / "r" / "checkpoints"
    killed_at = _run_and_kill(cmd, ckpt_dir, kill_after_step=EVERY * 2)
    assert killed_at % 11 != 0, "the kill should land mid-epoch"
    if not engine:
        deadline = time.monotonic() + 30  # the ranks die with their SIGKILL within moments of the launcher
        while read_status(killed / "r").state != "stopped":  # no end record, no live rank: killed
            assert time.monotonic() < deadline, read_status(killed / "r").detail
            time.sleep(0.2)
    time.sleep(DOWN_S)
    _run(cmd)
    assert_same_weights(expected, _final_weights(ckpt_dir), "the killed and resumed run")
    if not engine:
        _assert_goodput_across_the_kill(killed, "r")


def _assert_goodput_across_the_kill(out: Path, name: str) -> None:
    """Rank 0's log holds both attempts; MLflow's one run has their tags and goodput losses that match it."""
    killed, rerun = attempts_of(read_events(out / name / "logs" / "rank-0.jsonl"))
    status = read_status(out / name)
    assert status.state == "finished" and [a.reason for a in status.attempts] == ["killed", "finished"]
    assert (killed.reason, rerun.reason) == ("killed", "finished")
    assert rerun.resumed_step < killed.step, "the kill should come after steps the rerun runs again"
    [run] = mlflow_runs(out, name)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["rtrain.attempt.1"].startswith("killed; ") and f"steps 0-{killed.step}" in tags["rtrain.attempt.1"]
    assert tags["rtrain.attempt.2"].startswith("finished; ") and f"steps {rerun.resumed_step}-{MAX_STEPS}" in \
        tags["rtrain.attempt.2"]
    assert metrics["lost/restart"] >= DOWN_S
    redone = [seconds for step, _, seconds in killed.windows if step > rerun.resumed_step]
    assert len(redone) == killed.step - rerun.resumed_step  # a window per step (train.log_every_steps=1)
    assert metrics["lost/recomputed"] == pytest.approx(sum(redone))
    per_step = statistics.median(seconds for _, _, seconds in killed.windows + rerun.windows)
    assert 0.3 * len(redone) * per_step <= metrics["lost/recomputed"] <= 3 * len(redone) * per_step
    parts = metrics["goodput/productive_s"] + sum(v for k, v in metrics.items() if k.startswith("lost/"))
    assert parts == pytest.approx(metrics["goodput/wall_s"])  # lost/unaccounted is the rest, by definition
    assert 0 <= metrics["lost/unaccounted"] < 0.2 * metrics["goodput/wall_s"]
    assert 0 < metrics["goodput"] == pytest.approx(metrics["goodput/productive_s"] / metrics["goodput/wall_s"])
