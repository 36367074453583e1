"""The sample ledger records what each batch held; after a restart from a checkpoint, the last record of each
batch wins, so the ledger of a resumed run equals that of a straight one and holds no sample twice."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
from test_loader_fixtures import small_cfg, write_split

from rtrain.data import build_loader
from rtrain.data.ledger import epoch_samples, ledger_path, read_ledger

COUNTS = [9, 4, 14, 6, 2, 11]  # 46 samples; label == manifest index


@pytest.fixture(scope="module")
def ids_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ids")
    write_split(root, "train", COUNTS, label_is_id=True)
    return root


def _loader(root: Path, run_dir: Path, rank: int = 0, world: int = 1, batch: int = 5):
    cfg = small_cfg(root, num_workers=2)
    return build_loader(cfg, "train", rank=rank, world_size=world, batch_size=batch, seed=3, train=True,
                        ledger=ledger_path(run_dir, rank))


def test_ledger_ids_are_the_batch_samples_and_resume_overwrites_lost_batches(ids_root: Path, tmp_path: Path):
    straight = _loader(ids_root, tmp_path / "straight")
    straight.set_epoch(1)
    labels = [y.tolist() for _, y in straight]
    expected = read_ledger(tmp_path / "straight" / "ledger")
    assert [expected[(1, 0, b, 0)] for b in range(len(labels))] == labels  # ids: the manifest indices

    first = _loader(ids_root, tmp_path / "resumed")
    first.set_epoch(1)
    list(islice(iter(first), 2))
    checkpoint = first.state_dict()
    list(islice(iter(first), 3))  # trained on, then lost in a crash: no checkpoint covers them
    second = _loader(ids_root, tmp_path / "resumed")
    second.load_state_dict(checkpoint)
    second.set_epoch(1)
    list(second)
    resumed = read_ledger(tmp_path / "resumed" / "ledger")
    assert resumed == expected
    seen = [i for ids in resumed.values() for i in ids]
    assert len(seen) == len(set(seen)) == len(labels) * 5


def test_ledger_across_a_world_size_change_holds_each_sample_once(ids_root: Path, tmp_path: Path):
    """2 ranks train 3 batches, checkpoint after 2, crash; 1 rank resumes the rest of the epoch."""
    run = tmp_path / "elastic"
    ranks = [_loader(ids_root, run, rank=r, world=2, batch=4) for r in (0, 1)]
    for loader in ranks:
        loader.set_epoch(0)
    iterators = [iter(loader) for loader in ranks]
    for _ in range(2):
        [next(it) for it in iterators]
    checkpoint = ranks[0].state_dict()
    [next(it) for it in iterators]  # lost
    alone = _loader(ids_root, run, rank=0, world=1, batch=8)
    alone.load_state_dict(checkpoint)
    alone.set_epoch(0)
    rest = [len(y) for _, y in alone]
    seen = epoch_samples(read_ledger(run / "ledger"), 0)
    assert len(seen) == len(set(seen))
    assert len(seen) == 2 * 2 * 4 + sum(rest)  # the 2 checkpointed steps of 2 ranks, then the rest
