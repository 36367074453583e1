"""MLflow system metrics per node (tracking.system_metrics): CPU, memory, disk, network and, where present,
GPUs, sampled by MLflow's SystemMetricsMonitor on the first rank of every host and logged into the run as
`system/<host>/<metric>`. Rank 0's monitor lives in its tracker (rtrain.tracking.mlflow); the first rank of
each other host starts one here with the run id rank 0 shares (one broadcast at start); its sample steps go
on after the run's newest.

A host's monitor writes to the tracking URI straight from its own process: another host needs the MLflow
server (or database) reachable, as rank 0 does. One host's numbers, one node id: ranks sharing a host share
its monitor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from rtrain.config import TrackingConfig

log = logging.getLogger("rtrain.tracking.system_metrics")


def first_rank_of_its_host(hosts: list[str], rank: int) -> bool:
    """`hosts`: every rank's host, in rank order (rtrain.tracking.run_info.hosts_by_rank)."""
    return hosts.index(hosts[rank]) == rank


def shared_run_id(run_id: str | None) -> str | None:
    """Rank 0's MLflow run id on every rank (a collective: every rank calls it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return run_id
    box = [run_id]
    dist.broadcast_object_list(box, src=0)
    return box[0] if isinstance(box[0], str) else None


@contextmanager
def node_metrics(tracking: TrackingConfig, hosts: list[str], rank: int, run_id: str | None) -> Iterator[Any]:
    """A monitor for this host while the block runs, when this rank is its host's first and not rank 0."""
    monitor = None
    if rank != 0 and run_id and first_rank_of_its_host(hosts, rank):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        from rtrain.tracking.uri import resolve_tracking_uri

        try:
            monitor = SystemMetricsMonitor(run_id, sampling_interval=tracking.system_metrics_interval_s,
                                           resume_logging=True, node_id=hosts[rank],
                                           tracking_uri=resolve_tracking_uri(tracking.uri))
            monitor.start()
        except Exception as error:  # noqa: BLE001 - a host's metrics are never worth the run
            log.warning("system metrics of %s not started: %s: %s", hosts[rank], type(error).__name__, error)
            monitor = None
    try:
        yield monitor
    finally:
        if monitor is not None:
            monitor.finish()
