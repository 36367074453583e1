"""A local single-node Ray head on 127.0.0.1, with its job server, started in the background and stopped by PID.

    python -m cluster.local.ray_head start --port 6380 --num-cpus 2     # prints the addresses below
    export RAY_ADDRESS=http://127.0.0.1:<dashboard port> RAY_AUTH_MODE=token
    ray job submit --working-dir . -- python -m rtrain.launch recipes/quickstart.yaml
    python -m cluster.local.ray_head stop --port 6380

The job server (`ray job submit`, `ray job logs`, `ray job stop`) and the state API that Ray Train polls live
in the head's dashboard, so the head runs one, on a free port of 127.0.0.1. A driver started by hand on this
host (not as a job) connects with the GCS address instead: RAY_ADDRESS=127.0.0.1:6380.

`ray start --head --block` runs in its own session and tears its processes down on SIGTERM, so stopping
ends this head only; `ray stop` would kill every Ray instance of the user on the machine.
Every port the head opens is picked free (Ray's fixed defaults collide when two heads share a host), and the
head gets its own temp dir. Workers get the repository on PYTHONPATH so they can import rtrain.
`ray start --head` turns on token authentication (token in ~/.ray/auth_token); drivers connecting to it need
RAY_AUTH_MODE=token in their environment, which `start` prints along with RAY_ADDRESS.
"""

from __future__ import annotations

import argparse
import os
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
from rtrain._ports import unused_port

HOST = "127.0.0.1"
DEFAULT_PORT = 6380
START_TIMEOUT_S = 180.0
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RayHead:
    pid: int
    address: str  # GCS host:port, for drivers started by hand
    dashboard_url: str  # http://host:port of the job server, for `ray job submit --address`
    pid_file: Path
    log_path: Path
    temp_dir: Path


def state_dir(port: int) -> Path:
    """This user's folder for the head on `port` (0700, owner-checked: procs.private_dir); Ray's temp dir is
    its `r` subfolder (Ray opens its temp dir to everyone; the private parent keeps others out).
    Short on purpose: Ray's unix sockets live under the temp dir and socket paths are limited to 107 bytes."""
    return Path("/tmp") / f"rtrain-ray-{port}-u{os.geteuid()}"


def default_pid_file(port: int) -> Path:
    return state_dir(port) / "ray-head.pid"


def _free_port() -> int:
    return unused_port(HOST)


def ray_executable() -> str:
    beside_python = Path(sys.executable).parent / "ray"
    found = str(beside_python) if beside_python.exists() else shutil.which("ray")
    if not found:
        raise ServiceError("the `ray` command is not installed next to this Python nor on PATH")
    return found


def head_argv(port: int, num_cpus: int, temp_dir: Path, dashboard_port: int) -> list[str]:
    return [
        ray_executable(), "start", "--head", "--block",
        "--node-ip-address", HOST, "--port", str(port),
        "--num-cpus", str(num_cpus), "--num-gpus", "0",
        "--include-dashboard=true", "--dashboard-host", HOST, "--dashboard-port", str(dashboard_port),
        "--disable-usage-stats",
        "--temp-dir", str(temp_dir),
        "--ray-client-server-port", str(_free_port()),
        "--dashboard-agent-listen-port", str(_free_port()),
        "--metrics-export-port", str(_free_port()),
    ]


def _head_env() -> dict[str, str]:
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    # A job's entrypoint runs `python` from the head's PATH: make that this Python (the venv with rtrain).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": os.pathsep.join(paths), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            # No Serve replicas to migrate here: skip the 30 s node drain Ray does on SIGTERM.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def _cluster_answers(address: str, dashboard_port: int) -> bool:
    """GCS up is not enough: `ray status` succeeds once the head's raylet has registered, and jobs can be
    submitted once the dashboard listens."""
    host, port = address.rsplit(":", 1)
    if not port_open(host, int(port)) or not port_open(HOST, dashboard_port):
        return False
    done = subprocess.run([ray_executable(), "status", "--address", address], capture_output=True,
                          timeout=60, env=_head_env())
    return done.returncode == 0


def start_head(port: int = DEFAULT_PORT, num_cpus: int | None = None, pid_file: str | Path | None = None,
               timeout_s: float = START_TIMEOUT_S) -> RayHead:
    """Start the head detached and return once the cluster answers `ray status`."""
    address = f"{HOST}:{port}"
    if port_open(HOST, port):
        raise ServiceError(f"port {port} on {HOST} is already in use; pick another --port")
    temp_dir = private_dir(state_dir(port)) / "r"
    pid_file = Path(pid_file).resolve() if pid_file else default_pid_file(port)
    log_path = pid_file.with_suffix(".log")
    cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
    dashboard_port = _free_port()
    proc = spawn_detached(head_argv(port, cpus, temp_dir, dashboard_port), log_path, pid_file, env=_head_env())
    try:
        wait_until(lambda: _cluster_answers(address, dashboard_port), timeout_s, f"ray head at {address}",
                   alive=lambda: pid_alive(proc.pid), log_path=log_path)
    except (ServiceError, subprocess.TimeoutExpired):
        stop_by_pid_file(pid_file, expect_in_cmdline="ray")
        raise
    return RayHead(pid=proc.pid, address=address, dashboard_url=f"http://{HOST}:{dashboard_port}",
                   pid_file=pid_file, log_path=log_path, temp_dir=temp_dir)


def stop_head(pid_file: str | Path) -> bool:
    """Stop the head recorded in pid_file (and every process of its session); False if none ran."""
    return stop_by_pid_file(Path(pid_file), expect_in_cmdline="ray", grace_s=30.0)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.local.ray_head", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a Ray head in the background")
    start.add_argument("--port", type=int, default=DEFAULT_PORT, help="GCS port (the cluster address)")
    start.add_argument("--num-cpus", type=int, help="logical CPUs to offer (default: all cores)")
    start.add_argument("--pid-file", help=f"PID file (default: {state_dir(DEFAULT_PORT)}/ray-head.pid for the port)")
    start.add_argument("--timeout", type=float, default=START_TIMEOUT_S)
    stop = sub.add_parser("stop", help="stop the head started on this port")
    stop.add_argument("--port", type=int, default=DEFAULT_PORT)
    stop.add_argument("--pid-file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.command == "start":
            head = start_head(args.port, args.num_cpus, args.pid_file, args.timeout)
            print(f"ray head ready at {head.address}, job server {head.dashboard_url} "
                  f"(PID {head.pid}, log {head.log_path})")
            print("submit jobs with:")
            print(f"export RAY_ADDRESS={head.dashboard_url} RAY_AUTH_MODE=token")
            print("or run a driver on this host with:")
            print(f"export RAY_ADDRESS={head.address} RAY_AUTH_MODE=token")
            return 0
        pid_file = Path(args.pid_file) if args.pid_file else default_pid_file(args.port)
        stopped = stop_head(pid_file)
        print(f"ray head {'stopped' if stopped else 'was not running'} ({pid_file})")
        return 0
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
