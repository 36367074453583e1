"""Rank-0 MLflow logger with run-id continuity and exactly-once metrics, and a do-nothing twin for every other rank.

Uses MlflowClient with an explicit run id rather than the fluent `mlflow.start_run` API, whose active-run
stack is module-level state. mlflow is imported lazily so `import rtrain.tracking` stays cheap.

Exactly once: a resumed run re-trains the steps between its checkpoint and the interruption, and some of
them were logged already. When the tracker opens an existing run it reads, per metric key, the highest step
the run holds (MLflow keeps each key's latest metric at its largest step) and the steps still waiting in the
outbox; from then on a (key, step) at or below that mark is not logged again. Re-trained steps are
bit-identical on the same world size, so the value that is kept is the value that would have been logged.

Outages: a record the server does not take (connection refused, timeouts, 5xx) goes to the run directory's
outbox (outbox.py) and training goes on; see `_deliver`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtrain.config.redact import redact_url
from rtrain.tracking.null import (
    TERMINAL_STATUSES,
    TRACKER_STATE_VERSION,
    NullTracker,
    resumes_from_state,
    run_id_from_state,
)
from rtrain.tracking.outbox import OUTBOX_NAME, Outbox
from rtrain.tracking.run_info import TAG_ERROR, error_text, http_environment
from rtrain.tracking.uri import TrackingError, default_artifact_location, mlflow_client, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from rtrain.config import Recipe

# MLflow 3 accepts 6000 characters, older servers 500: stay within the smaller so any server takes them.
PARAM_VALUE_LIMIT = 500
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
OUTBOX_DIR = "tracking"  # under the run directory: the outbox and the files the tracker sends
# Tags recording how the run came to be; logged alongside recipe.tracking.tags.
TAG_PREVIOUS_RUN = "rtrain.previous_run_id"
TAG_CHANGED_ON_RESUME = "rtrain.changed_on_resume."
TAG_RESUMES = "rtrain.resumes"
TAG_RESUME = "rtrain.resume."  # + the resume's number: at which step, after what, on how many ranks
# MLflow error codes that mean "the server is not there or not well now" (a client-side connection error
# arrives as INTERNAL_ERROR); anything else (a bad value, a missing run) is a real error.
OUTAGE_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ENDPOINT_NOT_FOUND")

log = logging.getLogger("rtrain.tracking")


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


def is_outage(exc: BaseException) -> bool:
    """The server is away or unwell (so the record waits in the outbox), not a record it refuses."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in OUTAGE_CODES
    return isinstance(exc, OSError)


