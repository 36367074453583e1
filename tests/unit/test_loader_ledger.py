"""The sample ledger records what each batch held; after a restart from a checkpoint, the last record of each
batch wins, so the ledger of a resumed run equals that of a straight one and holds no sample twice."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
from test_loader_fixtures import small_cfg, write_split

from rtrain.data import build_loader
from rtrain.data.ledger import read_ledger

COUNTS = [9, 4, 14, 6, 2, 11]  # 46 samples; label == manifest index


@pytest.fixture(scope="module")
def ids_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ids")
    write_split(root, "train", COUNTS, label_is_id=True)
    return root


def _loader(root: Path, ledger: Path):
    cfg = small_cfg(root, num_workers=2)
    return build_loader(cfg, "train", rank=0, world_size=1, batch_size=5, seed=3, train=True, ledger=ledger)


def test_ledger_ids_are_the_batch_samples_and_resume_overwrites_lost_batches(ids_root: Path, tmp_path: Path):
    straight = _loader(ids_root, tmp_path / "straight.jsonl")
    straight.set_epoch(1)
    labels = [y.tolist() for _, y in straight]
    expected = read_ledger(tmp_path / "straight.jsonl")
    assert [expected[(1, b)] for b in range(len(labels))] == labels  # ids are the samples' manifest indices

    path = tmp_path / "resumed.jsonl"
    first = _loader(ids_root, path)
    first.set_epoch(1)
    list(islice(iter(first), 2))
    checkpoint = first.state_dict()
    list(islice(iter(first), 3))  # trained on, then lost in a crash: no checkpoint covers them
    second = _loader(ids_root, path)
    second.load_state_dict(checkpoint)
    second.set_epoch(1)
    list(second)
    resumed = read_ledger(path)
    assert resumed == expected
    seen = [i for ids in resumed.values() for i in ids]
    assert len(seen) == len(set(seen)) == len(labels) * 5
