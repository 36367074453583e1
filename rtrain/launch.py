"""`python -m rtrain.launch RECIPE [key=value ...]`: validate a recipe, then run it on Ray Train or locally.

Launchers (dist.launcher):
- ray:   TorchTrainer on the cluster at dist.ray_address, else RAY_ADDRESS, else a Ray started here.
- local: dist.num_workers plain processes on this host with torchrun's environment variables.
Either way every worker runs `worker_fn({"recipe_yaml": <resolved recipe>})` and rank 0's returned
summary comes back here and is printed as JSON. Heavy imports (torch, Ray) happen only when needed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rtrain.config import Recipe, RecipeError, load_recipe, recipe_from_dict

WorkerFn = Callable[[dict], Any]
LOOPBACK = "127.0.0.1"
RESOLVED_RECIPE_NAME = "resolved_recipe.yaml"
SUMMARY_FILE = "summary.json"
TERMINATE_GRACE_S = 10.0
POLL_INTERVAL_S = 0.2
CHILD_ENTRY = "import sys; from rtrain.launch import rank_main; sys.exit(rank_main(sys.argv[1:]))"


class LaunchError(RuntimeError):
    """The run could not be started or a worker failed; the message names the rank or the service."""


# ---------------------------------------------------------------- recipe preparation

def check_model_name(recipe: Recipe) -> None:
    from rtrain.models import list_models

    known = list_models(include_generic=True)
    if recipe.model.name not in known:
        raise RecipeError(f"model.name={recipe.model.name!r}: not a registered model; "
                          f"known: {', '.join(known)} (`rtrain models` lists them)")


def _absolute(path: str | None, base: Path) -> str | None:
    if path is None or "://" in path:
        return path
    return str(path if Path(path).is_absolute() else base / path)


def pin_paths(recipe: Recipe, base: Path) -> Recipe:
    """A new recipe whose relative paths are absolute against `base`.

    Ray Train workers run in their own working directory, so paths must mean the same everywhere.
    """
    from rtrain.tracking import TrackingError, resolve_tracking_uri

    raw = recipe.model_dump(mode="json")
    raw["run"]["output_root"] = _absolute(raw["run"]["output_root"], base)
    raw["checkpoint"]["dir"] = _absolute(raw["checkpoint"]["dir"], base)
    raw["data"]["source"] = _absolute(raw["data"]["source"], base)
    raw["model"]["init_from"] = _absolute(raw["model"]["init_from"], base)
    uri = raw["tracking"]["uri"]
    if raw["tracking"]["enabled"] and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raw["tracking"]["uri"] = "sqlite:///" + str(base / uri[len("sqlite:///"):])
    pinned = recipe_from_dict(raw, where="recipe (paths made absolute)")
    if pinned.tracking.enabled:
        try:
            resolve_tracking_uri(pinned.tracking.uri)  # refuses the file store before any worker starts
        except TrackingError as exc:
            raise RecipeError(str(exc)) from None
    return pinned


def prepare_recipe(recipe: Recipe, base: Path | None = None) -> Recipe:
    check_model_name(recipe)
    return pin_paths(recipe, (base or Path.cwd()).resolve())


def write_resolved_recipe(recipe: Recipe) -> Path:
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    path = recipe.run_dir / RESOLVED_RECIPE_NAME
    path.write_text(recipe.to_yaml())
    return path


# ---------------------------------------------------------------- worker functions

def default_worker() -> WorkerFn:
    try:
        from rtrain.worker import run_worker
    except ImportError as exc:
        raise LaunchError(f"cannot import the training worker rtrain.worker.run_worker: {exc}") from exc
    return run_worker


def worker_reference(fn: WorkerFn) -> str:
    """"module:qualname" of a function a fresh interpreter can import (local processes re-import it)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        raise LaunchError(f"worker function {fn!r} must be a module-level function of an importable module")
    return f"{module}:{qualname}"


