"""The local launcher: dist.num_workers plain processes on this host with torchrun's environment variables.
The first rank that fails stops all the others; a stop signal to the launcher makes them checkpoint and stop
together (rtrain.launch.signals); the ranks die with the launcher, however it dies.

Several nodes, torchrun-style (`cluster/slurm/rtrain-srun.sbatch` runs one launcher per node): with
RTRAIN_NNODES=N, RTRAIN_NODE_RANK=i, MASTER_ADDR and MASTER_PORT set, this launcher starts ranks
i*W/N .. (i+1)*W/N - 1 of W = dist.num_workers, all meeting at MASTER_ADDR:MASTER_PORT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from rtrain._errors import DEBUG_ENV, one_line
from rtrain._process import die_with_parent
from rtrain.config import Recipe
from rtrain.launch.errors import EXPECTED_ERRORS, LaunchError, resume_hint, stalled_run_error
from rtrain.launch.recipe import write_private
from rtrain.launch.signals import LauncherSignals
from rtrain.launch.workers import (
    LOOPBACK,
    WorkerFn,
    free_port,
    load_worker,
    lost_a_peer,
    python_path,
    worker_reference,
)

SUMMARY_FILE = "summary.json"
TERMINATE_GRACE_S = 5.0  # after a rank failed: its peers are stuck in a broken collective
POLL_INTERVAL_S = 0.2
CAUSE_WAIT_S = 3.0  # after the first rank failed: how long the others get to end before the cause is named
CHILD_ENTRY = "from rtrain.launch.local import rank_process; rank_process()"
LAUNCHER_PID_ENV = "RTRAIN_LAUNCHER_PID"
NNODES_ENV, NODE_RANK_ENV = "RTRAIN_NNODES", "RTRAIN_NODE_RANK"


@dataclass(frozen=True)
class NodeSlot:
    """Which ranks this launcher starts and where they all meet."""
    world_size: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def local_world_size(self) -> int:
        return self.world_size // self.nnodes

    @property
    def first_rank(self) -> int:
        return self.node_rank * self.local_world_size


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    if not text.isdigit():
        raise LaunchError(f"{name}={text!r} must be a non-negative integer (several nodes: set {NNODES_ENV}, "
                          f"{NODE_RANK_ENV}, MASTER_ADDR, MASTER_PORT)")
    return int(text)


def node_slot(world_size: int) -> NodeSlot:
    """One node (this host, a free port) unless RTRAIN_NNODES > 1 says otherwise."""
    nnodes = _env_int(NNODES_ENV) if os.environ.get(NNODES_ENV) else 1
    if nnodes <= 1:
        return NodeSlot(world_size, 1, 0, LOOPBACK, free_port())
    node_rank, master_port = _env_int(NODE_RANK_ENV), _env_int("MASTER_PORT")
    if world_size % nnodes or node_rank >= nnodes or not os.environ.get("MASTER_ADDR"):
        raise LaunchError(f"dist.num_workers={world_size} over {NNODES_ENV}={nnodes} nodes (this is node "
                          f"{node_rank}, MASTER_ADDR={os.environ.get('MASTER_ADDR')!r}): the workers must split "
                          "evenly over the nodes and the node rank be below the node count")
    return NodeSlot(world_size, nnodes, node_rank, os.environ["MASTER_ADDR"], master_port)


def rank_main(argv: list[str]) -> int:
    """Entry point of one local rank: run the worker, local rank 0 writes its summary, failures write an
    error file."""
    reference, recipe_path, exchange_dir = argv
    rank = int(os.environ["RANK"])
    exchange = Path(exchange_dir)
    # A rank must never train on as an orphan, writing checkpoints into a folder a restarted job uses.
    die_with_parent(int(os.environ[LAUNCHER_PID_ENV]))
    try:
        result = load_worker(reference)({"recipe_yaml": Path(recipe_path).read_text()})
        if int(os.environ["LOCAL_RANK"]) == 0:  # this node's first rank speaks for the node
            summary = result if isinstance(result, dict) else {"result": result}
            (exchange / SUMMARY_FILE).write_text(json.dumps(summary, default=str))
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        if os.environ.get(DEBUG_ENV) or not (isinstance(exc, EXPECTED_ERRORS) or lost_a_peer(exc)):
            traceback.print_exc()  # a bug, or asked for
        else:
            print(f"rtrain: rank {rank}: {one_line(exc)}", file=sys.stderr, flush=True)  # the message is enough
        (exchange / f"rank-{rank}.error").write_text(one_line(exc))
        return 1


def rank_process() -> None:
    """A rank's process: rank_main, then the Python exit handlers, then os._exit. Without the last step about
    one run in 13 here (2 gloo ranks, DDP; once in CI) ended in `terminate called without an active exception` (SIGABRT)
    after everything was saved: a C++ thread torn down during interpreter finalization, with no Python frame
    on the stack (seen with faulthandler on). Finalization holds nothing a rank needs: the process group is
    destroyed, the summary and checkpoints are written, the non-daemon threads are joined and the loggers and
    loader workers closed by the exit handlers, in the order a normal exit runs them."""
    import atexit
    import faulthandler
    import threading

    faulthandler.enable()  # a native crash still names the Python frames it happened under
    code = rank_main(sys.argv[1:])
    threading._shutdown()  # what a normal exit does first: join the threads that are not daemons
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _rank_env(local_rank: int, slot: NodeSlot) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(slot.first_rank + local_rank), WORLD_SIZE=str(slot.world_size), LOCAL_RANK=str(local_rank),
               LOCAL_WORLD_SIZE=str(slot.local_world_size), NODE_RANK=str(slot.node_rank),
               GROUP_RANK=str(slot.node_rank), MASTER_ADDR=slot.master_addr, MASTER_PORT=str(slot.master_port),
               PYTHONPATH=python_path())
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    # As torchrun does: without a cap every rank starts one thread per core and they fight over the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // slot.local_world_size)))
    return env


def _terminate(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the ranks still running, SIGKILL those still there after TERMINATE_GRACE_S, reap all."""
    for sig, grace in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, 0.0)):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
    for proc in procs:
        proc.wait()


