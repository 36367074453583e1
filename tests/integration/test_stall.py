"""A stalled rank ends the run, for real: the 2-rank quickstart (local launcher, and on the Ray it starts) with
dist.stall_timeout_s=6; once its first checkpoint exists one rank is SIGSTOPped. Within the timeout and a few seconds the launcher
ends with exit 76 (retryable) and one line naming the stopped rank, its host, what it was doing and the
newest verified checkpoint; no process of the run is left, the checkpoints stay verified. (The collective
timeout, which follows the recipe, would only have fired after 66 s.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
from ray_runs import (
    REPO,
    checkpoint_steps,
    descendants,
    final_weights,
    launch_command,
    pids_gone,
    processes,
    quickstart_overrides,
    run_env,
    train_worker_pids,
    wait_for,
)

from rtrain._process import EXIT_STALLED

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 6


def _rank_pid(launcher: int, rank: int) -> int:
    ranks = [pid for pid, ppid, args in processes() if ppid == launcher and "rank_process" in args]
    for pid in ranks:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} among the launcher's children {ranks}")


@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_a_stopped_rank_ends_the_run_in_one_line_within_the_timeout(launcher, digits_shards, tmp_path):
    cmd = launch_command(quickstart_overrides(digits_shards, tmp_path, "stall", 5000, f"dist.launcher={launcher}",
                                              "dist.max_failures=0", f"dist.stall_timeout_s={TIMEOUT_S}",
                                              "tracking.enabled=false"))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env(), start_new_session=True)
    try:
        wait_for(lambda: checkpoint_steps(tmp_path, "stall") or proc.poll() is not None, 600, "the first checkpoint")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        pids = descendants(proc.pid)
        stopped = _rank_pid(proc.pid, 1) if launcher == "local" else train_worker_pids(proc.pid)[-1]
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, stderr = proc.communicate(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - stopped_at
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert proc.returncode == EXIT_STALLED, stderr[-4000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("rtrain: rank ") and f" on {socket.gethostname()} (pid {stopped}) made no progress for " \
        in last, last
    assert f"(dist.stall_timeout_s={TIMEOUT_S}); the run was stopped on every rank; rerun the same command to " \
           f"resume from the newest verified checkpoint ({tmp_path / 'stall' / 'checkpoints'}/step-" in last
    # rtrain prints no traceback; on Ray, Ray's controller logs one of its own (its torch backend's shutdown
    # hook cannot reach the stopped worker): Ray's lines carry the process they came from.
    ours = [line for line in stderr.splitlines() if not line.lstrip("\x1b[0123456789m").startswith("(")]
    assert not any("Traceback" in line for line in ours), stderr[-4000:]
    assert took < TIMEOUT_S + 30, f"{took:.0f} s"  # the watchdog, not the 66 s collective timeout
    wait_for(lambda: pids_gone(pids), 30, f"the run's processes {pids} to end")
    newest = max(checkpoint_steps(tmp_path, "stall"))
    assert final_weights(tmp_path, "stall", newest)  # verified
