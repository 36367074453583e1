"""A full disk during a save, for real: the 2-rank quickstart checkpoints onto a 6 MiB tmpfs (room for two
checkpoints of ~2.2 MB). The third save fails: the run ends in one line naming the step folder, the cause and
the newest verified checkpoint; the earlier checkpoints stay verified. After space is freed (the tmpfs grown),
rerunning the same command resumes and ends bit-identical to the session's uninterrupted reference run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from ray_runs import REPO, STEPS, assert_same_weights, launch_command, quickstart_overrides, run_env

from rtrain.checkpoint import CheckpointManager
from rtrain.data.ledger import read_ledger

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _mount(where, size: str) -> str | None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting a tmpfs needs root and mount(8)"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"mount -t tmpfs failed: {done.stderr.strip()}"


def test_a_full_disk_during_a_save_ends_in_one_line_and_a_rerun_resumes(reference_run, digits_shards, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    reason = _mount(disk, "6m")
    if reason:
        pytest.skip(reason)
    try:
        cmd = launch_command(quickstart_overrides(digits_shards, tmp_path, "full", STEPS, "dist.launcher=local",
                                                  "data.sample_ledger=true", f"checkpoint.dir={disk}"))
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=run_env())
        assert done.returncode == 1, done.stderr[-4000:]
        last = done.stderr.strip().splitlines()[-1]
        saved = CheckpointManager(disk, world_size=2).list()
        assert len(saved) >= 1
        assert f"{disk}/step-" in last and "cannot write the checkpoint: no space left on device" in last, last
        assert f"the newest verified checkpoint is {saved[0]}: free space (or fix the storage) and rerun" in last
        assert "inline_container" not in last and "Traceback" not in done.stderr, done.stderr[-4000:]
        for path in saved:
            assert CheckpointManager(disk, world_size=2).load(path).step  # verified

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=run_env())
        assert rerun.returncode == 0, rerun.stderr[-4000:]
        assert f"resumed from {saved[0]}" in rerun.stderr
        final = CheckpointManager(disk, world_size=2).latest()
        assert final is not None and final.step == STEPS
        assert_same_weights(reference_run.weights(), final.shared["model"], "the run resumed after a full disk")
        assert read_ledger(tmp_path / "full" / "ledger") == reference_run.ledger()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
