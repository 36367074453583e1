"""Experiment tracking: the rank-0 MLflow logger (run-id continuity, exactly-once metrics, an outbox for
server outages), its do-nothing twin, what a run records beside metrics, and `rtrain compare`.

mlflow and matplotlib are imported only when used, so importing this package is cheap.
"""

from rtrain.tracking.mlflow import MlflowTracker, build_tracker, flatten_params
from rtrain.tracking.null import TRACKER_STATE_VERSION, NullTracker, resumes_from_state, run_id_from_state
from rtrain.tracking.uri import TrackingError, resolve_tracking_uri

__all__ = [
    "TRACKER_STATE_VERSION", "MlflowTracker", "NullTracker", "TrackingError", "build_tracker",
    "flatten_params", "resolve_tracking_uri", "resumes_from_state", "run_id_from_state",
]
