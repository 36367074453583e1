"""A real `mlflow server` on sqlite at 127.0.0.1, started and stopped through cluster.local's CLI, logged to
over HTTP by the rank-0 tracker. One server start (tens of seconds on a small machine) serves every check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import mlflow_server
from cluster.local.procs import ServiceError, pid_alive, read_pid
from rtrain.config import recipe_from_dict
from rtrain.tracking import build_tracker

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(mlflow_server.__file__).resolve().parents[2]


def _server_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.local.mlflow_server", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def _log_and_resume_over_http(url: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    recipe = recipe_from_dict({"run": {"name": "over-http"},
                               "tracking": {"uri": url, "experiment": "server-test"}})
    tracker = build_tracker(recipe, rank=0)
    tracker.log_metrics({"loss": 0.5}, step=7)
    resumed = build_tracker(recipe, rank=0, resume_state=tracker.state_dict())
    resumed.log_metrics({"loss": 0.25}, step=8)
    resumed.finish()

    client = MlflowClient(tracking_uri=url)
    run = client.get_run(tracker.run_id)
    assert resumed.run_id == tracker.run_id
    assert run.info.status == "FINISHED" and run.data.params["run.name"] == "over-http"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(7, 0.5), (8, 0.25)]
    # The server proxies artifacts into its own folder beside the database.
    stored = list((tmp_path / "db" / "mlartifacts").rglob("recipe.yaml"))
    assert len(stored) == 1 and "over-http" in stored[0].read_text()


def test_server_from_cli_serves_tracking_and_stops_by_pid(tmp_path, port):
    db = tmp_path / "db" / "mlflow.db"
    url = f"http://127.0.0.1:{port}"
    pid_file = mlflow_server.default_pid_file(db)
    started = _server_cli("start", "--db", str(db), "--port", str(port))
    try:
        assert started.returncode == 0, started.stderr
        assert url in started.stdout and mlflow_server.health_ok(url)
        pid = read_pid(pid_file)
        assert pid is not None and pid_alive(pid)

        _log_and_resume_over_http(url, tmp_path)

        with pytest.raises(ServiceError, match="already answers"):
            mlflow_server.start_server(tmp_path / "other.db", port=port)
    finally:
        stopped = _server_cli("stop", "--db", str(db))
    assert stopped.returncode == 0 and "mlflow server stopped" in stopped.stdout
    assert not pid_alive(pid) and not pid_file.exists()
    assert not mlflow_server.health_ok(url)
    assert "was not running" in _server_cli("stop", "--db", str(db)).stdout


def test_service_dying_at_start_is_reported_with_its_log(tmp_path):
    """The start-up watch of cluster.local (shared by the MLflow and Ray scripts) on a real process that dies."""
    from cluster.local.procs import spawn_detached, stop_by_pid_file, wait_until

    log, pid_file = tmp_path / "svc.log", tmp_path / "svc.pid"
    proc = spawn_detached([sys.executable, "-c", "import sys; print('bad option --x'); sys.exit(3)"], log, pid_file)
    with pytest.raises(ServiceError, match="(?s)exited during start-up.*bad option --x"):
        wait_until(lambda: False, 60, "svc", alive=lambda: pid_alive(proc.pid), log_path=log)
    assert not stop_by_pid_file(pid_file, expect_in_cmdline="python")
    assert not pid_file.exists()
