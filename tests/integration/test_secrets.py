"""No credential is written down: the session's reference run (conftest.py) was launched with fsspec keys in
data.storage_options and a token in a tag's URL. None of those strings is in any file the run left (resolved
recipe, checkpoints' metadata, ledger, MLflow's sqlite store and artifacts, the console); what records the
recipe shows *** instead; the resolved recipe is readable by its owner only. Reading a recorded recipe back
drops the *** values (the environment or an override supplies the secret)."""

from __future__ import annotations

import stat

import pytest
import yaml
from ray_runs import SECRETS, mlflow_runs

from rtrain.config import load_recipe

pytestmark = [pytest.mark.integration]


def test_no_credential_in_anything_the_run_wrote(reference_run):
    files = [p for p in reference_run.out.rglob("*") if p.is_file()]
    assert any(p.name == "meta.json" for p in files) and any(p.name == "mlflow.db" for p in files)
    leaks = [(str(p), s) for p in files for s in SECRETS if s.encode() in p.read_bytes()]
    assert not leaks, leaks

    resolved = reference_run.out / reference_run.name / "resolved_recipe.yaml"
    assert stat.S_IMODE(resolved.stat().st_mode) == 0o600
    recorded = yaml.safe_load(resolved.read_text())
    assert recorded["data"]["storage_options"] == {"aws_access_key_id": "***", "aws_secret_access_key": "***"}
    assert recorded["tracking"]["tags"]["origin"] == "https://***@git.example/r.git"

    [run] = mlflow_runs(reference_run.out, "straight")
    assert run.data.params["data.storage_options.aws_secret_access_key"] == "***"
    assert run.data.tags["origin"] == "https://***@git.example/r.git"

    again = load_recipe(resolved)  # a record read back: the redacted values are gone, not "***"
    assert again.data.storage_options == {} and again.tracking.tags["origin"] == "https://git.example/r.git"
