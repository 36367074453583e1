"""A throw-away PostgreSQL server (Debian's postgresql package) for an MLflow server's backend store.

    python -m cluster.local.postgres start --dir /tmp/rtrain-pg --port 5433
    export PGPASSFILE=/tmp/rtrain-pg/pgpass
    python -m cluster.local.mlflow_server start --backend-store-uri postgresql+psycopg://postgres@127.0.0.1:5433/mlflow \
        --artifacts /tmp/rtrain-pg/mlartifacts --pid-file /tmp/rtrain-pg/mlflow-server.pid --port 5000
    python -m cluster.local.postgres stop --dir /tmp/rtrain-pg

initdb into <dir>/data with password authentication (scram-sha-256) for every connection, local or TCP: the
password is drawn at random when the data folder is made and kept only in <dir>/pgpass (libpq's password file,
0600, for the user who started it); clients find it through PGPASSFILE (the MLflow server started for it gets
it in its environment), so the password is never on a command line, in a URI or in a log. The server listens
on 127.0.0.1 only, its socket in <dir>. Then one
`postgres` process started detached and stopped by PID, and a database `mlflow`. PostgreSQL refuses to run as
root: as root the server runs as the `postgres` user (setpriv, so the recorded PID is the server itself) and
<dir> is handed to that user, so <dir> must be reachable by it (not under a 0700 folder such as pytest's).
The driver is psycopg 3 (`postgresql+psycopg://`; the plain `postgresql://` would ask for psycopg2).
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster.local.procs import (
    ServiceError,
    pid_alive,
    port_open,
    private_dir,
    spawn_detached,
    stop_by_pid_file,
    wait_until,
)

DEFAULT_HOST = "127.0.0.1"
DATABASE = "mlflow"
START_TIMEOUT_S = 120.0
PACKAGES = ("postgresql",)
PASSFILE = "pgpass"


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
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{DATABASE}"  # no password: PGPASSFILE

    @property
    def passfile(self) -> Path:
        return self.root / PASSFILE

    @property
    def client_env(self) -> dict[str, str]:
        """What a client's environment needs to log in (libpq and psycopg read it)."""
        return {"PGPASSFILE": str(self.passfile)}


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


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        raise ServiceError(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")


def start_postgres(root: str | Path, port: int, host: str = DEFAULT_HOST,
                   timeout_s: float = START_TIMEOUT_S) -> LocalPostgres:
    binaries = bin_dir()
    if binaries is None:
        raise ServiceError("PostgreSQL is not installed (apt-get install --no-install-recommends postgresql)")
    # This user's folder (or, as root, the server user's it was handed to): never a symlink, never another's.
    server_uid = [pwd.getpwnam("postgres").pw_uid] if os.geteuid() == 0 else []
    root = private_dir(root, owners=server_uid)
    data, log_path, pid_file = root / "data", root / "postgres.log", root / "postgres.pid"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    passfile = root / PASSFILE
    if not (data / "PG_VERSION").exists():
        _initdb(binaries, root, data, passfile)
    elif not passfile.is_file():
        raise ServiceError(f"{data} exists but {passfile} does not: its password is lost; remove {root} to start over")
    client = {**os.environ, "PGPASSFILE": str(passfile)}
    if port_open(host, port):
        raise ServiceError(f"{host}:{port} is already in use; pick another port")
    argv = [*_as_server_user(), str(binaries / "postgres"), "-D", str(data), "-p", str(port), "-h", host,
            "-k", str(root), "-c", "fsync=off", "-c", "full_page_writes=off"]
    proc = spawn_detached(argv, log_path, pid_file)
    try:
        wait_until(lambda: _ready(binaries, host, port), timeout_s, f"postgres on {host}:{port}",
                   alive=lambda: pid_alive(proc.pid), log_path=log_path)
        _create_database(binaries, host, port, client)
    except ServiceError:
        stop_by_pid_file(pid_file, expect_in_cmdline="postgres")
        raise
    return LocalPostgres(pid=proc.pid, root=root, host=host, port=port, pid_file=pid_file, log_path=log_path)


def _initdb(binaries: Path, root: Path, data: Path, passfile: Path) -> None:
    """A new cluster whose `postgres` user has a random password; the password goes to the client's passfile
    (0600) and, for initdb, to a file only the server user reads, removed at once."""
    password = secrets.token_urlsafe(24)
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"*:*:*:postgres:{password}\n")
    pwfile = root / ".initdb-password"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        _run([*_as_server_user(), str(binaries / "initdb"), "-D", str(data), "-U", "postgres",
              "-A", "scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"], f"initdb -D {data}")
    finally:
        pwfile.unlink(missing_ok=True)


def _ready(binaries: Path, host: str, port: int) -> bool:
    done = subprocess.run([str(binaries / "pg_isready"), "-h", host, "-p", str(port), "-U", "postgres"],
                          capture_output=True, timeout=30)
    return done.returncode == 0


def _create_database(binaries: Path, host: str, port: int, env: dict[str, str]) -> None:
    listed = subprocess.run([str(binaries / "psql"), "-h", host, "-p", str(port), "-U", "postgres", "-tAc",
                             f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
                            capture_output=True, text=True, timeout=60, env=env)
    if listed.stdout.strip() != "1":
        _run([str(binaries / "createdb"), "-h", host, "-p", str(port), "-U", "postgres", DATABASE],
             f"createdb {DATABASE}", env)


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
            print(f"its clients need: export PGPASSFILE={pg.passfile}")
        else:
            stopped = stop_postgres(args.dir)
            print(f"postgres {'stopped' if stopped else 'was not running'} ({args.dir})")
        return 0
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
