"""`rtrain reproduce degradation --quick`, for real: digits prepared by data_prep, plain-20 and ResNet-20 each a
`python -m rtrain.launch` subprocess into one sqlite MLflow experiment, then the table and the figure; a rerun
skips the finished runs; a rerun with other settings is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _reproduce(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtrain.cli", "reproduce", "degradation", "--quick",
                           "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def _runs(out: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    experiments = client.search_experiments()
    assert [e.name for e in experiments if e.name != "Default"] == ["degradation"]
    return client.search_runs([e.experiment_id for e in experiments])


@pytest.mark.slow
@pytest.mark.integration
def test_quick_reproduction_makes_runs_table_and_figure_and_a_rerun_skips_them(tmp_path):
    out = tmp_path / "degradation"
    done = _reproduce(out, "--epochs", "1")
    assert done.returncode == 0, done.stderr[-4000:]

    runs = _runs(out)
    assert sorted(r.info.run_name for r in runs) == ["plain20", "resnet20"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert 0.0 <= r.data.metrics["train/top1_error"] <= 1.0 and 0.0 <= r.data.metrics["val/top1_error"] <= 1.0
        assert r.data.params["model.name"] in ("cifar_plain20", "cifar_resnet20")

    table = (out / "degradation.md").read_text()
    assert "| plain-20 | 20 | none |" in table and "| ResNet-20 | 20 | A (identity) |" in table
    assert table in done.stdout
    pixels = np.asarray(Image.open(out / "degradation.png").convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 10

    again = _reproduce(out, "--epochs", "1")
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("finished earlier, skipped") == 2 and "rtrain.launch" not in again.stderr
    assert len(_runs(out)) == 2

    refused = _reproduce(out, "--epochs", "2")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"rtrain: {out}/runs/plain20/reproduce.json: run plain20 was made with other settings")
