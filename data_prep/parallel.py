"""Run shard jobs as Ray tasks with a files/s + ETA progress bar.

Without an address a private local Ray is started with ``workers`` CPUs and shut down afterwards; with an
address (or inside ``ray job submit``, which sets RAY_ADDRESS) the job connects to that cluster. Workers
read the source and write the output through the same paths, so on a cluster both must live on a shared
filesystem, and ``data_prep`` / ``rtrain`` must be importable there (``ray job submit --working-dir .``).
"""

from __future__ import annotations

import os
import sys
from typing import ContextManager

from tqdm import tqdm

from data_prep.shards import ShardJob, ShardResult, ensure_shard
from rtrain.distributed import ray_cluster


class ShardWriteError(RuntimeError):
    """Some shards failed; the others are complete on disk and a rerun reuses them."""


def ray_session(address: str | None, workers: int | None) -> ContextManager[None]:
    """Ray for one data_prep run: a Ray the caller already started (tests, notebooks) is used and left up."""
    return ray_cluster.ray_session(address, num_cpus=workers or os.cpu_count() or 1)


def run_shard_jobs(jobs: list[ShardJob], progress: bool = True, desc: str = "") -> dict[str, tuple[ShardResult, bool]]:
    """Run every job; returns name -> (result, reused). Raises ShardWriteError naming failed shards."""
    import ray

    remote_ensure = ray.remote(num_cpus=1)(ensure_shard)
    pending = {remote_ensure.remote(job): job for job in jobs}
    results: dict[str, tuple[ShardResult, bool]] = {}
    failures: list[str] = []
    total_files = sum(len(job.files) for job in jobs)
    with tqdm(total=total_files, unit="file", desc=desc, disable=not progress, file=sys.stderr,
              mininterval=1.0, smoothing=0.1) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    results[job.name] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    failures.append(f"{job.name}: {exc}")
                bar.update(len(job.files))
    if failures:
        raise ShardWriteError(f"{len(failures)} shard(s) failed:\n" + "\n".join(failures))
    return results


def run_shard_jobs_in_process(jobs: list[ShardJob], progress: bool = False, desc: str = "") -> dict[str, tuple[ShardResult, bool]]:
    """The same jobs without Ray, one after another: for debugging and for tests of everything but Ray."""
    return {job.name: ensure_shard(job) for job in jobs}
