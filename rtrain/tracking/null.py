"""The tracker of ranks != 0 and of tracking.enabled=false."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rtrain.tracking.uri import TrackingError

TRACKER_STATE_VERSION = 2
READABLE_STATE_VERSIONS = (1, 2)  # version 1 had no resume count
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


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

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED", error: BaseException | str | None = None) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"version": TRACKER_STATE_VERSION, "run_id": None, "resumes": 0}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        run_id_from_state(state)  # checks the version; there is no run to continue

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def run_id_from_state(state: Mapping[str, Any] | None) -> str | None:
    if state is None:
        return None
    if not isinstance(state, Mapping) or state.get("version") not in READABLE_STATE_VERSIONS:
        version = state.get("version") if isinstance(state, Mapping) else type(state).__name__
        raise TrackingError(f"tracker state: unsupported version {version!r} (expected one of {READABLE_STATE_VERSIONS})")
    return state.get("run_id")


def resumes_from_state(state: Mapping[str, Any] | None) -> int:
    run_id_from_state(state)  # checks the version
    return int(state.get("resumes", 0)) if state else 0
