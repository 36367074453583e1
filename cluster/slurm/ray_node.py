"""Ray on a SLURM allocation, one node at a time; `cluster/slurm/rtrain.sbatch` calls it.

    python -m cluster.slurm.ray_node head --port P            # on the first node: `ray start --head --block`
    srun ... python -m cluster.slurm.ray_node join --address IP:P   # on the others: `ray start --block`
    python -m cluster.slurm.ray_node wait --address IP:P --nodes N --timeout 300

Each node's Ray listens on the address SLURM itself uses for that node (its NodeAddr), so the cluster forms
over the network the scheduler already trusts; `RTRAIN_RAY_NODE_IP` overrides. Every port besides the head's
GCS port is picked free on the node, because Ray's fixed defaults collide when two nodes share a host (as in
the single-host test setup) or when two jobs share a node. CPUs and GPUs offered are what SLURM gave this job
on the node. Ports are drawn below the kernel's ephemeral range (rtrain._ports): a port picked from it can be
taken by any outgoing connection before Ray binds it. `ray start --block` runs in the foreground of `head` and
`join`, which pass the step's stop signals on (ending the step or the job ends Ray) and start it again, with
fresh ports, when it fails during start-up (Ray also picks ports of its own). `wait --head-pid` ends as soon as
the head gave up, rather than at its timeout.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cluster.local.procs import ServiceError, private_dir
from cluster.local.ray_head import ray_executable
from rtrain._ports import unused_port
from rtrain._process import die_with_parent

NODE_IP_ENV = "RTRAIN_RAY_NODE_IP"
START_ATTEMPTS = 3
START_WINDOW_S = 300.0  # `ray start` failing later than this after the first try is not a start-up failure
STABLE_S = 5.0  # how long `ray start --block` watches its services before the node counts as up


class RayNodeError(RuntimeError):
    """Ray could not be brought up on the allocation; the message names the node or address."""


def _free_port() -> int:
    return unused_port("")  # checked on every interface: Ray listens on the node's address


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
    """This job's folder on this node, this user's only (0700, owner-checked when made: procs.private_dir): the
    `ray start` log, the ready file, and Ray's own temp dir as its `r` subfolder (Ray opens that to everyone).
    Short on purpose: Ray's unix sockets live under it, and socket paths are limited to 107 bytes."""
    job = os.environ.get("SLURM_JOB_ID", "nojob")
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    return f"/tmp/rtrain-ray-{job}-{node}-u{os.geteuid()}"


