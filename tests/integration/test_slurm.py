"""SLURM for real: slurmctld and two slurmd "nodes" on this host (cluster/local/slurm.py), the shipped sbatch
scripts, the real worker. A run across both nodes on Ray, stopped by USR1 -> checkpoint -> requeue -> resume,
ending bit-identical to the session's uninterrupted reference run (conftest.py); scancel leaves no process; the
srun variant without Ray, bit-identical to the same reference.

SLURM is installed with apt when missing (Debian packages, root); where that cannot be done the tests skip
with the reason."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from ray_runs import (
    REPO,
    STEPS,
    assert_same_weights,
    checkpoint_steps,
    descendants,
    final_weights,
    mlflow_runs,
    pids_gone,
    processes,
    quickstart_overrides,
    run_env,
    wait_for,
)

from cluster.local.slurm import missing_commands, start_slurm, stop_slurm
from rtrain.data.ledger import read_ledger

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _install_reason() -> str | None:
    """Install SLURM if it is missing; the reason it cannot be, else None."""
    if not missing_commands():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"SLURM is not installed ({', '.join(missing_commands())} missing) and apt-get as root is unavailable"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            return f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[-400:]}"
    return f"still missing after apt-get: {missing_commands()}" if missing_commands() else None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _install_reason()
    if reason:
        warnings.warn(f"SLURM TESTS SKIPPED: {reason}")
        pytest.skip(f"SLURM tests skipped: {reason}")
    cluster = start_slurm(tmp_path_factory.mktemp("slurm"))
    yield cluster
    stop_slurm(cluster)


def _env(slurm) -> dict[str, str]:
    env = run_env(SLURM_CONF=str(slurm.conf))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # sbatch passes it on
    return env


def _overrides(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    chosen = quickstart_overrides(shards, out, name, STEPS, "data.sample_ledger=true", *extra)
    return [item for item in chosen if not item.startswith("dist.launcher=")]  # each script picks its own


def _sbatch(slurm, script: str, out: Path, overrides: list[str], **env: str) -> int:
    # --gpus-per-node=0: these nodes have no GPUs (the scripts ask for 8 per node unless told otherwise).
    done = subprocess.run(["sbatch", "--parsable", "-N", "2", "--gpus-per-node=0", f"--output={out}/job-%j.out",
                           f"--chdir={REPO}",
                           f"cluster/slurm/{script}", "recipes/quickstart.yaml", *overrides],
                          cwd=REPO, env={**_env(slurm), **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().split(";")[0])


def _job(slurm, job: int) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=slurm.env, capture_output=True,
                           text=True, timeout=30).stdout
    return dict(item.split("=", 1) for item in shown.split() if "=" in item)


def _wait_state(slurm, job: int, states: set[str], timeout_s: float = 600) -> dict[str, str]:
    return wait_for(lambda: (info := _job(slurm, job)).get("JobState") in states and info, timeout_s,
                    f"job {job} to reach {states}", poll_s=1.0)


def _log(out: Path, job: int) -> str:
    try:
        return (out / f"job-{job}.out").read_text(errors="replace")
    except FileNotFoundError:
        return f"(no output from job {job} yet)"


def _first_checkpoint(slurm, job: int, out: Path, name: str) -> list[int]:
    """The run's checkpoint steps once there is one; fails at once, with the job's output, if the job ended."""
    def saved_or_ended():
        if steps := checkpoint_steps(out, name):
            return steps
        state = _job(slurm, job).get("JobState", "")
        if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            raise AssertionError(f"job {job} ended {state} before its first checkpoint:\n{_log(out, job)[-4000:]}")
        return None
    try:
        return wait_for(saved_or_ended, 600, f"the first checkpoint of job {job}", poll_s=1.0)
    except AssertionError as exc:
        if "ended" in str(exc):
            raise
        raise AssertionError(f"{exc}; the job's output:\n{_log(out, job)[-4000:]}") from None


def _release(slurm, job: int) -> None:
    """Start a requeued job now (SLURM would hold it ~2 minutes). Not within the second of its requeue: slurmd
    refuses a credential issued in the second it revoked the old one ("Job credential revoked"; seen in CI)."""
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm.env, check=True, timeout=30)


def _started_again(slurm, job: int, out: Path, times: int) -> bool:
    if _log(out, job).count("Ray head starting") >= times:
        return True
    state = _job(slurm, job).get("JobState", "")
    if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}:
        raise AssertionError(f"job {job} ended {state} instead of starting again:\n{_log(out, job)[-3000:]}")
    return False


def _job_processes(job: int) -> list[int]:
    return [pid for pid, _, args in processes() if f"rtrain-ray-{job}-" in args]


@pytest.mark.parametrize("script", ["rtrain.sbatch", "rtrain-srun.sbatch"])
def test_scripts_ask_for_gpus_unless_told_otherwise(slurm, script, tmp_path):
    # The scripts' `#SBATCH --gpus-per-node=8` reaches SLURM: these GPU-less nodes refuse it; `_sbatch` passes
    # --gpus-per-node=0, as a user of CPU nodes does.
    done = subprocess.run(["sbatch", "--parsable", "-N", "2", f"--output={tmp_path}/job-%j.out", f"--chdir={REPO}",
                           f"cluster/slurm/{script}", "recipes/quickstart.yaml"],
                          cwd=REPO, env=_env(slurm), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "generic resource" in done.stderr, (done.stdout, done.stderr)


def test_sbatch_on_ray_across_two_nodes_usr1_checkpoints_requeues_resumes_bit_identical(slurm, reference_run,
                                                                                       digits_shards, tmp_path):
    """One job does what a user's would: a run on Ray across both nodes, stopped by USR1 (checkpoint, requeue),
    stopped again by USR1 while the restart's Ray starts (requeue, nothing lost), then resumed to the end."""
    job = _sbatch(slurm, "rtrain.sbatch", tmp_path, _overrides(digits_shards, tmp_path, "requeued"))
    _first_checkpoint(slurm, job, tmp_path, "requeued")
    subprocess.run(["scancel", "-b", "-s", "USR1", str(job)], env=slurm.env, check=True, timeout=30)
    info = wait_for(lambda: (i := _job(slurm, job)).get("Restarts") == "1" and i["JobState"] == "PENDING" and i,
                    300, "the requeue")
    stopped_at = max(checkpoint_steps(tmp_path, "requeued"))
    assert stopped_at < 11, info
    log = _log(tmp_path, job)
    assert f"rtrain: stopped by SIGUSR1 after step {stopped_at}" in log
    assert f"requeueing job {job}" in log
    [run] = mlflow_runs(tmp_path, "requeued")
    assert run.info.status == "KILLED"

    # The requeued job is stopped again while Ray is still starting: requeued again, nothing trained or lost.
    _release(slurm, job)
    wait_for(lambda: _started_again(slurm, job, tmp_path, 2), 300, "the restart's Ray start", poll_s=0.1)
    subprocess.run(["scancel", "-b", "-s", "USR1", str(job)], env=slurm.env, check=True, timeout=30)
    info = wait_for(lambda: (i := _job(slurm, job)).get("Restarts") == "2" and i["JobState"] == "PENDING" and i,
                    300, "the second requeue")
    log = _log(tmp_path, job)
    assert re.search(r"stopped by (SIG)?USR1 before (the run|training) started", log), log[-3000:]
    assert max(checkpoint_steps(tmp_path, "requeued")) == stopped_at

    _release(slurm, job)
    info = _wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "restart 2" in log and "resumed from" in log
    assert f"Ray cluster at 127.0.0.1:{20000 + job % 10000} has 2 node(s)" in log
    assert "dist.launcher=ray dist.num_workers=2" in log  # the worker count comes from the allocation
    assert_same_weights(reference_run.weights(), final_weights(tmp_path, "requeued", STEPS), "the requeued run")
    assert read_ledger(tmp_path / "requeued" / "ledger") == reference_run.ledger()
    [run] = mlflow_runs(tmp_path, "requeued")  # the same MLflow run, continued
    assert run.info.status == "FINISHED"
    assert not _job_processes(job)  # Ray's daemons ended with the job