def _failed_ranks(procs: list[subprocess.Popen], first_rank: int = 0) -> list[tuple[int, int]]:
    """(global rank, exit code) of the ranks here that failed."""
    return [(first_rank + i, proc.poll()) for i, proc in enumerate(procs) if proc.poll() not in (None, 0)]


def _root_cause(failed: list[tuple[int, int]], exchange: Path) -> tuple[int, int]:
    """Of the failed ranks, the one that failed first for a reason of its own: a rank whose collective broke
    because a peer went away died of the peer, however early it wrote its error."""
    def error_of(rank: int) -> Path:
        return exchange / f"rank-{rank}.error"

    def key(item: tuple[int, int]) -> tuple[bool, float, int]:
        path = error_of(item[0])
        if not path.exists():
            return True, float("inf"), item[0]
        return lost_a_peer(RuntimeError(path.read_text())), path.stat().st_mtime, item[0]

    return min(failed, key=key)


def _failure_message(rank: int, code: int, exchange: Path) -> str:
    error_file = exchange / f"rank-{rank}.error"
    why = error_file.read_text() if error_file.exists() else f"exit code {code}"
    return f"rank {rank} failed: {why}"


def _start_ranks(reference: str, recipe_path: Path, exchange: Path, slot: NodeSlot) -> list[subprocess.Popen]:
    return [
        # Own sessions: Ctrl-C in a terminal reaches the launcher only, which asks the ranks to stop in step.
        subprocess.Popen([sys.executable, "-c", CHILD_ENTRY, reference, str(recipe_path), str(exchange)],
                         env=_rank_env(local_rank, slot), start_new_session=True)
        for local_rank in range(slot.local_world_size)
    ]


def _wait_all_or_first_failure(procs: list[subprocess.Popen], exchange: Path, stop: LauncherSignals,
                               first_rank: int) -> tuple[int, int] | None:
    while any(p.poll() is None for p in procs) and not _failed_ranks(procs):
        if stop.grace_expired:
            raise LaunchError(f"after {stop.received} the ranks did not checkpoint within "
                              f"checkpoint.preempt_grace_s={stop.grace_s:g} s; they were killed")
        time.sleep(POLL_INTERVAL_S)
    if not _failed_ranks(procs):
        return None
    # The first rank to exit is often one whose peer failed: give the others a moment to end and say why.
    deadline = time.monotonic() + CAUSE_WAIT_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
    return _root_cause(_failed_ranks(procs, first_rank), exchange)


def launch_local(recipe: Recipe, worker_fn: WorkerFn) -> dict:
    """Run dist.num_workers ranks as processes here; the first failing rank stops all the others."""
    reference = worker_reference(worker_fn)
    slot = node_slot(recipe.dist.num_workers)
    signals = LauncherSignals(recipe.run_dir, recipe.checkpoint.preempt_grace_s)
    with tempfile.TemporaryDirectory(prefix="rtrain-launch-") as tmp, signals.installed() as stop:
        exchange = Path(tmp)  # 0700, removed at the end: the ranks' copy of the recipe keeps its credentials
        recipe_path = exchange / "recipe.yaml"
        write_private(recipe_path, recipe.to_yaml(secrets=True))
        procs: list[subprocess.Popen] = []
        try:
            procs = _start_ranks(reference, recipe_path, exchange, slot)
            failure = _wait_all_or_first_failure(procs, exchange, stop, slot.first_rank)
            if failure:
                stalled = stalled_run_error(recipe.run_dir, resume_hint(recipe))
                raise stalled or LaunchError(_failure_message(*failure, exchange))
        finally:
            _terminate(procs)
        summary_file = exchange / SUMMARY_FILE
        return json.loads(summary_file.read_text()) if summary_file.exists() else {}
