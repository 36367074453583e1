"""Worker loss under Ray with the real worker: one Ray Train worker process SIGKILLed mid-epoch.

With dist.max_failures=1 Ray restarts the worker group, which resumes from the newest verified checkpoint;
the run finishes by itself with weights bit-identical to the uninterrupted reference run (conftest.py), a sample
ledger holding every sample of the interrupted epoch exactly once (the same batches as the reference), and one
MLflow run.
With max_failures=0 it stops with one line naming the dead rank.
The Ray head lost (raylet and gcs_server SIGKILLed mid-run): the driver and the workers stop within
dist.ray_head_timeout_s (Ray's own abort comes after 60 s), one line, the MLflow run FAILED with the reason,
nothing left running; the same command then resumes and ends bit-identical to the reference run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from ray_runs import (
    REPO,
    STEPS,
    assert_same_weights,
    checkpoint_steps,
    descendants,
    final_weights,
    launch_command,
    mlflow_runs,
    pids_gone,
    processes,
    quickstart_overrides,
    run_env,
    train_worker_pids,
    wait_for,
)

from rtrain.data.ledger import epoch_samples, read_ledger

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run_and_kill_a_worker(shards, out, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, int]:
    """Start the run, SIGKILL one Ray Train worker process once step 3's checkpoint exists (mid-epoch 0)."""
    cmd = launch_command(quickstart_overrides(shards, out, name, STEPS, "data.sample_ledger=true", *extra))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env(), start_new_session=True)
    try:
        wait_for(lambda: checkpoint_steps(out, name) or proc.poll() is not None, 600, "the first checkpoint")
        assert proc.poll() is None, "the run ended before a worker could be killed"
        killed_after = max(checkpoint_steps(out, name))
        victim = wait_for(lambda: train_worker_pids(proc.pid)[-1:], 60, "a Ray Train worker process of this run")[0]
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=900)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert killed_after < 11, f"killed after step {killed_after}: not mid-epoch 0"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), killed_after


def test_a_killed_worker_is_replaced_and_the_run_ends_as_if_uninterrupted(digits_shards, reference_run, tmp_path):
    done, _ = _run_and_kill_a_worker(digits_shards, tmp_path, "lossy", "dist.max_failures=1")
    assert done.returncode == 0, done.stderr[-5000:]
    assert "resumed from" in done.stderr

    assert_same_weights(reference_run.weights(), final_weights(tmp_path, "lossy", STEPS), "the restarted run")

    resumed = read_ledger(tmp_path / "lossy" / "ledger")
    assert resumed == reference_run.ledger()  # every batch as in the uninterrupted run
    epoch0 = epoch_samples(resumed, 0)
    assert len(epoch0) == len(set(epoch0)) == 11 * 128  # the interrupted epoch: each sample once

    [run] = mlflow_runs(tmp_path, "lossy")  # one MLflow run across the restart
    assert run.info.status == "FINISHED"


def test_without_restarts_a_killed_worker_fails_the_run_in_one_line(digits_shards, tmp_path):
    done, _ = _run_and_kill_a_worker(digits_shards, tmp_path, "fragile", "dist.max_failures=0")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("rtrain: Ray Train run 'fragile' failed: rank ")
    assert "worker process died" in last and "dist.max_failures" in last
    assert f"resume from the newest verified checkpoint ({tmp_path / 'fragile' / 'checkpoints'}" in last


def test_a_lost_ray_head_stops_the_run_in_one_line_and_the_rerun_resumes(digits_shards, reference_run, tmp_path):
    name = "headless"
    cmd = launch_command(quickstart_overrides(digits_shards, tmp_path, name, STEPS, "dist.ray_head_timeout_s=3"))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env(), start_new_session=True)
    try:
        wait_for(lambda: checkpoint_steps(tmp_path, name) or proc.poll() is not None, 600, "the first checkpoint")
        assert proc.poll() is None, "the run ended before its head could be killed"
        started = descendants(proc.pid)  # the Ray this launcher started, its driver's workers among them
        head = [pid for pid, _, args in processes()
                if pid in started and os.path.basename(args.split()[0]) in ("gcs_server", "raylet")]
        assert len(head) == 2, [row for row in processes() if row[0] in started]
        for pid in head:
            os.kill(pid, signal.SIGKILL)
        lost_at = time.monotonic()
        _, stderr = proc.communicate(timeout=300)
        took = time.monotonic() - lost_at
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert proc.returncode == 1, stderr[-5000:]
    last = stderr.strip().splitlines()[-1]
    assert re.match(rf"rtrain: Ray Train run '{name}' stopped: lost the Ray head: its GCS at \S+ did not answer "
                    r"for 3 s \(dist.ray_head_timeout_s; ", last), last
    assert "the workers stopped themselves; the MLflow run was marked FAILED" in last
    assert f"resume from the newest verified checkpoint ({tmp_path / name / 'checkpoints'}" in last
    assert took < 30, f"the launcher ended {took:.0f} s after the head was lost"  # Ray's own: 60 s and no line
    assert max(checkpoint_steps(tmp_path, name)) < STEPS  # it stopped mid-run: nothing trains on blind
    wait_for(lambda: pids_gone(started), 30, "every process of the launch to end")
    [run] = mlflow_runs(tmp_path, name)
    assert run.info.status == "FAILED" and "lost the Ray head" in run.data.tags["rtrain.error"]

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=run_env())
    assert again.returncode == 0, again.stderr[-5000:]
    assert "resumed from" in again.stderr
    assert_same_weights(reference_run.weights(), final_weights(tmp_path, name, STEPS), "the rerun after a lost head")
    [run] = mlflow_runs(tmp_path, name)  # the same MLflow run, continued
    assert run.info.status == "FINISHED"
