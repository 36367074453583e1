"""A local MLflow tracking server on a sqlite database or any SQLAlchemy backend (e.g. PostgreSQL), started
in the background and stopped by PID.

    python -m cluster.local.mlflow_server start --db out/mlflow/mlflow.db --port 5000
    python -m cluster.local.mlflow_server stop --db out/mlflow/mlflow.db
    python -m cluster.local.mlflow_server start --backend-store-uri postgresql+psycopg://postgres@127.0.0.1:5433/mlflow \
        --artifacts out/mlflow/mlartifacts --pid-file out/mlflow/mlflow-server.pid --port 5000
    python -m cluster.local.mlflow_server stop --pid-file out/mlflow/mlflow-server.pid

The server proxies artifacts (--serve-artifacts, stored under --artifacts, default <db dir>/mlartifacts),
so clients on other hosts upload over HTTP instead of needing the server's filesystem.
The PID file and log sit next to the database unless --pid-file is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cluster.local.procs import ServiceError, pid_alive, spawn_detached, stop_by_pid_file, wait_until

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class MlflowServer:
    pid: int
    url: str
    pid_file: Path
    log_path: Path


def default_pid_file(db: Path) -> Path:
    return db.resolve().parent / "mlflow-server.pid"


def health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def server_argv(backend_uri: str, artifacts: Path, host: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts",
        "--host", host, "--port", str(port),
        "--workers", str(workers),
    ]


def start_server(db: str | Path | None = None, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST,
                 artifacts: str | Path | None = None, pid_file: str | Path | None = None,
                 workers: int = 1, timeout_s: float = START_TIMEOUT_S,
                 backend_uri: str | None = None, env: dict[str, str] | None = None) -> MlflowServer:
    """Start `mlflow server` detached and return once GET /health answers 200. The backend is the sqlite
    file `db`, or `backend_uri` (then `artifacts` and `pid_file` say where its files go)."""
    if (db is None) == (backend_uri is None):
        raise ServiceError("give a sqlite database file or a backend store URI, not both or neither")
    if db is not None:
        db = Path(db).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        backend_uri = f"sqlite:///{db}"
        artifacts = Path(artifacts).resolve() if artifacts else db.parent / "mlartifacts"
        pid_file = Path(pid_file).resolve() if pid_file else default_pid_file(db)
    elif artifacts is None or pid_file is None:
        raise ServiceError(f"--backend-store-uri {backend_uri}: also give --artifacts and --pid-file")
    artifacts, pid_file = Path(artifacts).resolve(), Path(pid_file).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = pid_file.with_suffix(".log")
    url = f"http://{host}:{port}"
    if health_ok(url):
        raise ServiceError(f"{url} already answers; another server holds port {port}")
    env = {**os.environ, **(env or {}), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    proc = spawn_detached(server_argv(backend_uri, artifacts, host, port, workers), log_path, pid_file, env=env)
    try:
        wait_until(lambda: health_ok(url), timeout_s, f"mlflow server on {url}",
                   alive=lambda: pid_alive(proc.pid), log_path=log_path)
    except ServiceError:
        stop_by_pid_file(pid_file, expect_in_cmdline="mlflow")
        raise
    return MlflowServer(pid=proc.pid, url=url, pid_file=pid_file, log_path=log_path)


def stop_server(pid_file: str | Path) -> bool:
    """Stop the server recorded in pid_file; False when none was running."""
    return stop_by_pid_file(Path(pid_file), expect_in_cmdline="mlflow")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.local.mlflow_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the server in the background")
    backend = start.add_mutually_exclusive_group(required=True)
    backend.add_argument("--db", help="sqlite database file (created if missing)")
    backend.add_argument("--backend-store-uri", help="any MLflow backend store, e.g. "
                         "postgresql+psycopg://user@host:port/db (needs --artifacts and --pid-file)")
    start.add_argument("--port", type=int, default=DEFAULT_PORT)
    start.add_argument("--host", default=DEFAULT_HOST)
    start.add_argument("--artifacts", help="artifact store folder (default: <db dir>/mlartifacts)")
    start.add_argument("--pid-file", help="PID file (default: <db dir>/mlflow-server.pid)")
    start.add_argument("--workers", type=int, default=1, help="server worker processes")
    start.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for /health")
    stop = sub.add_parser("stop", help="stop the server started for this database")
    which = stop.add_mutually_exclusive_group(required=True)
    which.add_argument("--db", help="the database the server was started with")
    which.add_argument("--pid-file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.command == "start":
            server = start_server(args.db, args.port, args.host, args.artifacts, args.pid_file,
                                  args.workers, args.timeout, backend_uri=args.backend_store_uri)
            print(f"mlflow server ready at {server.url} (PID {server.pid}, log {server.log_path})")
            print(f"export MLFLOW_TRACKING_URI={server.url}")
            return 0
        pid_file = Path(args.pid_file) if args.pid_file else default_pid_file(Path(args.db))
        stopped = stop_server(pid_file)
        print(f"mlflow server {'stopped' if stopped else 'was not running'} ({pid_file})")
        return 0
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
