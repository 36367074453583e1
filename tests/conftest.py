"""Shared test set-up: quiet, local-only services and a few common fixtures."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args: str, timeout: float = 600, env: dict | None = None):
    """Run `python -m ...` from the repo root; raise with its output if it fails."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"python -m {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """Real handwritten digits (scikit-learn) -> ImageNet folders -> shards, through data_prep on Ray."""
    root = tmp_path_factory.mktemp("digits")
    run_module("data_prep.samples", "digits", "--out", str(root / "folders"))
    run_module("data_prep.imagenet", "--src", str(root / "folders"), "--out", str(root / "shards"),
               "--shard-size", "200", "--workers", "2", "--no-progress")
    return root / "shards"


@pytest.fixture(scope="module")
def db_uri(tmp_path_factory) -> str:
    """One database for the module: creating an MLflow schema costs seconds, experiments keep tests apart."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def client(db_uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=db_uri)
