"""Runs started together against one fresh sqlite MLflow store all track: three processes, released at the
same instant, each open rtrain's tracker (MLflow creating the store's tables), log and finish a run. Without
the store lock this failed in most tries here ("table experiments already exists", "duplicate column name",
an alembic row mismatch: MLflow migrating one file from several processes)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from ray_runs import REPO

pytestmark = pytest.mark.integration

TOGETHER = """
import sys, time
from rtrain.tracking.mlflow import MlflowTracker
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
tracker = MlflowTracker(sys.argv[1], "together", sys.argv[3])
tracker.log_metrics({"train/loss": 1.0}, 1)
tracker.finish()
print(tracker.run_id)
"""


def test_three_runs_started_at_once_on_a_fresh_sqlite_store_all_track(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.time() + 8  # every process has imported MLflow by then
    procs = [subprocess.Popen([sys.executable, "-c", TOGETHER, uri, str(start), f"run-{i}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run-0", "run-1", "run-2"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["train/loss"] == 1.0 for r in runs)
