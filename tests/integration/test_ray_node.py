"""cluster/slurm/ray_node.py's start-up with a real `ray start`, outside SLURM: a head whose first start fails
the way one failed in CI (a port taken between being picked and being bound: "Address already in use", the
head's `ray start --block` exits 1) is started again and the cluster forms; `wait --head-pid` sees it; a stop
signal to the wrapper stops Ray and leaves none of its processes; `wait` on a head that has ended answers at
once, not at its timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from ray_runs import REPO, pids_gone, processes, run_env, wait_for
from testkit import free_port

pytestmark = [pytest.mark.integration]

# The first attempt gets the Ray client server's port replaced by one this test holds; the later ones are real.
_RUN_HEAD = """
import sys
from cluster.slurm import ray_node
held, gcs = int(sys.argv[1]), int(sys.argv[2])
calls = []
def make_argv():
    argv = ray_node.head_argv(gcs, ray_node._free_port())
    if not calls:
        argv[argv.index("--ray-client-server-port") + 1] = str(held)
    calls.append(1)
    return argv
sys.exit(ray_node._run_logged(make_argv, "Ray head"))
"""


def _ray_processes(tag: str) -> list[int]:
    return [pid for pid, _, args in processes() if tag in args and "<defunct>" not in args]


def test_a_head_that_fails_to_start_is_started_again_and_stops_on_a_signal(tmp_path):
    job = f"t{os.getpid()}"
    tag = f"rtrain-ray-{job}-retry"
    env = run_env(RTRAIN_RAY_NODE_IP="127.0.0.1", SLURM_JOB_ID=job, SLURMD_NODENAME="retry",
                  SLURM_CPUS_ON_NODE="1", PYTHONPATH=REPO)
    gcs = free_port()
    address = f"127.0.0.1:{gcs}"
    held = socket.socket()
    held.bind(("127.0.0.1", free_port()))
    held.listen()
    head = subprocess.Popen([sys.executable, "-c", _RUN_HEAD, str(held.getsockname()[1]), str(gcs)], cwd=REPO,
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        waited = subprocess.run([sys.executable, "-m", "cluster.slurm.ray_node", "wait", "--address", address,
                                 "--nodes", "1", "--head-pid", str(head.pid), "--timeout", "240"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        held.close()
        assert waited.returncode == 0, waited.stderr[-2000:]
        assert f"Ray cluster at {address} has 1 node(s)" in waited.stdout
        assert head.poll() is None
        started = _ray_processes(tag)
        assert started

        head.send_signal(signal.SIGTERM)
        assert head.wait(timeout=120) == 0
        err = head.stderr.read()
        assert "Ray head on retry failed to start (exit 1, attempt 1 of 3" in err, err
        assert err.count("Ray head starting on retry") == 2, err
        wait_for(lambda: pids_gone(started), 60, f"Ray's processes {started} to end")

        began = time.monotonic()
        gone = subprocess.run([sys.executable, "-m", "cluster.slurm.ray_node", "wait", "--address", address,
                               "--nodes", "1", "--head-pid", str(head.pid), "--timeout", "240"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert gone.returncode == 1 and time.monotonic() - began < 60
        assert f"the Ray head (PID {head.pid}) ended before 1 node(s) joined {address}" in gone.stderr
    finally:
        held.close()
        if head.poll() is None:
            head.kill()
        for pid in _ray_processes(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
