"""detect_env: torchrun-like, SLURM-like and empty environments; SLURM nodelist expansion; the
already-initialized process group (as Ray Train leaves it)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rtrain.distributed.env import (
    DistEnv,
    DistEnvError,
    detect_env,
    expand_nodelist,
    init_distributed,
    shutdown_distributed,
)


def test_single_process_when_nothing_is_set():
    env = detect_env({})
    assert env == DistEnv(0, 1, 0, 1, 0, "127.0.0.1", 29500, "single")
    assert env.is_main and not env.is_distributed


def test_torchrun_environment():
    env = detect_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                      "GROUP_RANK": "1", "MASTER_ADDR": "node-a", "MASTER_PORT": "29400"})
    assert env == DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1,
                          master_addr="node-a", master_port=29400, source="env")
    assert env.is_distributed and not env.is_main


def test_plain_env_wins_over_slurm():
    env = detect_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "SLURM_PROCID": "7",
                      "SLURM_NTASKS": "16"})
    assert (env.source, env.rank, env.world_size, env.local_world_size) == ("env", 1, 2, 2)


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "0"}, "WORLD_SIZE is missing"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is missing"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "rank 2 outside [0, 2)"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"},
     "local rank 3 outside"),
])
def test_inconsistent_plain_env_names_the_variable(environ, message):
    with pytest.raises(DistEnvError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        detect_env(environ)


def test_slurm_environment_takes_master_from_first_node():
    env = detect_env({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
                      "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[007-008]",
                      "SLURM_JOB_ID": "123456"})
    assert env == DistEnv(rank=6, world_size=8, local_rank=2, local_world_size=4, node_rank=1,
                          master_addr="gpu007", master_port=15000 + 123456 % 20000, source="slurm")


def test_slurm_respects_explicit_master_and_tasks_per_node():
    env = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2",
                      "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "4242"})
    assert (env.master_addr, env.master_port, env.local_world_size) == ("10.0.0.9", 4242, 2)


def test_slurm_port_differs_between_jobs():
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}
    ports = {detect_env({**base, "SLURM_JOB_ID": str(job)}).master_port for job in (100, 101, 102)}
    assert len(ports) == 3


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("gpu[007-010]", ["gpu007", "gpu008", "gpu009", "gpu010"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("node-[98-101]", ["node-98", "node-99", "node-100", "node-101"]),
    ("x[3]", ["x3"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, message", [
    ("n[1-3", "unbalanced"),
    ("n1-3]", "unbalanced"),
    ("n[a-b]", "bad range"),
    ("n[5-2]", "descending"),
    ("", "names no host"),
])
def test_bad_nodelist_is_named(nodelist, message):
    with pytest.raises(DistEnvError, match=message):
        expand_nodelist(nodelist)


def test_single_process_init_returns_cpu_and_needs_no_group():
    env = detect_env({})
    assert init_distributed(env, use_gpu=False) == torch.device("cpu")
    assert not dist.is_initialized()
    shutdown_distributed()  # nothing to destroy: must not raise


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpu_requested_without_cuda_is_a_clear_error():
    with pytest.raises(DistEnvError, match="use_gpu=true but CUDA is not available"):
        init_distributed(detect_env({}), use_gpu=True)


def test_initialized_group_is_read_from_torch(port):
    """Ray Train initializes the process group before the worker runs: rank and world come from it."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        env = detect_env({"LOCAL_RANK": "0", "RANK": "3", "WORLD_SIZE": "9"})
        assert (env.source, env.rank, env.world_size, env.local_rank) == ("torch", 0, 1, 0)
        assert init_distributed(env, use_gpu=False) == torch.device("cpu")
    finally:
        shutdown_distributed()
    assert not dist.is_initialized()
