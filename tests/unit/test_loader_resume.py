"""Resume: bit-identical batches at the same layout; a sample ledger with no repeats across a world-size change."""

from __future__ import annotations

import io
from itertools import islice
from pathlib import Path

import pytest
import torch
from test_loader_fixtures import small_cfg, write_split

from rtrain.data import build_loader

COUNTS = [9, 4, 14, 6, 2, 11]  # 46 samples


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    write_split(root, "train", COUNTS, size=(48, 36))
    return root


@pytest.fixture(scope="module")
def ids_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ids")
    write_split(root, "train", COUNTS, label_is_id=True)
    write_split(root, "val", COUNTS, label_is_id=True)
    return root


def through_checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def take(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in islice(iter(loader), count)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [1, 2, 5])
def test_same_layout_resume_gives_bit_identical_batches(photo_root: Path, workers: int, stop_after: int) -> None:
    cfg = small_cfg(photo_root, num_workers=workers, augment="rrc", pca_lighting=0.1)
    make = lambda: build_loader(cfg, "train", rank=1, world_size=2, batch_size=3, seed=11, train=True)
    straight = make()
    straight.set_epoch(2)
    expected = take(straight, 100)

    interrupted = make()
    interrupted.set_epoch(2)
    head = take(interrupted, stop_after)
    state = through_checkpoint(interrupted.state_dict())
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what an engine does on restart: the same epoch keeps the position
    tail = take(resumed, 100)

    assert len(resumed) == len(straight) == len(expected) == 46 // 6
    assert len(head) + len(tail) == len(expected)
    for (a, b), (c, d) in zip(head + tail, expected):
        assert torch.equal(a, c) and torch.equal(b, d)


def run_ranks(cfg, world: int, batch: int, train: bool, split: str, state: dict | None,
              stop_after: int | None) -> tuple[list[int], dict, list[int]]:
    """Every rank of a world from `state` for `stop_after` batches (None = to the end)."""
    seen, lengths, last_state = [], [], None
    for rank in range(world):
        loader = build_loader(cfg, split, rank=rank, world_size=world, batch_size=batch, seed=5, train=train)
        if state is not None:
            loader.load_state_dict(state)
        got = take(loader, stop_after if stop_after is not None else 10**6)
        lengths.append(len(got))
        seen += [i for _, labels in got for i in labels.tolist()]
        if rank == 0:
            last_state = through_checkpoint(loader.state_dict())
    return seen, last_state, lengths


@pytest.mark.parametrize("train,split", [(True, "train"), (False, "val")])
@pytest.mark.parametrize("old,new", [((2, 3, 2), (3, 2, 0)), ((3, 2, 0), (2, 3, 2)), ((2, 2, 1), (1, 4, 1))])
def test_world_size_change_repeats_and_skips_nothing(ids_root: Path, train: bool, split: str, old: tuple,
                                                     new: tuple) -> None:
    (w1, b1, k1), (w2, b2, k2) = old, new
    before, state, lengths1 = run_ranks(small_cfg(ids_root, num_workers=k1), w1, b1, train, split, None, 2)
    assert lengths1 == [2] * w1 and state["batches_done"] == 2
    after, final, lengths2 = run_ranks(small_cfg(ids_root, num_workers=k2), w2, b2, train, split, state, None)
    assert len(set(lengths2)) == 1  # still equal batch counts on every rank
    ledger = before + after
    assert len(ledger) == len(set(ledger)), "a sample was yielded twice"
    missing = set(range(46)) - set(ledger)
    if train:
        # only the first segment's dropped tail and the new layout's partial global batch go unused
        assert len(missing) == 46 - len(ledger) < (46 % (w1 * b1)) + w2 * b2
    else:
        assert not missing
    assert final["history"] == [[w1, b1, max(k1, 1), 6, 2]]


def test_second_resize_in_the_same_epoch(ids_root: Path) -> None:
    cfg = small_cfg(ids_root, num_workers=0)
    first, state, _ = run_ranks(cfg, 2, 2, False, "val", None, 3)
    second, state, _ = run_ranks(cfg, 3, 2, False, "val", state, 2)
    third, final, _ = run_ranks(cfg, 1, 4, False, "val", state, None)
    ledger = first + second + third
    assert sorted(ledger) == list(range(46))
    assert len(final["history"]) == 2


def test_state_dict_is_weights_only_safe_and_checked(ids_root: Path) -> None:
    cfg = small_cfg(ids_root)
    loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=5, train=True)
    take(loader, 2)
    state = through_checkpoint(loader.state_dict())
    assert state["version"] == 1 and state["batches_done"] == 2 and state["slot_consumed"] == [[8]]
    other_seed = build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=6, train=True)
    with pytest.raises(ValueError, match="seed 5 differs"):
        other_seed.load_state_dict(state)
    val = build_loader(cfg, "val", rank=0, world_size=1, batch_size=4, seed=5, train=False)
    with pytest.raises(ValueError, match="state is for split 'train'"):
        val.load_state_dict(state)
    with pytest.raises(ValueError, match="version 99"):
        loader.load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="missing key 'epoch'"):
        loader.load_state_dict({k: v for k, v in state.items() if k != "epoch"})
    with pytest.raises(ValueError, match="slot_consumed does not match"):
        loader.load_state_dict({**state, "slot_consumed": [[7]]})


def test_set_epoch_restarts_and_finished_epoch_is_empty(ids_root: Path) -> None:
    loader = build_loader(small_cfg(ids_root), "train", rank=0, world_size=1, batch_size=4, seed=5, train=True)
    assert len(take(loader, 100)) == len(loader) == 11
    assert take(loader, 100) == [] and loader.batches_remaining == 0
    loader.set_epoch(1)
    assert len(take(loader, 100)) == 11 and loader.state_dict()["epoch"] == 1
