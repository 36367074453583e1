"""ShardLoader: determinism, equal batch counts per rank, coverage, batch format, prefetcher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_loader_fixtures import small_cfg, write_split

from rtrain.data import DevicePrefetcher, build_loader

UNEQUAL = [7, 3, 12, 5, 1, 9]  # 37 samples


@pytest.fixture
def ids_root(tmp_path: Path) -> Path:
    write_split(tmp_path, "train", UNEQUAL, label_is_id=True)
    write_split(tmp_path, "val", UNEQUAL, label_is_id=True)
    return tmp_path


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_same_seed_same_batches_and_epochs_differ(ids_root: Path) -> None:
    cfg = small_cfg(ids_root)
    make = lambda seed: build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=seed, train=True)
    first, again = make(7), make(7)
    epoch0 = batches(first)
    assert same_batches(epoch0, batches(again))
    first.set_epoch(1)
    epoch1 = batches(first)
    assert len(epoch1) == len(epoch0) == 37 // 4
    order = lambda bs: torch.cat([labels for _, labels in bs]).tolist()
    assert order(epoch0) != order(epoch1)
    assert order(epoch0) != order(batches(make(8)))


def test_deterministic_with_worker_processes(ids_root: Path) -> None:
    cfg = small_cfg(ids_root, num_workers=2)
    make = lambda: build_loader(cfg, "train", rank=1, world_size=2, batch_size=3, seed=1, train=True)
    assert same_batches(batches(make()), batches(make()))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world,batch", [(2, 3), (3, 4), (4, 2)])
def test_train_ranks_yield_equal_batches_without_repeats(ids_root: Path, workers: int, world: int,
                                                         batch: int) -> None:
    cfg = small_cfg(ids_root, num_workers=workers)
    loaders = [build_loader(cfg, "train", rank=r, world_size=world, batch_size=batch, seed=3, train=True)
               for r in range(world)]
    per_rank = [batches(loader) for loader in loaders]
    expected = 37 // (world * batch)
    assert [len(b) for b in per_rank] == [expected] * world == [len(loader) for loader in loaders]
    seen = [i for rank in per_rank for _, labels in rank for i in labels.tolist()]
    assert len(seen) == len(set(seen)) == expected * world * batch == loaders[0].num_samples


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world,batch", [(2, 3), (3, 4), (4, 8)])
def test_eval_covers_every_sample_exactly_once(ids_root: Path, workers: int, world: int, batch: int) -> None:
    cfg = small_cfg(ids_root, num_workers=workers)
    loaders = [build_loader(cfg, "val", rank=r, world_size=world, batch_size=batch, seed=3, train=False)
               for r in range(world)]
    per_rank = [batches(loader) for loader in loaders]
    assert len({len(b) for b in per_rank}) == 1
    seen = sorted(i for rank in per_rank for _, labels in rank for i in labels.tolist())
    assert seen == list(range(37)) and loaders[0].num_samples == 37


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_format(ids_root: Path, channels_last: bool) -> None:
    cfg = small_cfg(ids_root, channels_last=channels_last)
    loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=5, seed=0, train=True)
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.shape == (5,) and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last)  # either way: the normalizer converts
    from rtrain.engine.step import Normalizer

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    normalized = Normalizer(cfg.mean, cfg.std, torch.device("cpu"), channels_last)(images)
    assert normalized.is_contiguous(memory_format=fmt) and normalized.dtype == torch.float32
    assert torch.allclose(normalized, (images.float() / 255 - torch.tensor(cfg.mean).view(1, 3, 1, 1))
                          / torch.tensor(cfg.std).view(1, 3, 1, 1), atol=1e-5)
    assert loader.classes["c00003"] == 3
    assert loader.stats == {"skipped_samples": 0, "bad_samples": 0, "skipped_shards": 0}


def test_small_split_is_refused_with_its_location(ids_root: Path) -> None:
    with pytest.raises(ValueError, match="fewer than one batch per rank"):
        build_loader(small_cfg(ids_root), "train", rank=0, world_size=4, batch_size=10, seed=0, train=True)
    with pytest.raises(FileNotFoundError, match="nosuch.*manifest not found"):
        build_loader(small_cfg(ids_root), "nosuch", rank=0, world_size=1, batch_size=1, seed=0, train=True)


def test_cpu_prefetcher_passes_batches_through(ids_root: Path) -> None:
    cfg = small_cfg(ids_root)
    loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=0, train=True)
    direct = batches(build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=0, train=True))
    assert same_batches(direct, list(DevicePrefetcher(iter(loader), "cpu")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetcher_keeps_the_position_exact(ids_root: Path) -> None:
    cfg = small_cfg(ids_root, pin_memory=True)
    loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=0, train=True)
    for step, (images, labels) in enumerate(DevicePrefetcher(iter(loader), "cuda"), start=1):
        assert images.is_cuda and labels.is_cuda
        assert loader.state_dict()["batches_done"] == step