class MlflowTracker:
    """One MLflow run, created fresh or resumed by id so a restarted training keeps one metric history in
    which every (metric, step) appears once."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None, *, outbox: str | Path | None = None, reconnect_every_s: float = 60.0,
                 resumes: int = 0, resume_step: int | None = None,
                 system_metrics_interval_s: float | None = None,
                 artifact_roots: tuple[str | Path, ...] | None = None) -> None:

        # The only folders whose files an outbox record (a file anyone could edit) may have uploaded;
        # None = no limit (a tracker outside a run).
        self._artifact_roots = None if artifact_roots is None else [  # a bucket's checkpoints are no folder here
            Path(r).resolve() for r in artifact_roots if "://" not in str(r)]
        self.uri = resolve_tracking_uri(uri)
        self._client: MlflowClient = mlflow_client(self.uri)
        self._finished = False
        self._outbox = Outbox(outbox) if outbox is not None else None
        self._reconnect_every_s = reconnect_every_s
        self._retry_at: float | None = None  # while the server is away: when to try it again (monotonic)
        self._logged_through: dict[str, int] = {}  # per metric key, the highest step the run holds
        self._resumes = resumes
        self._monitor = None
        tags = dict(tags or {})
        if run_id is not None and (previous := self._existing_run(run_id)) is not None:
            self._run_id = run_id
            self._reopen(previous.info.status, tags, resume_step)
        else:
            if run_id is not None:
                log.warning("MLflow run %s not found at %s; starting a new run", run_id, self.uri)
                tags[TAG_PREVIOUS_RUN] = run_id
            run = self._client.create_run(self._experiment_id(experiment), run_name=run_name, tags=tags)
            self._run_id = run.info.run_id
            self._resumes = 0
            self._try_flush()  # what an earlier run in this run directory could not send
        if system_metrics_interval_s:
            self._start_system_metrics(system_metrics_interval_s)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], uri: str, experiment: str, run_name: str,
                        tags: Mapping[str, str] | None = None) -> MlflowTracker:
        """Resume the run a checkpoint recorded (a state without a run id starts a new run)."""
        return cls(uri, experiment, run_name, tags, run_id=run_id_from_state(state),
                   resumes=resumes_from_state(state))

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def logged_through(self) -> dict[str, int]:
        """Per metric key, the highest step logged (or waiting in the outbox): lower steps are not logged again."""
        return dict(self._logged_through)

    def _existing_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_run(run_id)
        except MlflowException as exc:
            if is_outage(exc):
                raise TrackingError(f"tracking.uri={self.uri}: cannot read MLflow run {run_id}: "
                                    f"{' '.join(str(exc).split())[:300]}") from exc
            return None

    def _reopen(self, previous_status: str, tags: dict[str, str], resume_step: int | None) -> None:
        """Continue the run: send what waits in the outbox, learn what it holds, record the resume."""
        self._try_flush()
        self._client.update_run(self._run_id, status="RUNNING")
        self._logged_through = self._steps_in_run()
        if self._outbox is not None:
            for key, step in self._outbox.pending_steps(self._run_id).items():
                self._logged_through[key] = max(step, self._logged_through.get(key, -1))
        self._resumes += 1
        where = f"from the checkpoint of step {resume_step}" if resume_step is not None else "from a checkpoint"
        last = max(self._logged_through.values(), default=None)
        tags[TAG_RESUMES] = str(self._resumes)
        tags[TAG_RESUME + str(self._resumes)] = (
            f"{where}; the run was {previous_status}; metrics logged through step {last} are not logged again"
            + (f"; world size {tags['rtrain.world_size']}" if "rtrain.world_size" in tags else ""))
        self.set_tags(tags)

    def _steps_in_run(self) -> dict[str, int]:
        run = self._client.get_run(self._run_id)
        # The run's latest metric per key is the one at its largest step (MLflow compares step first), so one
        # get_run answers what get_metric_history would, without reading every value back.
        latest = getattr(run.data, "_metric_objs", None)
        if latest is not None:
            return {m.key: int(m.step) for m in latest}
        return {key: max(int(m.step) for m in self._client.get_metric_history(self._run_id, key))
                for key in run.data.metrics}

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

    def _start_system_metrics(self, interval_s: float) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self._run_id, sampling_interval=interval_s, node_id=socket.gethostname(),
                                             resume_logging=self._resumes > 0, tracking_uri=self.uri)
        self._monitor.start()

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
        """Log the metrics whose (key, step) the run does not hold yet; the others are dropped."""
        step = int(step)
        fresh = {key: float(value) for key, value in metrics.items() if step > self._logged_through.get(key, -1)}
        if not fresh:
            return
        for key in fresh:
            self._logged_through[key] = step
        self._deliver({"kind": "metrics", "run_id": self._run_id, "step": step,
                       "timestamp": int(time.time() * 1000), "metrics": fresh})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._deliver({"kind": "text", "run_id": self._run_id, "text": text, "artifact_file": artifact_file})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """A file or folder that stays where it is until it was sent (it is read when sent)."""
        if not Path(local_path).exists():
            raise TrackingError(f"artifact {local_path} does not exist")
        self._deliver({"kind": "artifact", "run_id": self._run_id, "path": str(Path(local_path).resolve()),
                       "artifact_path": artifact_path})

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if not Path(local_dir).is_dir():
            raise TrackingError(f"artifact folder {local_dir} does not exist")
        self.log_artifact(local_dir, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._deliver({"kind": "tags", "run_id": self._run_id, "tags": {k: str(v) for k, v in tags.items()}})

    def _deliver(self, record: dict[str, Any]) -> None:
        """Send now; while the server is away, queue in the outbox and try again every reconnect_every_s.

        Without an outbox (a tracker not built for a run directory) a failure raises as it is."""
        if self._outbox is None:
            self._send(record)
            return
        if self._retry_at is not None and time.monotonic() < self._retry_at:
            self._outbox.append(record)
            return
        try:
            self._outbox.flush(self._send_kept)
            self._send(record)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._went_away(exc)
            self._outbox.append(record)
            return
        if self._retry_at is not None:
            log.warning("MLflow at %s answers again; the records kept meanwhile were sent", self.uri)
            self._retry_at = None

    def _went_away(self, exc: BaseException) -> None:
        if self._retry_at is None:
            log.warning("MLflow at %s does not answer (%s); training goes on, records wait in %s and are sent "
                        "when it answers (tried every %g s, at the end and on resume)", self.uri,
                        " ".join(str(exc).split())[:200], self._outbox.path, self._reconnect_every_s)
        self._retry_at = time.monotonic() + self._reconnect_every_s

    def _try_flush(self) -> bool:
        if self._outbox is None:
            return True
        try:
            sent = self._outbox.flush(self._send_kept)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._went_away(exc)
            return False
        if sent:
            log.info("sent %d records kept in %s to MLflow at %s", sent, self._outbox.path, self.uri)
        self._retry_at = None
        return True

    def _send_kept(self, record: Mapping[str, Any]) -> None:
        """A record from the outbox, a file in the run directory that anyone with access could have edited."""
        self._send(record, kept=True)

    def _send(self, record: Mapping[str, Any], kept: bool = False) -> None:
        from mlflow.entities import Metric, RunTag

        run_id, kind = record["run_id"], record["kind"]
        if kind == "metrics":
            entries = [Metric(k, float(v), int(record["timestamp"]), int(record["step"]))
                       for k, v in record["metrics"].items()]
            for batch in _chunks(entries, METRICS_PER_BATCH):
                self._client.log_batch(run_id, metrics=batch)
        elif kind == "tags":
            for batch in _chunks([RunTag(k, v) for k, v in record["tags"].items()], PARAMS_PER_BATCH):
                self._client.log_batch(run_id, tags=batch)
        elif kind == "text":
            self._client.log_text(run_id, record["text"], record["artifact_file"])
        elif kind == "artifact":
            self._send_artifact(run_id, Path(record["path"]), record.get("artifact_path"), kept)
        else:
            raise TrackingError(f"outbox record of unknown kind {kind!r}")

    def _send_artifact(self, run_id: str, path: Path, artifact_path: str | None, kept: bool = False) -> None:
        real = path.resolve()
        roots = self._artifact_roots if kept else None  # what this process logs itself is sent as asked
        if roots is not None and not any(real.is_relative_to(r) for r in roots):
            log.warning("artifact %s is outside the run's folders (%s); not sent to MLflow run %s", path,
                        ", ".join(map(str, self._artifact_roots)), run_id)
            return
        if path.is_dir():
            self._client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(run_id, str(path), artifact_path)
        else:  # e.g. a checkpoint pruned while the server was away
            log.warning("artifact %s is gone; not sent to MLflow run %s", path, run_id)

    def finish(self, status: str = "FINISHED", error: BaseException | str | None = None) -> None:
        """Close the run (FINISHED, FAILED with the error as the `rtrain.error` tag, KILLED when preempted).
        A server that is away at the end leaves the run RUNNING and the records in the outbox: rerunning the
        same command sends them and closes it."""
        if status not in TERMINAL_STATUSES:
            raise TrackingError(f"run status {status!r}: expected one of {', '.join(TERMINAL_STATUSES)}")
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            self._monitor.finish()
        if error is not None:
            self.set_tags({TAG_ERROR: error_text(error)})
        self._retry_at = None  # the end is a moment to try the server again
        if not self._try_flush():
            log.warning("MLflow at %s is unreachable at the end of run %s: %d records wait in %s; rerun the "
                        "same command when it answers to send them", self.uri, self._run_id,
                        len(self._outbox), self._outbox.path)
            return
        self._client.set_terminated(self._run_id, status=status)

    def state_dict(self) -> dict[str, Any]:
        return {"version": TRACKER_STATE_VERSION, "run_id": self._run_id, "resumes": self._resumes}

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
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED", error=exc)


def build_tracker(recipe: Recipe, rank: int, resume_state: Mapping[str, Any] | None = None,
                  log_recipe: bool = True, run_tags: Mapping[str, str] | None = None,
                  resume_step: int | None = None) -> MlflowTracker | NullTracker:
    """Rank 0 with tracking enabled gets an MLflow run (resumed from `resume_state` when it names one),
    with the flattened recipe as params and the resolved YAML as `recipe.yaml`; everyone else a NullTracker.
    `run_tags` describe this start (run_info.describe_run); the recipe's HTTP limits are put in force here."""
    tracking = recipe.tracking
    if rank != 0 or not tracking.enabled:
        return NullTracker()
    os.environ.update(http_environment(tracking))  # MLflow reads them on every request it makes
    tags = {key: redact_url(str(value)) for key, value in {**tracking.tags, **(run_tags or {})}.items()}
    tracker = MlflowTracker(
        tracking.uri, tracking.experiment, recipe.run.name, tags,
        run_id=run_id_from_state(resume_state), outbox=recipe.run_dir / OUTBOX_DIR / OUTBOX_NAME,
        reconnect_every_s=tracking.reconnect_every_s, resumes=resumes_from_state(resume_state),
        resume_step=resume_step, artifact_roots=(recipe.run_dir, recipe.checkpoint_dir),
        system_metrics_interval_s=tracking.system_metrics_interval_s if tracking.system_metrics else None)
    if log_recipe:
        tracker.log_params(flatten_params(recipe.record()))  # credentials redacted
        tracker.log_text(recipe.to_yaml(), "recipe.yaml")
    return tracker
