"""A checkpoint written by the first layout (before the checkpoint package and the Stateful contract) still
resumes: 2 ranks on gloo continue it from step 2 to step 4 and reach that run's own step-4 weights (model and
EMA). The fixture and the command that wrote it: tests/fixtures/legacy_checkpoint/README.md.

The fixture was recorded on another machine, so its weights are compared with a tolerance, not bit for bit:
float sums run in another order on another CPU's kernels (measured: at most 1.1e-5, under 0.1 % of what the two
resumed steps changed in any tensor). A state restored wrongly or a step skipped or repeated moves a tensor by
a good part of that change, so a deviation over 1 % of it fails, and the message says which tensor and by how
much. Bit-identity is asserted where both runs are made in one test on one machine (test_resume_kill.py,
test_preemption.py, test_ray_worker_loss.py)."""

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
           "train.ema_decay=0.9",
           "checkpoint.allow_changes=[data.source]"]  # the fixture was written against /tmp/fx/shards
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr

    final = CheckpointManager(checkpoints, world_size=2).latest()
    assert final is not None and final.step == 4
    expected_model = torch.load(FIXTURE / "expected" / "model.pt", weights_only=True)
    expected_ema = torch.load(FIXTURE / "expected" / "ema.pt", weights_only=True)["module"]
    start = FIXTURE / "step-000000002" / "shared"
    start_model = torch.load(start / "model.pt", weights_only=True)
    start_ema = torch.load(start / "ema.pt", weights_only=True)["module"]
    assert final.shared["model"].keys() == expected_model.keys()
    assert_same_training(final.shared["model"], expected_model, start_model, "model")
    assert_same_training(final.shared["ema"]["module"], expected_ema, start_ema, "ema")
    assert final.shared["backend"]["version"] == 1  # rewritten in today's layout


NOISE_SHARE = 0.01  # of what the resumed steps changed; float noise across CPUs measured at <= 0.001


def assert_same_training(got: dict, expected: dict, start: dict, what: str) -> None:
    """`got` is the fixture run's result up to float noise: integer tensors equal, every float tensor within
    NOISE_SHARE of the change from `start` (step 2) to `expected` (step 4)."""
    for name, want in expected.items():
        if not want.is_floating_point():
            assert torch.equal(got[name], want), f"{what}.{name}: {got[name]} != {want} (a step skipped or repeated)"
            continue
        deviation = (got[name] - want).abs().max().item()
        change = (want - start[name]).abs().max().item()
        assert deviation <= NOISE_SHARE * change, (
            f"{what}.{name}: off the recorded step-4 weights by {deviation:.3g}, {deviation / change:.1%} of what "
            f"steps 3-4 changed ({change:.3g}): more than float noise across CPUs (<= 0.1 %); a state was "
            f"restored wrongly or a step was skipped or repeated")
