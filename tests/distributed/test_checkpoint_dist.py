"""Two real processes on gloo save per-rank state into one directory and each loads back its own."""

import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_main(rank, port, root, result_dir):
    # imported here: spawned children re-import this module and must find rtrain on their own
    import random

    import numpy as np

    from rtrain.checkpoint import CheckpointManager
    from rtrain.engine.rng import capture_rng_state, restore_rng_state

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        np.random.seed(100 + rank)
        model = torch.nn.Linear(8, 4)
        dist.broadcast(model.weight.data, src=0)
        for step, async_save in ((1, False), (2, True)):
            manager = CheckpointManager(root, keep=2, rank=rank, world_size=WORLD_SIZE, async_save=async_save,
                                        finalize_timeout_s=60)
            manager.save(step, shared={"model": model.state_dict()},
                         per_rank={"rng": capture_rng_state(), "mine": {"rank": rank, "t": torch.full((3,), rank)}},
                         meta={"step": step})
            manager.close()
        expected_draws = torch.rand(4)
        torch.rand(10)  # the run moves on before being restarted
        dist.barrier()

        loaded = CheckpointManager(root, rank=rank, world_size=WORLD_SIZE).latest()
        restore_rng_state(loaded.per_rank["rng"])
        restored_draws = torch.rand(4)
        gathered = [torch.zeros(4) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, loaded.per_rank["mine"]["t"].float().repeat(2)[:4])
        report = {
            "step": loaded.step,
            "mine": loaded.per_rank["mine"]["rank"],
            "rng_replayed": torch.equal(restored_draws, expected_draws),
            "weights_match": torch.equal(loaded.shared["model"]["weight"], model.weight.data),
            "gathered": [int(t[0]) for t in gathered],
            "meta": loaded.meta,
        }
        torch.save(report, os.path.join(result_dir, f"rank{rank}.pt"))
    except Exception:
        traceback.print_exc(file=sys.stderr)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_gloo_ranks_save_and_each_loads_its_own(tmp_path):
    root, result_dir = tmp_path / "ckpt", tmp_path / "results"
    result_dir.mkdir()
    mp.spawn(rank_main, args=(free_port(), str(root), str(result_dir)), nprocs=WORLD_SIZE, join=True)

    for rank in range(WORLD_SIZE):
        report = torch.load(result_dir / f"rank{rank}.pt", weights_only=True)
        assert report["step"] == 2
        assert report["mine"] == rank
        assert report["rng_replayed"], f"rank {rank} did not replay its own random stream"
        assert report["weights_match"]
        assert report["gathered"] == list(range(WORLD_SIZE))
        assert report["meta"] == {"step": 2}
    assert sorted(p.name for p in root.iterdir()) == ["step-000000001", "step-000000002"]
    for rank in range(WORLD_SIZE):
        assert (root / "step-000000002" / f"rank-{rank:05d}" / "rng.pt").is_file()


def agree_main(rank, port, result_dir):
    """Each rank 'resumed' on its own; the worker's check after resume compares the ranks' choices."""
    from rtrain.checkpoint import CheckpointError, Loaded
    from rtrain.launch.worker import _same_on_every_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    outcome = []
    try:
        same = Loaded(9, "s3://b/run/step-000000009", {}, {}, {}, 2, "t-9-1")
        _same_on_every_rank(same)
        outcome.append("same: agreed")
        late = Loaded(12, "s3://b/run/step-000000012", {}, {}, {}, 2, "u-12-1")  # published between choices
        try:
            _same_on_every_rank(same if rank == 0 else late)
            outcome.append("different: agreed")
        except CheckpointError as error:
            outcome.append(f"different: {error}")
    finally:
        dist.destroy_process_group()
        with open(os.path.join(result_dir, f"agree-{rank}.txt"), "w") as out:
            out.write("\n".join(outcome))


def test_ranks_that_resumed_different_checkpoints_stop_named(tmp_path):
    mp.spawn(agree_main, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        same, different = (tmp_path / f"agree-{rank}.txt").read_text().splitlines()
        assert same == "same: agreed"
        assert different == ("different: the ranks resumed different checkpoints (rank 0: "
                             "s3://b/run/step-000000009; rank 1: s3://b/run/step-000000012): the checkpoint folder "
                             "changed while they chose (another writer?); rerun the same command")
