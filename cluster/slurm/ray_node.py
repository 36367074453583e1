"""Ray on a SLURM allocation, one node at a time; `cluster/slurm/rtrain.sbatch` calls it.

    python -m cluster.slurm.ray_node head --port P            # on the first node: `ray start --head --block`
    srun ... python -m cluster.slurm.ray_node join --address IP:P   # on the others: `ray start --block`
    python -m cluster.slurm.ray_node wait --address IP:P --nodes N --timeout 300

Each node's Ray listens on the address SLURM itself uses for that node (its NodeAddr), so the cluster forms
over the network the scheduler already trusts; `RTRAIN_RAY_NODE_IP` overrides. Every port besides the head's
GCS port is picked free on the node, because Ray's fixed defaults collide when two nodes share a host (as in
the single-host test setup) or when two jobs share a node. CPUs and GPUs offered are what SLURM gave this job
on the node. `--block` keeps Ray in the foreground of its SLURM step: ending the step (or the job) ends Ray.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from cluster.local.procs import ServiceError
from cluster.local.ray_head import ray_executable

NODE_IP_ENV = "RTRAIN_RAY_NODE_IP"


class RayNodeError(RuntimeError):
    """Ray could not be brought up on the allocation; the message names the node or address."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip(node: str | None = None) -> str:
    """The IP address of a SLURM node (default: this one), from its NodeAddr."""
    if os.environ.get(NODE_IP_ENV):
        return os.environ[NODE_IP_ENV]
    node = node or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        shown = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                               timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RayNodeError(f"`scontrol show node {node}` failed ({exc}); set {NODE_IP_ENV}") from None
    fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
    address = fields.get("NodeAddr") or fields.get("NodeHostName") or node
    return socket.gethostbyname(address)


def _cpus_on_node() -> int:
    # SLURM_CPUS_ON_NODE is the batch step's count; srun tasks see the step's.
    return int(os.environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)


def _gpus_on_node() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return len([g for g in visible.split(",") if g.strip()]) if visible else 0


def temp_dir() -> str:
    # Short on purpose: Ray's unix sockets live under it, and socket paths are limited to 107 bytes.
    job = os.environ.get("SLURM_JOB_ID", "nojob")
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    return f"/tmp/rtrain-ray-{job}-{node}"


def _node_argv(ip: str) -> list[str]:
    return [
        "--block", "--node-ip-address", ip, "--num-cpus", str(_cpus_on_node()), "--num-gpus", str(_gpus_on_node()),
        "--disable-usage-stats", "--temp-dir", temp_dir(),
        "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
    ]


def head_argv(port: int, dashboard_port: int) -> list[str]:
    ip = node_ip()
    return [ray_executable(), "start", "--head", "--port", str(port), *_node_argv(ip),
            "--include-dashboard=true", "--dashboard-host", ip, "--dashboard-port", str(dashboard_port),
            "--ray-client-server-port", str(_free_port())]


def join_argv(address: str) -> list[str]:
    return [ray_executable(), "start", "--address", address, *_node_argv(node_ip())]


def ray_env() -> dict[str, str]:
    # Token auth is on for `ray start --head` in Ray 2.60 (token in ~/.ray/auth_token); nodes and drivers need
    # the mode set. No Serve replicas to migrate: skip the 30 s node drain Ray does on SIGTERM.
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def wait_for_nodes(address: str, nodes: int, timeout_s: float) -> int:
    """Block until `nodes` Ray nodes are alive in the cluster at `address`; returns how many there are."""
    os.environ.update(RAY_AUTH_MODE="token")
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            break
        except (ConnectionError, RuntimeError) as exc:
            if time.monotonic() > deadline:
                raise RayNodeError(f"no Ray head answers at {address} after {timeout_s:.0f} s ({exc})") from None
            time.sleep(2.0)
    try:
        while True:
            alive = sum(1 for node in ray.nodes() if node.get("Alive"))
            if alive >= nodes:
                return alive
            if time.monotonic() > deadline:
                raise RayNodeError(f"only {alive} of {nodes} Ray nodes joined {address} within {timeout_s:.0f} s; "
                                   "see the job's output for the nodes' `ray start` lines")
            time.sleep(1.0)
    finally:
        ray.shutdown()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.slurm.ray_node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    head = sub.add_parser("head", help="run the Ray head on this node in the foreground")
    head.add_argument("--port", type=int, required=True, help="GCS port: the cluster address is NODE_IP:PORT")
    head.add_argument("--dashboard-port", type=int, default=0, help="job server / state API (default: free)")
    sub.add_parser("ip", help="print this node's IP address as Ray will use it")
    join = sub.add_parser("join", help="run a Ray worker node in the foreground, joined to --address")
    join.add_argument("--address", required=True)
    wait = sub.add_parser("wait", help="wait until --nodes nodes are alive in the cluster")
    wait.add_argument("--address", required=True)
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=300.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.command == "ip":
            print(node_ip())
            return 0
        if args.command == "wait":
            alive = wait_for_nodes(args.address, args.nodes, args.timeout)
            print(f"rtrain: Ray cluster at {args.address} has {alive} node(s)", flush=True)
            return 0
        argv_ = (head_argv(args.port, args.dashboard_port or _free_port()) if args.command == "head"
                 else join_argv(args.address))
    except (RayNodeError, ServiceError) as exc:
        print(f"rtrain: {exc}", file=sys.stderr)
        return 1
    _exec_logged(argv_, f"Ray {'head' if args.command == 'head' else 'node'}")
    return 1  # not reached


def _exec_logged(argv: list[str], what: str) -> None:
    """Become `ray start --block` (so the SLURM step's signals reach Ray itself), its chatter in a log file."""
    log_path = Path(temp_dir()) / "ray-start.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"rtrain: {what} starting on {node} ({argv[argv.index('--node-ip-address') + 1]}); log {log_path}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.execvpe(argv[0], argv, ray_env())


if __name__ == "__main__":
    sys.exit(main())
