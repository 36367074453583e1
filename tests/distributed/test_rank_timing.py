"""Who holds the run back, on 2 gloo processes through the real loop: rtrain's SyncBN and DDP time what each
rank waits for the other (rtrain.distributed.waits), every log window gathers both ranks' timing, and rank 0's
StragglerWatch names the slow rank and what dominated: its loader (data wait) or its own steps (compute)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_engine import MemoryLoader, tiny_model  # noqa: E402

from rtrain.config import PrecisionConfig, Recipe  # noqa: E402
from rtrain.distributed.backend import DDPBackend  # noqa: E402
from rtrain.distributed.scaler import build_scaler  # noqa: E402
from rtrain.distributed.syncbn import convert_sync_batchnorm  # noqa: E402
from rtrain.distributed.waits import CollectiveClock  # noqa: E402
from rtrain.engine.loop import FitParts, fit  # noqa: E402
from rtrain.engine.step import Normalizer, TrainStep  # noqa: E402
from rtrain.optim.schedule import LRSchedule  # noqa: E402
from rtrain.tracking.stragglers import StragglerWatch  # noqa: E402

CPU = torch.device("cpu")
DELAY_S = 0.15


class SlowLoader(MemoryLoader):
    """A loader that makes its rank wait DELAY_S for every batch."""

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(DELAY_S)
            yield batch


class SlowStep:
    """A train step that spends DELAY_S more of its rank's compute before the real one."""

    def __init__(self, step: TrainStep) -> None:
        self.step = step

    def __call__(self, images, labels):
        time.sleep(DELAY_S)
        return self.step(images, labels)


def _rank(rank: int, port: int, slow: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    clock = CollectiveClock()
    model = convert_sync_batchnorm(tiny_model(), clock=clock)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backend = DDPBackend(model, opt, build_scaler(PrecisionConfig(), CPU), device=CPU, clock=clock)
    step = TrainStep(backend, Normalizer((0.5,) * 3, (0.25,) * 3, CPU), PrecisionConfig())
    loader = (SlowLoader if rank == 1 and slow == "data" else MemoryLoader)(batches=12, seed=rank)
    recipe = Recipe().with_overrides(["train.global_batch=16", "train.log_every_steps=3"])
    records: list[dict] = []
    watch = StragglerWatch(["host-a", "host-b"], fraction=0.3, windows=3, on_straggler=records.append)
    parts = FitParts(train=recipe.train, precision=recipe.precision, evaluation=recipe.eval,
                     checkpoint=recipe.checkpoint, backend=backend,
                     train_step=SlowStep(step) if rank == 1 and slow == "compute" else step, train_loader=loader,
                     evaluate=lambda m: {"top1": 0.0, "top5": 0.0, "loss": 0.0, "samples": 0},
                     schedule=LRSchedule("constant", 0.05, 12), total_steps=12, steps_per_epoch=12, rank=rank,
                     collective_s=lambda: clock.seconds, rank_times=watch.observe if rank == 0 else None)
    tables: list = []
    if rank == 0:
        parts.rank_times = lambda step_, table: tables.append(table) or watch.observe(step_, table)
    fit(parts)
    if rank == 0:
        torch.save({"tables": tables, "named": records}, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # DDP + gloo's C++ teardown aborts now and then at exit (see test_syncbn.py); all was checked


@pytest.mark.parametrize("slow,dominant", [("data", "data wait"), ("compute", "compute")])
def test_the_slow_rank_is_named_with_what_dominated(tmp_path, port, slow, dominant):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank, args=(port, slow, out), nprocs=2)
    found = torch.load(out, weights_only=False)
    tables, named = found["tables"], found["named"]
    assert [len(table) for table in tables] == [2, 2, 2, 2]  # 4 windows of 3 steps, both ranks in each
    for fast, slow_row in ((t[0], t[1]) for t in tables):
        assert slow_row["steps"] == 3
        # the fast rank spent the slow one's extra time blocked in collectives, the slow one hardly any
        assert fast["collective_s"] > 0.5 * 3 * DELAY_S > slow_row["collective_s"]
        key = "data_wait_s" if slow == "data" else "step_s"
        assert slow_row[key] > 3 * DELAY_S
    assert [(n["straggler"], n["straggler_host"], n["dominated"], n["step"]) for n in named] == \
        [(1, "host-b", dominant, 9)]  # 3 windows in a row: named once, at the third
    assert named[0]["seconds_per_step"] > DELAY_S > named[0]["median_s"]