def test_scancel_leaves_no_process_behind(slurm, digits_shards, tmp_path):
    job = _sbatch(slurm, "rtrain.sbatch", tmp_path,
                  _overrides(digits_shards, tmp_path, "cancelled", "train.max_steps=5000"))
    _first_checkpoint(slurm, job, tmp_path, "cancelled")
    # The job's steps and the Ray daemons it started (they leave their parent: found by their session folder),
    # with everything below them; not "every new process": other tests may run beside this one.
    roots = [pid for pid, _, args in processes() if args.startswith(f"slurmstepd: [{job}.")] + _job_processes(job)
    started = sorted({*roots, *(child for root in roots for child in descendants(root))})
    assert _job_processes(job) and len(started) >= 6, [a[:120] for p, _, a in processes() if p in started]
    subprocess.run(["scancel", str(job)], env=slurm.env, check=True, timeout=30)
    _wait_state(slurm, job, {"CANCELLED"}, timeout_s=120)
    wait_for(lambda: pids_gone(started), 60, f"the job's processes {started} to end")
    saved = checkpoint_steps(tmp_path, "cancelled")
    time.sleep(3)
    assert checkpoint_steps(tmp_path, "cancelled") == saved


def test_srun_variant_trains_across_two_nodes_without_ray(slurm, reference_run, digits_shards, tmp_path):
    # One thread per rank (run_env), as Ray gives each 1-CPU worker: the same float sums as the reference.
    job = _sbatch(slurm, "rtrain-srun.sbatch", tmp_path, _overrides(digits_shards, tmp_path, "srun"))
    info = _wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "via the local launcher" in log and "Ray cluster" not in log
    assert log.count("rtrain: finished 'srun'") == 1  # node 0 reports for the run
    # Two ranks, one per node, meeting over TCP: the same math as two Ray workers.
    assert_same_weights(reference_run.weights(), final_weights(tmp_path, "srun", STEPS), "the srun run")
    [run] = mlflow_runs(tmp_path, "srun")
    assert run.info.status == "FINISHED"
