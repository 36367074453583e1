"""Shared pieces of the tests that run the real worker (locally, under Ray, under SLURM): CPU-scale quickstart
overrides, the environment runs get, reading back what a run left (checkpoint, ledger, MLflow run), and finding
Ray Train's worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from rtrain.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[2]
STEPS = 14  # 1437 digits / global batch 128 = 11 steps per epoch: a stop at step 3..10 is mid-epoch 0, epoch 1 follows


# Credentials the reference run (conftest.py) is launched with and test_secrets.py looks for in what it wrote:
# fsspec keys (a local data.source ignores them) and a token in a tag's URL.
SECRETS = ("AKIAFAKE0REFERENCE0", "s3cr3t-reference-VALUE", "ghp_FAKE0reference0token")
SECRET_OVERRIDES = (f"data.storage_options={{aws_access_key_id: {SECRETS[0]}, aws_secret_access_key: {SECRETS[1]}}}",
                    f"tracking.tags={{origin: 'https://ci:{SECRETS[2]}@git.example/r.git'}}")


def run_env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: no RAY_ADDRESS of the caller's, and one intra-op thread per rank as
    Ray gives each 1-CPU worker, so a local run does the same float sums as a Ray or SLURM run on any machine
    (the reference run in conftest.py is compared bit for bit with all of them)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def quickstart_overrides(shards: Path, out: Path, name: str, max_steps: int, *extra: str) -> list[str]:
    """The shipped quickstart at CPU-test scale: 2 workers on gloo, a checkpoint every 3 steps."""
    return [f"data.source={shards}", f"run.output_root={out}", f"run.name={name}", "dist.launcher=ray",
            f"train.max_steps={max_steps}", "checkpoint.every_steps=3", "checkpoint.keep=20",
            "train.log_every_steps=3", "eval.every_epochs=100", f"tracking.uri=sqlite:///{out}/mlflow.db",
            f"tracking.experiment={name}", *extra]


def launch_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "rtrain.launch", "recipes/quickstart.yaml", *overrides]


def checkpoint_steps(out: Path, name: str) -> list[int]:
    folder = out / name / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*")) if folder.is_dir() else []


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{what} differs from the uninterrupted reference run in {different[:5]}"


def final_weights(out: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    loaded = CheckpointManager(out / name / "checkpoints", world_size=2).latest()  # verified
    assert loaded is not None and loaded.step == step, f"newest verified checkpoint: {loaded and loaded.path}"
    return loaded.shared["model"]


def mlflow_runs(out: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([found.experiment_id])


def processes() -> list[tuple[int, int, str]]:
    """(pid, ppid, command line) of every process."""
    done = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True)
    rows = []
    for line in done.stdout.splitlines():
        fields = line.split(None, 2)
        rows.append((int(fields[0]), int(fields[1]), fields[2] if len(fields) > 2 else ""))
    return rows


def descendants(root: int) -> list[int]:
    """Every process below `root` (children, their children, ...)."""
    rows = processes()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid, _ in rows if ppid == parent]
        found += children
        frontier += children
    return found


def train_worker_pids(root: int) -> list[int]:
    """Ray Train's worker actors of the run launched as process `root` (the Ray it starts is below it). Their
    DataLoader workers carry the same title, with an actor as parent. Not "the newest such process": PIDs
    wrap at 32768 here, and an earlier run's worker may still be exiting."""
    mine = set(descendants(root))
    rows = [(pid, ppid) for pid, ppid, args in processes() if args.startswith("ray::RayTrainWorker") and pid in mine]
    actors = {pid for pid, _ in rows}
    return sorted(pid for pid, ppid in rows if ppid not in actors)


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def pids_gone(pids: list[int]) -> bool:
    alive = {pid for pid, _, args in processes() if "<defunct>" not in args}
    return not (set(pids) & alive)


class LoaderPulses:
    """Slows one rank's loader for real: SIGSTOP/SIGCONT pulses to the processes below that rank (its
    DataLoader workers; the rank's pid is in its log's attempt record) until the block ends. Everything
    stopped is continued again."""

    def __init__(self, run_dir: Path, rank: int, stop_s: float = 2.5, run_s: float = 0.02):
        self.log = run_dir / "logs" / f"rank-{rank}.jsonl"
        self.stop_s, self.run_s = stop_s, run_s
        self.pulses = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._pulse, daemon=True)

    def __enter__(self) -> LoaderPulses:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(30)

    def _records(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.log.read_text().splitlines() if line.endswith("}")]
        except (OSError, ValueError):
            return []

    def _pulse(self) -> None:
        rank_pid = None
        while not self._done.is_set():
            if rank_pid is None:
                rank_pid = next((r["pid"] for r in self._records() if r.get("event") == "attempt"), None)
            stopped = descendants(rank_pid) if rank_pid is not None else []
            for pid in stopped:
                _signal(pid, signal.SIGSTOP)
            self.pulses += bool(stopped)
            self._done.wait(self.stop_s)
            for pid in stopped:
                _signal(pid, signal.SIGCONT)
            self._done.wait(self.run_s)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
