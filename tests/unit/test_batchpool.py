"""Pooled batch memory between DataLoader workers and the rank: the same batches as in-process loading, in
either memory format; batches the caller keeps are never overwritten by later ones; a worker whose buffer is
still busy falls back to a fresh batch; buffers are freed as batches are taken."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_loader_fixtures import small_cfg, write_split

from rtrain.data import build_loader
from rtrain.data.batchpool import BatchPool, PooledBatch

COUNTS = [9, 14, 6, 11, 8]  # 48 samples


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    return tmp_path


def kept_batches(root: Path, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches as handed out (the worker count is part of the plan: compare like with like)."""
    cfg = small_cfg(root, num_workers=workers)
    loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=3, train=True)
    loader.set_epoch(1)
    return list(loader)  # no copies: what the caller holds must stay as it was handed out


def without_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BatchPool, "claim", lambda self, worker: None)  # every batch a fresh shared one


def test_pooled_batches_equal_fresh_ones(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pooled = kept_batches(root, 2)
    without_pool(monkeypatch)
    reference = kept_batches(root, 2)
    in_process = kept_batches(root, 0)  # no worker processes: neither pool nor shared memory
    assert len(pooled) == len(reference) == 12
    for (a, la), (b, lb) in zip(reference, pooled):
        assert torch.equal(a, b) and torch.equal(la, lb)
        assert b.is_contiguous(memory_format=torch.channels_last)
    assert sorted(i for _, labels in in_process for i in labels.tolist()) == list(range(48))


def test_a_busy_buffer_means_a_fresh_batch(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        without_pool(patch)
        reference = kept_batches(root, 1)
    monkeypatch.setattr(BatchPool.__init__, "__defaults__", (1,))  # one buffer per worker: often still busy
    pooled = kept_batches(root, 1)
    assert len(pooled) == len(reference) and all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(reference, pooled))


def test_claim_take_release_cycle() -> None:
    pool = BatchPool(workers=2, batch_size=3, image_size=4, slots_per_worker=2)
    claims = [pool.claim(1), pool.claim(1)]
    assert [slot for slot, _ in claims] == [2, 3] and pool.claim(1) is None  # both of worker 1's are busy
    slot, images = claims[0]
    images[:2].fill_(7)
    taken = pool.take(PooledBatch(slot, 2))
    assert taken.shape == (2, 3, 4, 4) and int(taken.sum()) == 7 * 2 * 3 * 16
    images.fill_(1)  # the buffer is reused; what was taken is the caller's own memory
    assert int(taken.sum()) == 7 * 2 * 3 * 16
    assert pool.claim(1)[0] == 2  # freed: worker 1 gets it back
    assert pool.claim(0)[0] in (0, 1)  # (each worker process has its own cursor; here they share one)
