"""Exact resumption after a real kill: train N steps straight vs. killed mid-epoch (SIGKILL to the whole
launcher process group) and resumed: the final weights are bit-identical. 2 processes on gloo, real shards,
real loader workers, real checkpoints; DDP and DeepSpeed ZeRO-1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rtrain.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_STEPS = 14  # 1437 digits / global batch 128 -> 11 steps per epoch: the run crosses an epoch
EVERY = 3


def _command(shards: Path, out: Path, name: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "rtrain.launch", "recipes/quickstart.yaml",
            f"data.source={shards}", f"run.output_root={out}", f"run.name={name}", "dist.launcher=local",
            f"train.max_steps={MAX_STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep=10",
            "tracking.enabled=false", "train.log_every_steps=1", "eval.every_epochs=100", *extra]


def _run(cmd: list[str], timeout: float = 900) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.exists():
        return []
    return sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("step-*"))


def _run_and_kill(cmd: list[str], ckpt_dir: Path, kill_after_step: int) -> int:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not any(kill_after_step <= s < MAX_STEPS for s in _steps(ckpt_dir)):
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {kill_after_step}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
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
def test_killed_and_resumed_equals_straight(digits_shards, tmp_path, engine):
    straight = tmp_path / "straight"
    _run(_command(digits_shards, straight, "r", engine))
    killed = tmp_path / "killed"
    cmd = _command(digits_shards, killed, "r", engine)
    ckpt_dir = killed / "r" / "checkpoints"
    killed_at = _run_and_kill(cmd, ckpt_dir, kill_after_step=EVERY * 2)
    assert killed_at % 11 != 0, "the kill should land mid-epoch"
    _run(cmd)
    a, b = _final_weights(straight / "r" / "checkpoints"), _final_weights(ckpt_dir)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs from the straight one in {different[:5]}"
