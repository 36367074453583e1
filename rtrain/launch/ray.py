"""The Ray launcher: a TorchTrainer on the cluster at dist.ray_address, else RAY_ADDRESS (which `ray job
submit` sets for its entrypoint), else a Ray started here, with a dashboard so Ray Train's state polling works.

Worker loss: with dist.max_failures >= 1 Ray restarts the whole worker group after a worker dies; each
worker then resumes from the newest verified checkpoint (checkpoint.resume: auto), so the run finishes as if
uninterrupted. With max_failures 0 the run stops with one line naming the rank that died.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from rtrain._process import HEAD_LOST_NOTE, HEARTBEATS_DIR, read_stall_note
from rtrain.config import Recipe
from rtrain.distributed.ray_cluster import HeadWatch
from rtrain.launch.reaper import guarded
from rtrain.launch.signals import LauncherSignals
from rtrain.launch.errors import LaunchError, resume_hint, stalled_run_error
from rtrain.launch.workers import WorkerFn, lost_a_peer, python_path

# Set by Ray for the entrypoint of a job submitted with `ray job submit`.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _connect_ray(recipe: Recipe) -> bool:
    """Connect to (or start) Ray; True when this call did the ray.init and so owns the shutdown.

    Outside a Ray job, workers get the driver's import path, so they import rtrain (and a --worker module)
    from the same place; on a cluster that means the code sits on a filesystem every node mounts at the
    same path. Inside a job, the job's runtime env (--working-dir, or rtrain installed on the nodes) does.
    """
    from rtrain.distributed.ray_cluster import connect_or_start_ray

    address = recipe.dist.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise LaunchError(
            f"Ray address {address} is a job server (dashboard) URL, which takes jobs, not drivers: submit "
            f"with `ray job submit --address {address} --working-dir . -- python -m rtrain.launch ...`, or set "
            "RAY_ADDRESS to the cluster's GCS address (host:port) to drive it from this process")
    in_job = JOB_CONFIG_ENV in os.environ
    needed = recipe.dist.num_workers * recipe.dist.cpus_per_worker
    runtime_env = None if in_job else {"env_vars": {"PYTHONPATH": python_path()}}
    return connect_or_start_ray(recipe.dist.ray_address, num_cpus=max(os.cpu_count() or 1, needed),
                                runtime_env=runtime_env)


def _died(error: BaseException) -> bool:
    """The worker process itself is gone (killed, out of memory, node lost), not an error it raised."""
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    return isinstance(error, (ActorDiedError, WorkerHealthCheckFailedError)) or isinstance(
        error.__cause__, ActorDiedError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _ray_failure_message(exc: Exception, recipe: Recipe, max_failures: int) -> str:
    """One line: the root cause (a rank whose process died beats the peers that lost it), what to do."""
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return f"Ray Train run {recipe.run.name!r} failed: {_first_line(exc)}"
    died = sorted(rank for rank, error in failures.items() if _died(error))
    if died:
        cause = (f"rank {died[0]}'s worker process died (killed, out of memory or its node lost), "
                 f"after {max_failures} restart(s) allowed by dist.max_failures")
    else:
        causes = [rank for rank, error in failures.items() if not lost_a_peer(error)]
        rank = min(causes or failures)
        cause = f"rank {rank} failed: {_first_line(failures[rank])}"
        if _refused_checkpoints(failures[rank]):  # its message says what to do; there is nothing to resume
            return f"Ray Train run {recipe.run.name!r} failed: {cause}"
    return f"Ray Train run {recipe.run.name!r} failed: {cause}; {resume_hint(recipe)}"


def _refused_checkpoints(error: BaseException) -> bool:
    from rtrain.checkpoint import CheckpointsDamaged

    return isinstance(error, CheckpointsDamaged)


@contextmanager
def _grace_watchdog(signals: LauncherSignals) -> Iterator[None]:
    """trainer.fit() blocks the main thread: once a stop's grace period is over, interrupt it."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            if signals.grace_expired:
                _thread.interrupt_main()
                return

    watcher = threading.Thread(target=watch, name="rtrain-grace-watchdog", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


HEAD_LOST_SIGNAL = signal.SIGUSR2


def _flush_worker_logs() -> None:
    """Print now the workers' lines that Ray's log deduplicator holds back, and nothing after: without a GCS
    there is no ray.shutdown() before the closing line, and Ray flushes them at exit, after it. Ray-internal,
    hence guarded: the worst case is a late line."""
    try:
        from ray._private import worker

        worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        for deduplicator, stream in ((worker.stdout_deduplicator, sys.stdout),
                                     (worker.stderr_deduplicator, sys.stderr)):
            for leftover in deduplicator.flush():
                worker.print_worker_logs(leftover, stream)
    except Exception:  # noqa: BLE001
        pass


def _rank0_word(recipe: Recipe, wait_s: float) -> str:
    """What rank 0 did with the MLflow run once it saw the head lost too (it sees it within about a second
    of the driver): its note, waited for at most `wait_s` (the reaper of a Ray started here ends it after)."""
    deadline = time.monotonic() + max(wait_s, 5.0)
    while time.monotonic() < deadline:
        if note := read_stall_note(recipe.run_dir, HEAD_LOST_NOTE):
            return note
        time.sleep(0.2)
    return f"rank 0 did not say within {max(wait_s, 5.0):g} s whether it marked the MLflow run FAILED"


def _head_lost_error(recipe: Recipe, head: HeadWatch) -> LaunchError:
    _flush_worker_logs()
    lost = head.lost or "lost the Ray head (the workers saw its GCS gone first)"
    return LaunchError(f"Ray Train run {recipe.run.name!r} stopped: {lost}; the workers stopped themselves; "
                       f"{_rank0_word(recipe, head.timeout_s)}; once Ray runs again, {resume_hint(recipe)}")


@contextmanager
def _interrupted_when_lost(head: HeadWatch) -> Iterator[None]:
    """Watch the head during the block; once it is lost, the main thread gets a KeyboardInterrupt wherever it
    waits (what a wait inside Ray passes on; other exceptions raised in a signal handler it drops)."""
    def raise_lost(signum: int, frame: object) -> None:
        if head.lost:
            raise KeyboardInterrupt(head.lost)
        if callable(previous):  # not ours: whoever listened before still hears it
            previous(signum, frame)

    if head.timeout_s <= 0 or threading.current_thread() is not threading.main_thread():
        yield  # off, or a launch from another thread (a signal handler is the main thread's): Ray's own abort
        return
    previous = signal.getsignal(HEAD_LOST_SIGNAL)
    signal.signal(HEAD_LOST_SIGNAL, raise_lost)
    try:
        with head:
            yield
    finally:
        signal.signal(HEAD_LOST_SIGNAL, previous)


def launch_ray(recipe: Recipe, worker_fn: WorkerFn, max_failures: int = 0) -> dict:
    import ray

    starts_ray = not ray.is_initialized() and not (recipe.dist.ray_address or os.environ.get("RAY_ADDRESS"))
    with guarded() if starts_ray else nullcontext():  # a SIGKILLed launcher must not leave its Ray behind
        return _launch_ray(recipe, worker_fn, max_failures)


def _launch_ray(recipe: Recipe, worker_fn: WorkerFn, max_failures: int) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    d = recipe.dist
    owns_ray = _connect_ray(recipe)
    # After ray.init, which installs handlers of its own: a stop signal now asks the workers to checkpoint.
    signals = LauncherSignals(recipe.run_dir, recipe.checkpoint.preempt_grace_s)
    (recipe.run_dir / HEARTBEATS_DIR / HEAD_LOST_NOTE).unlink(missing_ok=True)  # an earlier attempt's
    # A lost head (GCS) leaves trainer.fit() waiting for Ray's own 60 s abort: interrupt it first (not with
    # SIGINT: Ray Train's handler for it asks the controller, on the lost head, to abort, and waits).
    head = HeadWatch(d.ray_head_timeout_s, on_lost=lambda reason: _thread.interrupt_main(HEAD_LOST_SIGNAL))
    try:
        trainer = TorchTrainer(
            worker_fn,
            train_loop_config={"recipe_yaml": recipe.to_yaml(secrets=True)},  # to the workers only
            scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                         resources_per_worker={"CPU": d.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo",
                                     timeout_s=int(d.collective_timeout_s)),
            run_config=RunConfig(name=recipe.run.name, storage_path=str(recipe.run_dir.resolve() / "ray"),
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        with signals.installed(), _grace_watchdog(signals), _interrupted_when_lost(head):
            result = trainer.fit()
    except TrainingFailedError as exc:
        if head.lost or read_stall_note(recipe.run_dir, HEAD_LOST_NOTE):  # the ranks saw it first and exited
            raise _head_lost_error(recipe, head) from None
        stalled = stalled_run_error(recipe.run_dir, resume_hint(recipe))
        raise stalled or LaunchError(_ray_failure_message(exc, recipe, max_failures)) from exc
    except KeyboardInterrupt:  # raised by a watchdog: the head is lost, or the grace period ran out
        if head.lost:
            raise _head_lost_error(recipe, head) from None
        raise LaunchError(f"after {signals.received} the workers did not checkpoint within "
                          f"checkpoint.preempt_grace_s={signals.grace_s:g} s; they were stopped") from None
    finally:
        if owns_ray and not head.lost:  # without a GCS, Ray's shutdown waits for it (reaper.py ends the rest)
            ray.shutdown()
    # Rank 0's return value is the summary; a worker that reports instead leaves it in result.metrics.
    if isinstance(result.return_value, dict):
        return result.return_value
    return dict(result.metrics or {})
