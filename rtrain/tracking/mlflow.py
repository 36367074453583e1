"""Rank-0 MLflow logger with run-id continuity, and a do-nothing twin for every other rank.

Uses MlflowClient with an explicit run id rather than the fluent `mlflow.start_run` API, whose active-run
stack is module-level state. mlflow is imported lazily so `import rtrain.tracking` stays cheap.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtrain._errors import ExpectedError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from rtrain.config import Recipe

TRACKER_STATE_VERSION = 1
# MLflow 3 accepts 6000 characters, older servers 500: stay within the smaller so any server takes them.
PARAM_VALUE_LIMIT = 500
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
ARTIFACT_DIR_NAME = "mlartifacts"
# Tags recording how the run came to be; logged alongside recipe.tracking.tags.
TAG_PREVIOUS_RUN = "rtrain.previous_run_id"
TAG_CHANGED_ON_RESUME = "rtrain.changed_on_resume."


class TrackingError(ExpectedError, RuntimeError):
    """Tracking cannot start or continue; the message names the URI, experiment or run."""


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"}; values stringified and cut to PARAM_VALUE_LIMIT characters."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = _param_value(value)
    return flat


def _param_value(value: Any) -> str:
    text = str(list(value)) if isinstance(value, tuple) else str(value)
    if len(text) <= PARAM_VALUE_LIMIT:
        return text
    marker = "...[truncated]"
    return text[: PARAM_VALUE_LIMIT - len(marker)] + marker


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path absolute (against the cwd) and create its folder.

    Ray Train workers run in their own working directory, so a relative path must be pinned down by
    whoever reads the recipe first. The plain file store is refused with a message saying what to use.
    """
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        path = path if path.is_absolute() else Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingError(
            f"tracking.uri={uri!r}: MLflow's file store is disabled; use sqlite:///path/to/mlflow.db "
            "or an http(s):// tracking server")
    return uri


def default_artifact_location(uri: str) -> str | None:
    """Artifacts next to a sqlite database (MLflow would otherwise write ./mlruns); servers pick their own."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / ARTIFACT_DIR_NAME)
    return None


class NullTracker:
    """The tracker of ranks != 0 and of tracking.enabled=false: accepts everything, records nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"version": TRACKER_STATE_VERSION, "run_id": None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        run_id_from_state(state)  # checks the version; there is no run to continue

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


class MlflowTracker:
    """One MLflow run, created fresh or resumed by id so a restarted training keeps one metric history."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(uri)
        self._client: MlflowClient = MlflowClient(tracking_uri=self.uri)
        self._finished = False
        tags = dict(tags or {})
        if run_id is not None and self._run_exists(run_id):
            self._run_id = run_id
            self._client.update_run(run_id, status="RUNNING")
            if tags:
                self.set_tags(tags)
            return
        if run_id is not None:
            print(f"rtrain: MLflow run {run_id} not found at {self.uri}; starting a new run", file=sys.stderr)
            tags[TAG_PREVIOUS_RUN] = run_id
        experiment_id = self._experiment_id(experiment)
        run = self._client.create_run(experiment_id, run_name=run_name, tags=tags)
        self._run_id = run.info.run_id

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], uri: str, experiment: str, run_name: str,
                        tags: Mapping[str, str] | None = None) -> MlflowTracker:
        """Resume the run a checkpoint recorded (a state without a run id starts a new run)."""
        return cls(uri, experiment, run_name, tags, run_id=run_id_from_state(state))

    @property
    def run_id(self) -> str:
        return self._run_id

    def _run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise TrackingError(f"tracking.experiment={name!r} is deleted at {self.uri}; restore or rename it")
            return found.experiment_id
        try:
            return self._client.create_experiment(name, artifact_location=default_artifact_location(self.uri))
        except MlflowException:
            # Another process may have created it between the lookup and the create.
            found = self._client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; on a resumed run, a value that differs from the logged one (MLflow params are
        immutable) is recorded as a `rtrain.changed_on_resume.<key>` tag instead."""
        from mlflow.entities import Param

        logged = self._client.get_run(self._run_id).data.params
        fresh, changed = {}, {}
        for key, value in params.items():
            text = _param_value(value)
            if key not in logged:
                fresh[key] = text
            elif logged[key] != text:
                changed[TAG_CHANGED_ON_RESUME + key] = text
        for batch in _chunks(sorted(fresh.items()), PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=[Param(k, v) for k, v in batch])
        if changed:
            self.set_tags(changed)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        entries = [Metric(key, float(value), now_ms, int(step)) for key, value in metrics.items()]
        for batch in _chunks(entries, METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self._run_id, text, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if not Path(local_dir).is_dir():
            raise TrackingError(f"artifact folder {local_dir} does not exist")
        self._client.log_artifacts(self._run_id, str(local_dir), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(key, str(value)) for key, value in tags.items()]
        for batch in _chunks(entries, PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=batch)

    def finish(self, status: str = "FINISHED") -> None:
        if status not in TERMINAL_STATUSES:
            raise TrackingError(f"run status {status!r}: expected one of {', '.join(TERMINAL_STATUSES)}")
        if not self._finished:
            self._client.set_terminated(self._run_id, status=status)
            self._finished = True

    def state_dict(self) -> dict[str, Any]:
        return {"version": TRACKER_STATE_VERSION, "run_id": self._run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """An MLflow run is chosen when the tracker opens it (build_tracker(resume_state=...)); loading a
        state afterwards only confirms it names this run."""
        run_id = run_id_from_state(state)
        if run_id is not None and run_id != self._run_id:
            raise TrackingError(f"tracker state names MLflow run {run_id}, this tracker writes {self._run_id}; "
                                "pass the state to build_tracker(resume_state=...) to continue that run")

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def run_id_from_state(state: Mapping[str, Any] | None) -> str | None:
    if state is None:
        return None
    if not isinstance(state, Mapping) or state.get("version") != TRACKER_STATE_VERSION:
        version = state.get("version") if isinstance(state, Mapping) else type(state).__name__
        raise TrackingError(f"tracker state: unsupported version {version!r} (expected {TRACKER_STATE_VERSION})")
    return state.get("run_id")


def build_tracker(recipe: Recipe, rank: int, resume_state: Mapping[str, Any] | None = None,
                  log_recipe: bool = True) -> MlflowTracker | NullTracker:
    """Rank 0 with tracking enabled gets an MLflow run (resumed from `resume_state` when it names one),
    with the flattened recipe as params and the resolved YAML as `recipe.yaml`; everyone else a NullTracker."""
    tracking = recipe.tracking
    if rank != 0 or not tracking.enabled:
        return NullTracker()
    tracker = MlflowTracker(tracking.uri, tracking.experiment, recipe.run.name, tracking.tags,
                            run_id=run_id_from_state(resume_state))
    if log_recipe:
        tracker.log_params(flatten_params(recipe.model_dump(mode="json")))
        tracker.log_text(recipe.to_yaml(), "recipe.yaml")
    return tracker
