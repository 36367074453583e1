"""Two processes on gloo read the same shards: each epoch covers every sample once, ranks step in lockstep."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_loader_fixtures import small_cfg, write_split

COUNTS = [7, 3, 12, 5, 1, 9, 4]  # 41 samples, deliberately unequal shards
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str, out: str) -> None:
    from rtrain.data import build_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for split, train, batch in (("train", True, 4), ("val", False, 6)):
            loader = build_loader(small_cfg(root, num_workers=0), split, rank=rank, world_size=WORLD,
                                  batch_size=batch, seed=9, train=train)
            for epoch in range(2):
                loader.set_epoch(epoch)
                steps, ids = 0, []
                for _, labels in loader:
                    steps += 1
                    ids += labels.tolist()
                    dist.barrier()  # a rank with fewer batches than the other would hang here
                gathered = [None] * WORLD
                dist.all_gather_object(gathered, (steps, len(loader), ids))
                results[(split, epoch)] = gathered
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_cover_each_sample_once_per_epoch(tmp_path: Path) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    write_split(tmp_path, "val", COUNTS, label_is_id=True)
    out = tmp_path / "result.pt"
    mp.start_processes(_worker, args=(free_port(), str(tmp_path), str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")
    results = torch.load(out, weights_only=False)
    orders = []
    for (split, epoch), per_rank in results.items():
        steps = {s for s, _, _ in per_rank} | {n for _, n, _ in per_rank}
        assert len(steps) == 1, f"{split} epoch {epoch}: ranks took different step counts {per_rank}"
        ids = [i for _, _, rank_ids in per_rank for i in rank_ids]
        assert len(ids) == len(set(ids)), f"{split} epoch {epoch}: a sample was read twice"
        if split == "val":
            assert sorted(ids) == list(range(41))
        else:
            assert len(ids) == (41 // (WORLD * 4)) * WORLD * 4
            orders.append(ids)
    assert orders[0] != orders[1], "train epochs should be shuffled differently"