def _node_argv(ip: str) -> list[str]:
    return [
        "--block", "--node-ip-address", ip, "--num-cpus", str(_cpus_on_node()), "--num-gpus", str(_gpus_on_node()),
        "--disable-usage-stats", "--temp-dir", f"{temp_dir()}/r",
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


def _pid_running(pid: int) -> bool:
    """True while pid runs (an exited child its parent has not reaped yet counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _count_nodes(address: str, nodes: int, deadline: float) -> int:
    """Connect as a driver and poll until `nodes` nodes are alive or the deadline passes; the count seen last."""
    os.environ.update(RAY_AUTH_MODE="token")
    import ray

    while True:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            break
        except (ConnectionError, RuntimeError) as exc:
            if time.monotonic() > deadline:
                raise RayNodeError(f"no Ray head answers at {address} ({exc})") from None
            time.sleep(2.0)
    try:
        while True:
            alive = sum(1 for node in ray.nodes() if node.get("Alive"))
            if alive >= nodes or time.monotonic() > deadline:
                return alive
            time.sleep(1.0)
    finally:
        ray.shutdown()


def wait_for_nodes(address: str, nodes: int, timeout_s: float, head_pid: int | None = None) -> int:
    """Block until `nodes` Ray nodes are alive in the cluster at `address`; returns how many there are.

    The polling driver runs in a child process: a head that dies and is started again (`head` retries a failed
    start) takes a connected driver down with it (Ray ends a driver whose GCS is gone), and the next child
    connects to the new one. With `head_pid` (the `head` process of this job), a head that gave up ends the
    wait at once instead of after the timeout."""
    deadline = time.monotonic() + timeout_s
    seen, why = 0, "no Ray head answered"
    while True:
        if head_pid is not None and not _pid_running(head_pid):
            raise RayNodeError(f"the Ray head (PID {head_pid}) ended before {nodes} node(s) joined {address}; "
                               f"its log: {temp_dir()}/ray-start.log")
        left = deadline - time.monotonic()
        if left <= 0:
            raise RayNodeError(f"{seen} of {nodes} Ray node(s) joined {address} within {timeout_s:.0f} s ({why}); "
                               "see the job's output for the nodes' `ray start` lines")
        head_up = _read(ready_file()) if head_pid is not None else ""
        if head_pid is not None and not head_up:
            why = "the head is not up yet"
            time.sleep(1.0)
            continue
        child = subprocess.Popen([sys.executable, "-m", "cluster.slurm.ray_node", "count", "--address", address,
                                  "--nodes", str(nodes), "--timeout", f"{left:.1f}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=_child_of(os.getpid()))
        while True:
            try:
                out, err = child.communicate(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if head_pid is not None and not _pid_running(head_pid):
                    child.kill()
        if child.returncode == 0 and out.strip().isdigit():
            seen, why = int(out.strip()), "the others did not join"
            if seen >= nodes and (head_pid is None or _read(ready_file()) == head_up):  # not restarted meanwhile
                return seen
        else:
            lines = [line.removeprefix("rtrain: ") for line in err.splitlines() if line.strip()]
            why = lines[-1][:300] if lines else f"the polling driver exited with {child.returncode}"
        time.sleep(1.0)


def _child_of(parent_pid: int) -> Callable[[], None]:
    return lambda: die_with_parent(parent_pid)  # a wrapper killed outright takes its child along


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
    wait.add_argument("--head-pid", type=int, help="the `head` process of this job: stop waiting once it ended")
    count = sub.add_parser("count", help="(used by wait) print how many nodes are alive once --nodes are or "
                                         "--timeout passed")
    count.add_argument("--address", required=True)
    count.add_argument("--nodes", type=int, required=True)
    count.add_argument("--timeout", type=float, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.command == "ip":
            print(node_ip())
            return 0
        if args.command == "wait":
            alive = wait_for_nodes(args.address, args.nodes, args.timeout, args.head_pid)
            print(f"rtrain: Ray cluster at {args.address} has {alive} node(s)", flush=True)
            return 0
        if args.command == "count":
            print(_count_nodes(args.address, args.nodes, time.monotonic() + args.timeout), flush=True)
            return 0
        if args.command == "head":
            node_ip()  # fails here, in one line, where the node's address cannot be found
            return _run_logged(lambda: head_argv(args.port, args.dashboard_port or _free_port()), "Ray head")
        node_ip()
        return _run_logged(lambda: join_argv(args.address), "Ray node")
    except (RayNodeError, ServiceError) as exc:
        print(f"rtrain: {exc}", file=sys.stderr)
        return 1


def ready_file() -> Path:
    """Present while this node's `ray start` has been up for STABLE_S: what `wait --head-pid` waits for."""
    return Path(temp_dir()) / "ray-ready"


def _blocking_since(log_path: Path, offset: int) -> bool:
    """Has this attempt's `ray start` reached its --block loop (where it watches its services)?"""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            return b"will now block forever" in f.read()
    except OSError:
        return False


def _run_logged(make_argv: Callable[[], list[str]], what: str) -> int:
    """Run `ray start --block` in the foreground of this process, its chatter in a log file, until it ends.

    The SLURM step's and the batch shell's stop signals (TERM, INT, HUP) are passed on to Ray, which then stops
    its node. A start that fails before the cluster formed (Ray picks some of its own ports, and a port taken in
    between ends the node: "Address already in use") is tried again with fresh ports, START_ATTEMPTS times in
    all, within START_WINDOW_S; a failure after that, or after a stop signal, is final. Ray reports a node up
    before all of its services have bound their ports, and a service that then fails ends the node: the ready
    file is written only once `ray start` has watched its services for STABLE_S."""
    log_path = private_dir(temp_dir()) / "ray-start.log"
    ready = ready_file()
    ready.unlink(missing_ok=True)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    stopping: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, _frame) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    began = time.monotonic()
    for attempt in range(1, START_ATTEMPTS + 1):
        argv = make_argv()
        print(f"rtrain: {what} starting on {node} ({argv[argv.index('--node-ip-address') + 1]}); log {log_path}",
              file=sys.stderr, flush=True)
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=ray_env(), preexec_fn=_child_of(os.getpid()))
        blocking_at = None
        while True:
            try:
                code = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if blocking_at is None and _blocking_since(log_path, offset):
                blocking_at = time.monotonic()
            if blocking_at is not None and not ready.exists() and time.monotonic() - blocking_at >= STABLE_S:
                ready.write_text(f"{child.pid}\n")
        ready.unlink(missing_ok=True)
        if stopping or code == 0:
            return 0 if stopping else code
        if attempt == START_ATTEMPTS or time.monotonic() - began > START_WINDOW_S:
            print(f"rtrain: {what} on {node} exited with {code}; see {log_path}", file=sys.stderr, flush=True)
            return 1
        print(f"rtrain: {what} on {node} failed to start (exit {code}, attempt {attempt} of {START_ATTEMPTS}; "
              f"see {log_path}); starting it again with fresh ports", file=sys.stderr, flush=True)
        time.sleep(2.0 * attempt)
    return 1


if __name__ == "__main__":
    sys.exit(main())
