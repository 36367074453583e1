"""A checkpoint written by the first layout (before the checkpoint package and the Stateful contract) still
resumes: 2 ranks on gloo continue it from step 2 to step 4 and reach that run's own step-4 weights bit for bit
(model and EMA). The fixture and the command that wrote it: tests/fixtures/legacy_checkpoint/README.md."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtrain.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "legacy_checkpoint"

pytestmark = [pytest.mark.integration]


def test_first_layout_checkpoint_resumes_bit_identically(digits_shards, tmp_path):
    checkpoints = tmp_path / "runs" / "legacy" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(FIXTURE / "step-000000002", checkpoints / "step-000000002")
    cmd = [sys.executable, "-m", "rtrain.launch", "recipes/quickstart.yaml", f"data.source={digits_shards}",
           f"run.output_root={tmp_path / 'runs'}", "run.name=legacy", "dist.launcher=local",
           "model.name=cifar_resnet", "model.depth=8", "train.max_steps=4", "checkpoint.every_steps=2",
           "checkpoint.keep=10", "tracking.enabled=false", "train.log_every_steps=1", "eval.every_epochs=100",
           "train.ema_decay=0.9"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr

    final = CheckpointManager(checkpoints, world_size=2).latest()
    assert final is not None and final.step == 4
    expected_model = torch.load(FIXTURE / "expected" / "model.pt", weights_only=True)
    expected_ema = torch.load(FIXTURE / "expected" / "ema.pt", weights_only=True)["module"]
    assert final.shared["model"].keys() == expected_model.keys()
    assert all(torch.equal(final.shared["model"][k], v) for k, v in expected_model.items())
    assert all(torch.equal(final.shared["ema"]["module"][k], v) for k, v in expected_ema.items())
    assert final.shared["backend"]["version"] == 1  # rewritten in today's layout
