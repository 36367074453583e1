"""The tracking server goes away mid-run: a real `mlflow server` (sqlite) stopped by PID while the 2-worker
quickstart trains. Training goes on and ends with exit 0 (bounded HTTP timeouts and retries, then the outbox);
what could not be sent waits in <run dir>/tracking/unsent.jsonl; once the server is back, rerunning the same
command sends it, every step's metrics exactly once, and closes the run FINISHED."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from testkit import free_port
from mlflow_services import artifact_paths, metric_steps, running_server
from ray_runs import REPO, launch_command, quickstart_overrides, wait_for

from cluster.local import mlflow_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 14
NAME = "outage"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _steps_logged(client) -> int:
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return max(metric_steps(client, runs[0].info.run_id, "train/loss"), default=0) if runs else 0


def test_server_stopped_mid_run_training_goes_on_and_rerun_delivers(digits_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    with running_server("sqlite", port, free_port()) as server:
        client = MlflowClient(tracking_uri=server.url)
        cmd = launch_command(quickstart_overrides(
            digits_shards, tmp_path, NAME, STEPS, "dist.launcher=local", "train.log_every_steps=1",
            "eval.every_epochs=1", "checkpoint.every_steps=4", f"tracking.uri={server.url}",
            f"tracking.experiment={NAME}", "tracking.http_timeout_s=5", "tracking.http_max_retries=1",
            "tracking.reconnect_every_s=5"))
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env(), start_new_session=True)
        try:
            wait_for(lambda: _steps_logged(client) >= 3 or proc.poll() is not None, 300, "3 logged steps")
            assert mlflow_server.stop_server(server.pid_file)  # by PID, mid-run
            _stdout, stderr = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
        assert proc.returncode == 0, stderr[-5000:]
        outbox = tmp_path / NAME / "tracking" / "unsent.jsonl"
        assert "does not answer" in stderr and f"records wait in {outbox}" in stderr
        kinds = {json.loads(line)["kind"] for line in outbox.read_text().splitlines()}
        assert {"metrics", "tags", "artifact"} <= kinds  # steps, checkpoint URIs, the final weights

        mlflow_server.start_server(server.root / "mlflow.db", port=port, pid_file=server.pid_file)
        rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
        assert rerun.returncode == 0, rerun.stderr[-5000:]

        experiment = client.get_experiment_by_name(NAME)
        [run] = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED"
        assert metric_steps(client, run.info.run_id, "train/loss") == list(range(1, STEPS + 1))
        assert metric_steps(client, run.info.run_id, "val/top1_error") == [11, STEPS]
        assert not outbox.exists()
        assert "model/state_dict.pt" in artifact_paths(client, run.info.run_id)
        assert run.data.tags[f"rtrain.checkpoint.step-{STEPS:09d}"].startswith("file://")
