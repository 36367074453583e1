"""MLflow system metrics per node on 2 gloo processes and a real (sqlite) MLflow store: rank 0's tracker
samples its host, and a rank that is the first of another host samples that one into the same run under its
own node id, with the run id rank 0 broadcast. The second host is a name given to rank 1 (one machine here)."""

from __future__ import annotations

import os
import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from rtrain.config import Recipe
from rtrain.tracking.mlflow import MlflowTracker
from rtrain.tracking.null import NullTracker
from rtrain.tracking.system_metrics import first_rank_of_its_host, node_metrics, shared_run_id

OTHER = "node-b.example"


def _rank(rank: int, port: int, uri: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3)
    tracking = Recipe().with_overrides([f"tracking.uri={uri}", "tracking.system_metrics=true",
                                        "tracking.system_metrics_interval_s=0.5"]).tracking
    hosts = [socket.gethostname(), OTHER, OTHER]  # rank 2 shares rank 1's host: no monitor of its own
    tracker = MlflowTracker(uri, "nodes", "run", system_metrics_interval_s=0.5) if rank == 0 else NullTracker()
    run_id = shared_run_id(getattr(tracker, "run_id", None))
    with node_metrics(tracking, hosts, rank, run_id) as monitor:
        assert (monitor is not None) == (rank == 1)
        time.sleep(2.5)
    dist.barrier()
    tracker.finish("FINISHED")
    dist.destroy_process_group()


def test_each_host_logs_its_system_metrics_under_its_own_node_id(tmp_path, port):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mp.spawn(_rank, args=(port, uri), nprocs=3)
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    nodes = {key.split("/")[1] for key in run.data.metrics if key.startswith("system/")}
    assert nodes == {socket.gethostname(), OTHER}
    for node in nodes:
        assert client.get_metric_history(run.info.run_id, f"system/{node}/cpu_utilization_percentage")


def test_the_first_rank_of_each_host_samples_it():
    hosts = ["a", "a", "b", "b", "c"]
    assert [rank for rank in range(5) if first_rank_of_its_host(hosts, rank)] == [0, 2, 4]