def load_worker(reference: str) -> WorkerFn:
    module_name, _, qualname = reference.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def load_worker_or_fail(reference: str) -> WorkerFn:
    if ":" not in reference:
        raise LaunchError(f"--worker {reference!r}: expected MODULE:FUNCTION")
    try:
        return load_worker(reference)
    except (ImportError, AttributeError) as exc:
        raise LaunchError(f"--worker {reference!r}: cannot import it ({exc})") from None


def python_path() -> str:
    """The launcher's own import path, so workers import rtrain (and a --worker module) the way it does.

    The interpreter's stdlib and site-packages are left out: each worker's Python brings its own.
    """
    installs = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    entries = []
    for entry in sys.path:
        path = Path(entry or os.curdir).resolve()
        # Path-hook markers of editable installs are not folders; the workers' site-packages has them too.
        if path.exists() and not any(path.is_relative_to(root) for root in installs):
            entries.append(str(path))
    return os.pathsep.join(dict.fromkeys(entries))


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- local launcher

def rank_main(argv: list[str]) -> int:
    """Entry point of one local rank: run the worker, rank 0 writes its summary, failures write an error file."""
    reference, recipe_path, exchange_dir = argv
    rank = int(os.environ["RANK"])
    exchange = Path(exchange_dir)
    try:
        result = load_worker(reference)({"recipe_yaml": Path(recipe_path).read_text()})
        if rank == 0:
            summary = result if isinstance(result, dict) else {"result": result}
            (exchange / SUMMARY_FILE).write_text(json.dumps(summary, default=str))
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        traceback.print_exc()
        (exchange / f"rank-{rank}.error").write_text(f"{type(exc).__name__}: {exc}")
        return 1


def _rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world_size), NODE_RANK="0", GROUP_RANK="0",
               MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), PYTHONPATH=python_path())
    # As torchrun does: without a cap every rank starts one thread per core and they fight over the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
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


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While ranks run, SIGTERM to the launcher (scancel, kill) unwinds it so the ranks are stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise LaunchError("launcher received SIGTERM; stopping all ranks")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _failed_ranks(procs: list[subprocess.Popen]) -> list[tuple[int, int]]:
    return [(rank, proc.poll()) for rank, proc in enumerate(procs) if proc.poll() not in (None, 0)]


def _root_cause(failed: list[tuple[int, int]], exchange: Path) -> tuple[int, int]:
    """Of the ranks found failed at once, the one whose error was written first: the others usually
    died of it (a collective losing its peer)."""
    def written_at(item: tuple[int, int]) -> float:
        error_file = exchange / f"rank-{item[0]}.error"
        return error_file.stat().st_mtime if error_file.exists() else float("inf")

    return min(failed, key=lambda item: (written_at(item), item[0]))


def _failure_message(rank: int, code: int, exchange: Path) -> str:
    error_file = exchange / f"rank-{rank}.error"
    why = error_file.read_text() if error_file.exists() else f"exit code {code}"
    return f"rank {rank} failed: {why}"


def _start_ranks(reference: str, recipe_path: Path, exchange: Path, world_size: int) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen([sys.executable, "-c", CHILD_ENTRY, reference, str(recipe_path), str(exchange)],
                         env=_rank_env(rank, world_size, port))
        for rank in range(world_size)
    ]


def _wait_all_or_first_failure(procs: list[subprocess.Popen], exchange: Path) -> tuple[int, int] | None:
    while any(p.poll() is None for p in procs) and not _failed_ranks(procs):
        time.sleep(POLL_INTERVAL_S)
    failed = _failed_ranks(procs)
    return _root_cause(failed, exchange) if failed else None


