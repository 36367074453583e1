"""Experiment tracking: the rank-0 MLflow logger (run-id continuity) and its do-nothing twin.

mlflow itself is imported only when a tracker is built, so importing this package is cheap.
"""

from rtrain.tracking.mlflow import (
    TRACKER_STATE_VERSION,
    MlflowTracker,
    NullTracker,
    TrackingError,
    build_tracker,
    flatten_params,
    resolve_tracking_uri,
    run_id_from_state,
)

__all__ = [
    "TRACKER_STATE_VERSION", "MlflowTracker", "NullTracker", "TrackingError", "build_tracker",
    "flatten_params", "resolve_tracking_uri", "run_id_from_state",
]
