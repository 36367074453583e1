"""A throw-away PostgreSQL server (Debian's postgresql package) for an MLflow server's backend store.

    python -m cluster.local.postgres start --dir /tmp/rtrain-pg --port 5433
    python -m cluster.local.mlflow_server start --backend-store-uri postgresql+psycopg://postgres@127.0.0.1:5433/mlflow \
        --artifacts /tmp/rtrain-pg/mlartifacts --pid-file /tmp/rtrain-pg/mlflow-server.pid --port 5000
    python -m cluster.local.postgres stop --dir /tmp/rtrain-pg

initdb into <dir>/data (trust authentication, listening on 127.0.0.1 only, its socket in <dir>), then one
`postgres` process started detached and stopped by PID, and a database `mlflow`. PostgreSQL refuses to run as
root: as root the server runs as the `postgres` user (setpriv, so the recorded PID is the server itself) and
<dir> is handed to that user, so <dir> must be reachable by it (not under a 0700 folder such as pytest's).
The driver is psycopg 3 (`postgresql+psycopg://`; the plain `postgresql://` would ask for psycopg2).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster.local.procs import ServiceError, pid_alive, port_open, spawn_detached, stop_by_pid_file, wait_until

DEFAULT_HOST = "127.0.0.1"
DATABASE = "mlflow"
START_TIMEOUT_S = 120.0
PACKAGES = ("postgresql",)


@dataclass(frozen=True)
class LocalPostgres:
    pid: int
    root: Path
    host: str
    port: int
    pid_file: Path
    log_path: Path

    @property
    def mlflow_uri(self) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{DATABASE}"


def bin_dir() -> Path | None:
    """Debian keeps the server binaries in /usr/lib/postgresql/<major>/bin (the newest wins)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    found = shutil.which("postgres")
    return Path(found).parent if found else None


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise ServiceError(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")


def start_postgres(root: str | Path, port: int, host: str = DEFAULT_HOST,
                   timeout_s: float = START_TIMEOUT_S) -> LocalPostgres:
    binaries = bin_dir()
    if binaries is None:
        raise ServiceError("PostgreSQL is not installed (apt-get install --no-install-recommends postgresql)")
    root = Path(root).resolve()
    data, log_path, pid_file = root / "data", root / "postgres.log", root / "postgres.pid"
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    if not (data / "PG_VERSION").exists():
        _run([*_as_server_user(), str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
              "-E", "UTF8", "--no-sync"], f"initdb -D {data}")
    if port_open(host, port):
        raise ServiceError(f"{host}:{port} is already in use; pick another port")
    argv = [*_as_server_user(), str(binaries / "postgres"), "-D", str(data), "-p", str(port), "-h", host,
            "-k", str(root), "-c", "fsync=off", "-c", "full_page_writes=off"]
    proc = spawn_detached(argv, log_path, pid_file)
    try:
        wait_until(lambda: _ready(binaries, host, port), timeout_s, f"postgres on {host}:{port}",
                   alive=lambda: pid_alive(proc.pid), log_path=log_path)
        _create_database(binaries, host, port)
    except ServiceError:
        stop_by_pid_file(pid_file, expect_in_cmdline="postgres")
        raise
    return LocalPostgres(pid=proc.pid, root=root, host=host, port=port, pid_file=pid_file, log_path=log_path)


def _ready(binaries: Path, host: str, port: int) -> bool:
    done = subprocess.run([str(binaries / "pg_isready"), "-h", host, "-p", str(port), "-U", "postgres"],
                          capture_output=True, timeout=30)
    return done.returncode == 0


def _create_database(binaries: Path, host: str, port: int) -> None:
    listed = subprocess.run([str(binaries / "psql"), "-h", host, "-p", str(port), "-U", "postgres", "-tAc",
                             f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
                            capture_output=True, text=True, timeout=60)
    if listed.stdout.strip() != "1":
        _run([str(binaries / "createdb"), "-h", host, "-p", str(port), "-U", "postgres", DATABASE],
             f"createdb {DATABASE}")


def stop_postgres(root: str | Path) -> bool:
    """Stop the server started in root (its clients, e.g. an MLflow server, should be stopped first)."""
    return stop_by_pid_file(Path(root).resolve() / "postgres.pid", expect_in_cmdline="postgres", grace_s=30.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local.postgres", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop"))
    parser.add_argument("--dir", required=True, help="data folder, socket, log and PID file")
    parser.add_argument("--port", type=int, default=5433)
    parser.add_argument("--host", default=DEFAULT_HOST)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            pg = start_postgres(args.dir, args.port, args.host)
            print(f"postgres ready on {pg.host}:{pg.port} (PID {pg.pid}, log {pg.log_path})")
            print(f"MLflow backend store: {pg.mlflow_uri}")
        else:
            stopped = stop_postgres(args.dir)
            print(f"postgres {'stopped' if stopped else 'was not running'} ({args.dir})")
        return 0
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