def launch_local(recipe: Recipe, worker_fn: WorkerFn, recipe_path: Path) -> dict:
    """Run dist.num_workers ranks as processes here; the first failing rank stops all the others."""
    reference = worker_reference(worker_fn)
    with tempfile.TemporaryDirectory(prefix="rtrain-launch-") as tmp, _sigterm_raises():
        exchange = Path(tmp)
        procs: list[subprocess.Popen] = []
        try:
            procs = _start_ranks(reference, recipe_path, exchange, recipe.dist.num_workers)
            failure = _wait_all_or_first_failure(procs, exchange)
            if failure:
                raise LaunchError(_failure_message(*failure, exchange))
        finally:
            _terminate(procs)
        summary_file = exchange / SUMMARY_FILE
        return json.loads(summary_file.read_text()) if summary_file.exists() else {}


# ---------------------------------------------------------------- Ray launcher

def _connect_ray(recipe: Recipe) -> bool:
    """Connect to (or start) Ray; True when this call did the ray.init and so owns the shutdown.

    Workers get the driver's import path, so they import rtrain (and a --worker module) from the same
    place; on a cluster that means the code sits on a filesystem every node mounts at the same path.
    """
    from rtrain.dist.ray_cluster import connect_or_start_ray

    needed = recipe.dist.num_workers * recipe.dist.cpus_per_worker
    return connect_or_start_ray(recipe.dist.ray_address, num_cpus=max(os.cpu_count() or 1, needed),
                                runtime_env={"env_vars": {"PYTHONPATH": python_path()}})


def _ray_failure_message(exc: Exception) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        return "\n".join(f"rank {rank} failed: {type(err).__name__}: {err}"
                         for rank, err in sorted(failures.items()))
    return str(exc)


def launch_ray(recipe: Recipe, worker_fn: WorkerFn, max_failures: int = 0) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    d = recipe.dist
    owns_ray = _connect_ray(recipe)
    try:
        trainer = TorchTrainer(
            worker_fn,
            train_loop_config={"recipe_yaml": recipe.to_yaml()},
            scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                         resources_per_worker={"CPU": d.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
            run_config=RunConfig(name=recipe.run.name, storage_path=str(recipe.run_dir.resolve() / "ray"),
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise LaunchError(f"Ray Train run {recipe.run.name!r} failed:\n{_ray_failure_message(exc)}") from exc
    finally:
        if owns_ray:
            ray.shutdown()
    # Rank 0's return value is the summary; a worker that reports instead leaves it in result.metrics.
    if isinstance(result.return_value, dict):
        return result.return_value
    return dict(result.metrics or {})


# ---------------------------------------------------------------- entry points

def launch(recipe: Recipe, worker_fn: WorkerFn | None = None, max_failures: int | None = None) -> dict:
    """Validate and run `recipe` with its dist.launcher; returns rank 0's summary or raises LaunchError."""
    recipe = prepare_recipe(recipe)
    recipe_path = write_resolved_recipe(recipe)
    worker_fn = worker_fn or default_worker()
    d = recipe.dist
    print(f"rtrain: run {recipe.run.name!r}: model {recipe.model.name}, {d.num_workers} worker(s) "
          f"({'GPU/nccl' if d.use_gpu else 'CPU/gloo'}) via the {d.launcher} launcher; "
          f"resolved recipe {recipe_path}", file=sys.stderr, flush=True)
    if d.launcher == "local":
        return launch_local(recipe, worker_fn, recipe_path)
    return launch_ray(recipe, worker_fn, recipe.dist.max_failures if max_failures is None else max_failures)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rtrain.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.2 dist.num_workers=4")
    parser.add_argument("--worker", metavar="MODULE:FUNCTION",
                        help="per-worker function to run instead of rtrain.worker:run_worker")
    parser.add_argument("--max-failures", type=int, default=None,
                        help="ray launcher: restart the worker group this many times after a failure "
                             "(default: the recipe's dist.max_failures)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        worker_fn = load_worker_or_fail(args.worker) if args.worker else None
        summary = launch(recipe, worker_fn, max_failures=args.max_failures)
    except RecipeError as exc:
        print(exc, file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"rtrain: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, default=str, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
