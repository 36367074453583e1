"""Preemption with the real worker, 2 ranks on gloo: a stop signal to the launcher mid-epoch makes every rank
stop after the same step and checkpoint it; the launcher exits with the documented code; rerunning the same
command finishes bit-identical to the uninterrupted reference run (conftest.py), with one MLflow run; on a Ray the
launcher starts itself that rerun is quiet (no Ray Train state-API errors) and says where the run is. Also: Ctrl-C, a launcher that is
SIGKILLed (nothing outlives it), and resuming on another world size (each sample of the epoch once)."""

from __future__ import annotations

import json
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
    wait_for,
)

from rtrain.data.ledger import epoch_samples, read_ledger
from rtrain.launch.owner import RunLock
from rtrain.launch.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED
from rtrain.tracking.status import read_status

pytestmark = [pytest.mark.integration, pytest.mark.slow]



def _cmd(shards, out, name: str, launcher: str, *extra: str) -> list[str]:
    return launch_command(quickstart_overrides(shards, out, name, STEPS, f"dist.launcher={launcher}",
                                               "data.sample_ledger=true", *extra))


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=run_env())
    assert done.returncode == 0, done.stderr[-5000:]
    return done


def _start_and_signal(cmd, out, name: str, signum: int, *, group: bool = False):
    """Start the run, send `signum` once its first checkpoint exists; return (result, pids before the signal)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env(), start_new_session=True)
    try:
        wait_for(lambda: checkpoint_steps(out, name) or proc.poll() is not None, 600, "the first checkpoint")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        live = read_status(out / name)  # rtrain status on a live run: running, and its step advances
        assert live.state == "running", live.detail
        wait_for(lambda: read_status(out / name).step > live.step or proc.poll() is not None, 60, "a later step")
        pids = descendants(proc.pid)
        (os.killpg if group else os.kill)(proc.pid, signum)  # a terminal's Ctrl-C reaches the whole group
        stdout, stderr = proc.communicate(timeout=300)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), pids


def _second_launch_refuses(cmd, run_dir, owner: int) -> None:
    began = time.monotonic()
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=run_env())
    took = time.monotonic() - began
    assert second.returncode == 1, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rtrain: run directory {run_dir} is in use by another launch (host ") \
        and f"pid {owner}, since " in last, last
    assert "Traceback" not in second.stderr and took < 60, f"{took:.0f} s"


def _check_stopped(done, pids, out, name: str, code: int, signal_name: str) -> int:
    assert done.returncode == code, done.stderr[-5000:]
    last = done.stderr.strip().splitlines()[-1]
    stopped_at = max(checkpoint_steps(out, name))
    assert last == (f"rtrain: stopped by {signal_name} after step {stopped_at}: checkpoint "
                    f"{out / name / 'checkpoints' / f'step-{stopped_at:09d}'}; rerun the same command to resume")
    assert stopped_at < 11
    assert final_weights(out, name, stopped_at)  # complete and verified
    wait_for(lambda: pids_gone(pids), 30, f"processes {pids} to end")
    [run] = mlflow_runs(out, name)
    assert run.info.status == "KILLED"
    status = read_status(out / name)
    assert (status.state, status.step) == ("preempted", stopped_at) and signal_name in status.detail
    return stopped_at


@pytest.mark.parametrize("launcher,signum", [("local", signal.SIGTERM), ("ray", signal.SIGUSR1)])
def test_signal_checkpoint_rerun_is_bit_identical(digits_shards, reference_run, tmp_path, launcher, signum):
    cmd = _cmd(digits_shards, tmp_path, "stopped", launcher)
    done, pids = _start_and_signal(cmd, tmp_path, "stopped", signum)
    _check_stopped(done, pids, tmp_path, "stopped", EXIT_PREEMPTED, signal.Signals(signum).name)

    resumed = _run(cmd)
    assert "resumed from" in resumed.stderr
    _check_closing_report(resumed, tmp_path, "stopped")
    assert_same_weights(reference_run.weights(), final_weights(tmp_path, "stopped", STEPS), f"{launcher} resumed run")
    assert read_ledger(tmp_path / "stopped" / "ledger") == reference_run.ledger()
    [run] = mlflow_runs(tmp_path, "stopped")
    assert run.info.status == "FINISHED"


def _check_closing_report(done, out, name: str) -> None:
    """What a finished run prints: the progress line of its last step, rank 0's summary, where the run and
    its MLflow run are; and none of the Ray Train state-API errors that Ray logs without a dashboard."""
    console = done.stdout + done.stderr
    assert "Failed to query" not in console
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["step"] == STEPS and summary["world_size"] == 2
    assert re.search(rf"step {STEPS}/{STEPS} \(100%\) epoch 2/2 loss [\d.]+ lr \S+ [\d.]+ img/s ETA 0:00:00", console)
    assert f"rtrain: run directory {out / name}" in done.stderr
    assert f"mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db" in done.stderr
    [run] = mlflow_runs(out, name)
    assert run.info.run_id == summary["run_id"]


def test_ctrl_c_stops_with_a_checkpoint_and_exit_130(digits_shards, tmp_path):
    cmd = _cmd(digits_shards, tmp_path, "ctrlc", "local")
    done, pids = _start_and_signal(cmd, tmp_path, "ctrlc", signal.SIGINT, group=True)
    _check_stopped(done, pids, tmp_path, "ctrlc", EXIT_INTERRUPTED, "SIGINT")
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr


@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_a_sigkilled_launcher_takes_its_processes_with_it(digits_shards, tmp_path, launcher):
    """Local: the ranks and their loader workers. Ray: also the Ray it started (GCS, raylet, dashboard and
    its agents, which Ray itself would leave behind) and the workers. Before the kill, a second launch of the
    same run refuses at once; after it, the dead launcher's run directory lock is free and taken over."""
    cmd = _cmd(digits_shards, tmp_path, "orphans", launcher, "train.max_steps=5000")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=run_env(),
                            start_new_session=True)
    try:
        wait_for(lambda: checkpoint_steps(tmp_path, "orphans"), 600, "the first checkpoint")
        # The same command again while it runs: refused at once, nothing of the first run touched.
        recorded = (tmp_path / "orphans" / "resolved_recipe.yaml").read_bytes()
        _second_launch_refuses(cmd, tmp_path / "orphans", proc.pid)
        assert (tmp_path / "orphans" / "resolved_recipe.yaml").read_bytes() == recorded
        assert len(mlflow_runs(tmp_path, "orphans")) == 1
        pids = descendants(proc.pid)
        assert len(pids) >= 4  # 2 ranks and their loader workers
        if launcher == "ray":
            titles = {args for pid, _, args in processes() if pid in pids}
            assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= titles
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: pids_gone(pids), 15, f"the launcher's processes {pids} to end")
        saved = checkpoint_steps(tmp_path, "orphans")
        time.sleep(5)
        assert checkpoint_steps(tmp_path, "orphans") == saved  # nobody trains on into the folder
        with RunLock(tmp_path / "orphans") as lock:  # the dead launcher's lock: free, taken over by name
            assert lock.took_over_from and f"pid {proc.pid}" in lock.took_over_from
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_sees_each_sample_once(digits_shards, tmp_path, before, after):
    name = f"elastic-{before}-{after}"
    cmd = _cmd(digits_shards, tmp_path, name, "local", f"dist.num_workers={before}")
    done, pids = _start_and_signal(cmd, tmp_path, name, signal.SIGTERM)
    _check_stopped(done, pids, tmp_path, name, EXIT_PREEMPTED, "SIGTERM")
    resumed = _run(_cmd(digits_shards, tmp_path, name, "local", f"dist.num_workers={after}"))
    assert f"(written by {before} ranks, now {after})" in resumed.stderr
    assert final_weights(tmp_path, name, STEPS)
    seen = epoch_samples(read_ledger(tmp_path / name / "ledger"), 0)
    assert len(seen) == len(set(seen)) == 11 * 128


