"""The Ray launcher on real Ray: a Ray it starts itself, and an external head from cluster.local reached by
`python -m rtrain.launch` through RAY_ADDRESS; 2 CPU workers on gloo running the stand-in workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_launch_local import _raw, allreduce_worker

from cluster.local import ray_head
from cluster.local.procs import pid_alive
from rtrain.config import recipe_from_dict
from rtrain.launch import launch

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_ray_launcher_on_a_ray_it_starts(tmp_path):
    import ray

    raw = _raw(tmp_path, launcher="ray")
    summary = launch(recipe_from_dict(raw), worker_fn=allreduce_worker)
    assert summary == {"world_size": 2, "sum": 3.0, "source": "ray", "run": "standin",
                       "output_root": str(tmp_path / "runs")}
    assert (tmp_path / "runs" / "standin" / "ray").is_dir()  # Ray Train's storage_path under the run dir
    assert not ray.is_initialized()  # the launcher shut down the Ray it started


@pytest.fixture
def head(port):
    handle = ray_head.start_head(port=port, num_cpus=2)
    try:
        yield handle
    finally:
        ray_head.stop_head(handle.pid_file)


def _launch_cli(recipe: Path, worker: str, address: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "rtrain.launch", str(recipe), "--worker", worker],
                          capture_output=True, text=True, timeout=500, cwd=REPO, env=env)


def test_cli_on_an_external_head_then_stop_it_by_pid(head, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_raw(tmp_path, launcher="ray")))

    done = _launch_cli(recipe, "test_launch_local:allreduce_worker", head.address)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["source"], summary["world_size"], summary["sum"]) == ("ray", 2, 3.0)

    failed = _launch_cli(recipe, "test_launch_local:failing_worker", head.address)
    assert failed.returncode == 1
    assert "rank 1 failed" in failed.stderr and "boom on rank 1" in failed.stderr

    assert ray_head.stop_head(head.pid_file)
    assert not pid_alive(head.pid) and not head.pid_file.exists()

