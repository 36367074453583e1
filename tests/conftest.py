"""Shared test set-up: quiet, local-only services, a few common fixtures, and how `make test` spreads the suite
over pytest-xdist workers (whole modules per worker, the integration modules first)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from testkit import free_port, run_module, shared_once

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def port() -> int:
    return free_port()


def pytest_collection_modifyitems(config, items):
    """Integration modules first, then the 2-process tier, then unit tests: with whole modules handed to xdist
    workers in this order, the long ones start early and the short ones fill the gaps at the end."""
    tiers = {"integration": 0, "distributed": 1, "unit": 2}
    items.sort(key=lambda item: tiers.get(Path(str(item.path)).parent.name, 3))  # stable: file order kept


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """Real handwritten digits (scikit-learn) -> ImageNet folders -> shards, through data_prep on Ray."""
    def build(root: Path) -> None:
        run_module("data_prep.samples", "digits", "--out", str(root / "folders"))
        run_module("data_prep.imagenet", "--src", str(root / "folders"), "--out", str(root / "shards"),
                   "--shard-size", "200", "--workers", "2", "--no-progress")

    return shared_once(tmp_path_factory, "digits", build) / "shards"


@pytest.fixture(scope="module")
def db_uri(tmp_path_factory) -> str:
    """One database for the module: creating an MLflow schema costs seconds, experiments keep tests apart."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def client(db_uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=db_uri)
