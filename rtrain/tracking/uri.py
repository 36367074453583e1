"""Where a run is tracked: a sqlite path pinned down, the file store refused, artifacts beside the database."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rtrain._errors import ExpectedError

ARTIFACT_DIR_NAME = "mlartifacts"


class TrackingError(ExpectedError, RuntimeError):
    """Tracking cannot start or continue; the message names the URI, experiment or run."""


def resolve_tracking_uri(uri: str, create: bool = True) -> str:
    """Make a relative sqlite path absolute (against the cwd) and create its folder (unless not `create`).

    Ray Train workers run in their own working directory, so a relative path must be pinned down by
    whoever reads the recipe first. The plain file store is refused with a message saying what to use.
    """
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        path = path if path.is_absolute() else Path.cwd() / path
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingError(
            f"tracking.uri={uri!r}: MLflow's file store is disabled; use sqlite:///path/to/mlflow.db "
            "or an http(s):// tracking server")
    return uri


@contextmanager
def embedded_store_lock(uri: str) -> Iterator[None]:
    """One process at a time creates or migrates an embedded (sqlite) store: MLflow's table creation from two
    processes at once fails ("No such index: ..."), and runs started together (a sweep, `rtrain compare`'s
    candidates) share one file. A lock file beside the database (flock: released however the holder ends)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///"):] + ".rtrain-lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def mlflow_client(uri: str):
    """An MlflowClient whose stores are built now, under embedded_store_lock: a new sqlite store's tables are
    made by one process at a time."""
    from mlflow.tracking import MlflowClient

    with embedded_store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        client._tracking_client.store  # noqa: B018 - builds (creates/migrates) the store now
    return client


def default_artifact_location(uri: str) -> str | None:
    """Artifacts next to a sqlite database (MLflow would otherwise write ./mlruns); servers pick their own."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / ARTIFACT_DIR_NAME)
    return None