@pytest.mark.parametrize("signum,code", [(signal.SIGUSR1, EXIT_PREEMPTED), (signal.SIGTERM, EXIT_PREEMPTED),
                                         (signal.SIGINT, EXIT_INTERRUPTED)])
def test_a_stop_signal_during_start_up_exits_at_once_with_its_code(digits_shards, tmp_path, signum, code):
    """The handlers are in place from the first instruction: a signal while the launcher still imports and
    checks the recipe ends it with the documented code and one line, not with the signal's default death."""
    cmd = _cmd(digits_shards, tmp_path, "early", "local")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env())
    # As soon as the process catches SIGUSR1 (SigCgt in /proc; rtrain's early handler goes in last, after
    # SIGINT's and SIGTERM's): that is still within the imports, which take seconds.
    wait_for(lambda: _catches(proc.pid, signal.SIGUSR1) or proc.poll() is not None, 30, "the early handlers",
             poll_s=0.01)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-3000:]
    name = signal.Signals(signum).name
    assert stderr.strip().splitlines()[-1] == (f"rtrain: stopped by {name} before training started: nothing to "
                                               "save; rerun the same command to start")
    assert "Traceback" not in stderr and not checkpoint_steps(tmp_path, "early")


def _catches(pid: int, signum: int) -> bool:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False
