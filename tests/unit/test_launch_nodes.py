"""The local launcher's share of a multi-node run (RTRAIN_NNODES/RTRAIN_NODE_RANK/MASTER_*), as
cluster/slurm/rtrain-srun.sbatch sets it per node, and the environment each of its ranks gets."""

from __future__ import annotations

import pytest

from rtrain.launch.local import LaunchError, NodeSlot, _rank_env, node_slot


def test_one_node_by_default(monkeypatch):
    monkeypatch.delenv("RTRAIN_NNODES", raising=False)
    slot = node_slot(4)
    assert (slot.nnodes, slot.node_rank, slot.first_rank, slot.local_world_size) == (1, 0, 0, 4)
    assert slot.master_addr == "127.0.0.1" and slot.master_port > 0


def test_second_of_two_nodes_starts_the_upper_half(monkeypatch):
    monkeypatch.setenv("RTRAIN_NNODES", "2")
    monkeypatch.setenv("RTRAIN_NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29400")
    slot = node_slot(4)
    assert (slot.first_rank, slot.local_world_size, slot.master_addr, slot.master_port) == (2, 2, "10.0.0.7", 29400)
    env = _rank_env(1, slot)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["NODE_RANK"]) == (
        "3", "1", "4", "2", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.7", "29400")


@pytest.mark.parametrize("nnodes,node_rank,addr,message", [
    ("2", "0", "h", "must split evenly"),        # 3 workers over 2 nodes
    ("3", "3", "h", "must split evenly"),        # node rank out of range
    ("3", "0", "", "MASTER_ADDR=''"),
    ("3", "x", "h", "RTRAIN_NODE_RANK='x'"),
])
def test_inconsistent_node_settings_are_one_line_errors(monkeypatch, nnodes, node_rank, addr, message):
    monkeypatch.setenv("RTRAIN_NNODES", nnodes)
    monkeypatch.setenv("RTRAIN_NODE_RANK", node_rank)
    monkeypatch.setenv("MASTER_ADDR", addr)
    monkeypatch.setenv("MASTER_PORT", "29400")
    with pytest.raises(LaunchError, match=message) as caught:
        node_slot(3)
    assert "\n" not in str(caught.value)


def test_slot_arithmetic():
    assert NodeSlot(8, 4, 3, "h", 1).first_rank == 6
