"""What a run is, as MLflow tags: rtrain version, git commit, world size, hosts, Ray/SLURM job, restarts.

`describe_run` is called by every rank (the host list is gathered with one all_gather_object when a process
group is up); only rank 0's tracker writes the result.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from rtrain.config import TrackingConfig
from rtrain.config.redact import redact_url

TAG_VERSION = "rtrain.version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own key: the UI shows it on the run page
TAG_WORLD_SIZE = "rtrain.world_size"
TAG_HOSTS = "rtrain.hosts"
TAG_RAY_JOB = "rtrain.ray_job_id"
TAG_SLURM_JOB = "rtrain.slurm_job_id"
TAG_SLURM_RESTARTS = "rtrain.slurm_restart_count"
TAG_ERROR = "rtrain.error"
TAG_STEPS_PER_EPOCH = "rtrain.steps_per_epoch"
RESPONSE_KEY = "layer_response/block_{:03d}"  # metric of one block's layer response (1-based)
ERROR_TAG_LIMIT = 5000


def rtrain_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rtrain")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The commit of the checkout rtrain runs from (None outside a git checkout, e.g. a Ray working_dir)."""
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def hosts_by_rank() -> list[str]:
    """Every rank's host name, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    host = socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()):
        return [host]
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, host)
    return [str(h) for h in everyone]


def _ray_job_id() -> str | None:
    ray = sys.modules.get("ray")  # a Ray Train worker has imported it; anywhere else it is not worth importing
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_job_id()


def describe_run(world_size: int, steps_per_epoch: int | None = None, hosts: list[str] | None = None
                 ) -> dict[str, str]:
    """Tags of this start of the run. Every rank must call it without `hosts` (then it gathers them)."""
    hosts = hosts_by_rank() if hosts is None else hosts
    tags = {TAG_VERSION: rtrain_version(), TAG_WORLD_SIZE: str(world_size), TAG_HOSTS: ",".join(sorted(set(hosts)))}
    if steps_per_epoch:
        tags[TAG_STEPS_PER_EPOCH] = str(steps_per_epoch)  # `rtrain compare` plots against epochs with it
    if commit := git_commit():
        tags[TAG_GIT_COMMIT] = commit
    if job := _ray_job_id():
        tags[TAG_RAY_JOB] = job
    if job := os.environ.get("SLURM_JOB_ID"):
        tags[TAG_SLURM_JOB] = job
        tags[TAG_SLURM_RESTARTS] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return tags


def error_text(error: BaseException | str) -> str:
    """One line naming the error, within MLflow's tag limit."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = redact_url(" ".join(text.split()))
    return text if len(text) <= ERROR_TAG_LIMIT else text[: ERROR_TAG_LIMIT - 3] + "..."


def http_environment(tracking: TrackingConfig) -> dict[str, str]:
    """MLflow reads its HTTP timeout and retries from these variables on every request."""
    return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(tracking.http_timeout_s),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(tracking.http_max_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(tracking.http_backoff_factor)}
