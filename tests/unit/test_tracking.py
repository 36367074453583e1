"""MlflowTracker against a real sqlite backend: params, metrics, artifacts, resume continuity, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rtrain.config import recipe_from_dict
from rtrain.tracking import (
    MlflowTracker,
    NullTracker,
    TrackingError,
    build_tracker,
    flatten_params,
    resolve_tracking_uri,
    run_id_from_state,
)
from rtrain.tracking.mlflow import PARAM_VALUE_LIMIT


def _recipe(uri: str, experiment: str, **sections):
    raw = {"run": {"name": "tiny"}, "tracking": {"uri": uri, "experiment": experiment, "tags": {"team": "vision"}}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return recipe_from_dict(raw)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_flatten_params_dotted_stringified_and_capped():
    flat = flatten_params({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "long": "x" * 2000, "t": (1, 2)})
    assert flat["a.b"] == "1" and flat["a.c"] == "[1, 2]" and flat["a.d"] == "None" and flat["a.e"] == "{}"
    assert flat["t"] == "[1, 2]"
    assert len(flat["long"]) == PARAM_VALUE_LIMIT and flat["long"].endswith("[truncated]")


def test_null_tracker_accepts_everything():
    tracker = NullTracker()
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=3)
    tracker.log_text("x", "x.txt")
    tracker.log_artifacts("/nonexistent")
    tracker.set_tags({"k": "v"})
    tracker.finish("FAILED")
    assert tracker.run_id is None
    assert tracker.state_dict() == {"version": 2, "run_id": None, "resumes": 0}


def test_only_rank_zero_with_tracking_enabled_gets_mlflow(db_uri):
    assert isinstance(build_tracker(_recipe(db_uri, "ranks"), rank=1), NullTracker)
    disabled = _recipe(db_uri, "ranks", tracking={"enabled": False})
    assert isinstance(build_tracker(disabled, rank=0), NullTracker)


def test_recipe_params_text_and_metrics_land_in_the_run(db_uri, client, tmp_path):
    recipe = _recipe(db_uri, "logging", optim={"lr": 0.2, "base_lr_per_256": None})
    tracker = build_tracker(recipe, rank=0)
    tracker.log_metrics({"train/loss": 2.5, "lr": 0.2}, step=10)
    tracker.log_metrics({"train/loss": 1.5}, step=20)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "weights.txt").write_text("w")
    tracker.log_artifacts(tmp_path / "ckpt", "checkpoints/step-20")
    tracker.finish()

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["optim.lr"] == "0.2" and run.data.params["dist.num_workers"] == "1"
    assert run.data.tags["team"] == "vision"
    assert _history(client, tracker.run_id, "train/loss") == [(10, 2.5), (20, 1.5)]
    recipe_file = Path(client.download_artifacts(tracker.run_id, "recipe.yaml", str(tmp_path / "dl")))
    assert yaml.safe_load(recipe_file.read_text()) == recipe.model_dump(mode="json")
    names = [f.path for f in client.list_artifacts(tracker.run_id, "checkpoints/step-20")]
    assert names == ["checkpoints/step-20/weights.txt"]


def test_resume_keeps_one_run_and_one_metric_history(db_uri, client):
    recipe = _recipe(db_uri, "resume")
    first = build_tracker(recipe, rank=0)
    first.log_metrics({"loss": 3.0}, step=1)
    first.log_metrics({"loss": 2.0}, step=2)
    state = first.state_dict()  # what the checkpoint stores; the process then dies without finish()

    resumed = build_tracker(recipe.with_overrides(["train.epochs=120"]), rank=0, resume_state=state)
    assert resumed.run_id == first.run_id
    assert client.get_run(resumed.run_id).info.status == "RUNNING"
    resumed.log_metrics({"loss": 1.0}, step=3)
    resumed.finish()

    run = client.get_run(first.run_id)
    assert _history(client, first.run_id, "loss") == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert run.data.params["train.epochs"] == "90.0"  # params are immutable in MLflow ...
    assert run.data.tags["rtrain.changed_on_resume.train.epochs"] == "120.0"  # ... the change is a tag
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_of_a_run_missing_from_the_backend_starts_a_new_one(db_uri, client):
    tracker = MlflowTracker(db_uri, "missing", "r", run_id="0123456789abcdef0123456789abcdef")
    assert tracker.run_id != "0123456789abcdef0123456789abcdef"
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["rtrain.previous_run_id"] == "0123456789abcdef0123456789abcdef"
    tracker.finish()


def test_context_manager_marks_failed_runs(db_uri, client):
    with pytest.raises(RuntimeError):
        with MlflowTracker(db_uri, "ctx", "r") as tracker:
            raise RuntimeError("diverged")
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_state_round_trip_and_bad_state():
    assert run_id_from_state({"version": 1, "run_id": "abc"}) == "abc"
    assert run_id_from_state(None) is None
    with pytest.raises(TrackingError, match="tracker state: unsupported version 7"):
        run_id_from_state({"version": 7, "run_id": "abc"})


def test_bad_status_and_missing_artifact_dir_are_named(db_uri, tmp_path):
    tracker = MlflowTracker(db_uri, "errors", "r")
    with pytest.raises(TrackingError, match="run status 'DONE'"):
        tracker.finish("DONE")
    with pytest.raises(TrackingError, match=f"artifact folder {tmp_path / 'nope'}"):
        tracker.log_artifacts(tmp_path / "nope")
    tracker.finish()


def test_relative_sqlite_uri_is_pinned_to_cwd_with_artifacts_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///out/demo/mlflow.db") == f"sqlite:///{tmp_path}/out/demo/mlflow.db"
    assert (tmp_path / "out" / "demo").is_dir()
    tracker = MlflowTracker("sqlite:///out/demo/mlflow.db", "relative", "r")
    tracker.log_text("hello", "notes/hello.txt")
    tracker.finish()
    logged = list((tmp_path / "out" / "demo" / "mlartifacts").rglob("hello.txt"))
    assert [p.read_text() for p in logged] == ["hello"]
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("uri", ["mlruns", "file:///tmp/mlruns"])
def test_file_store_is_refused_with_advice(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match="use sqlite:///"):
        resolve_tracking_uri(uri)


def test_http_uri_passes_through():
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
