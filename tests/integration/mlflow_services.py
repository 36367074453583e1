"""Real MLflow servers for the tracking tests: `mlflow server --serve-artifacts` on 127.0.0.1 with a sqlite or a
PostgreSQL backend store (Debian's postgresql, started in a temp dir with its own port; installed with apt when
missing), and what the tests read back from a run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.local import mlflow_server, postgres

PG_PACKAGES = ["postgresql"]


@dataclass(frozen=True)
class Server:
    backend: str
    url: str
    pid_file: Path
    root: Path
    pg: postgres.LocalPostgres | None = None


def _postgres_missing_reason() -> str | None:
    """Install PostgreSQL if missing; the reason it cannot be, else None."""
    if postgres.bin_dir() is not None:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "PostgreSQL is not installed and apt-get as root is unavailable"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                                  *PG_PACKAGES]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            return f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[-400:]}"
    return None if postgres.bin_dir() is not None else "postgres still missing after apt-get"


@contextmanager
def running_server(backend: str, port: int, pg_port: int, root: Path | None = None):
    """An MLflow server on 127.0.0.1:port over `backend` (sqlite | postgresql); everything stopped by PID after."""
    # Not under pytest's 0700 tmp folders: the postgres user must reach its data directory.
    root = Path(root or tempfile.mkdtemp(prefix=f"rtrain-mlflow-{backend}-"))
    root.chmod(0o755)
    pid_file = root / "mlflow-server.pid"
    pg = None
    try:
        if backend == "postgresql":
            reason = _postgres_missing_reason()
            if reason:
                warnings.warn(f"POSTGRESQL MLFLOW TESTS SKIPPED: {reason}")
                pytest.skip(f"PostgreSQL tests skipped: {reason}")
            pg = postgres.start_postgres(root / "pg", pg_port)
            server = mlflow_server.start_server(port=port, backend_uri=pg.mlflow_uri, env=pg.client_env,
                                                artifacts=root / "mlartifacts", pid_file=pid_file)
        else:
            server = mlflow_server.start_server(root / "mlflow.db", port=port, pid_file=pid_file)
        yield Server(backend, server.url, pid_file, root, pg)
    finally:
        mlflow_server.stop_server(pid_file)
        if pg is not None:
            postgres.stop_postgres(pg.root)
        shutil.rmtree(root, ignore_errors=True)


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def artifact_paths(client, run_id: str, folder: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, folder):
        found += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return found
