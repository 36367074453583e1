"""A shard cut short at train time: the samples before the cut are used, the rest skipped, counted per shard
and logged naming the shard and the sample it fails from; under raise one line that says what to run."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import pytest
from test_loader_fixtures import small_cfg, write_split

from rtrain.data import ShardError, build_loader
from rtrain.data.format import shard_name

COUNTS = [6, 10, 7]  # 23 samples; shard 1 holds ids 6..15
SHARD = shard_name("train", 1)


def labels_of(loader) -> list[int]:
    return [i for _, labels in loader for i in labels.tolist()]


def loader_for(root: Path, policy: str, train: bool = False, **overrides):
    cfg = small_cfg(root, on_bad_sample=policy, **overrides)
    return build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=0, train=train)


def cut_shard(root: Path, cut: int | float) -> int:
    """Truncate shard 1 to `cut` bytes (a fraction: of its size); return how many samples lie wholly before
    the cut, read from the intact tar's member offsets (the readable prefix)."""
    path = root / "train" / SHARD
    data = path.read_bytes()
    size = int(len(data) * cut) if isinstance(cut, float) else cut
    ends: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".")[0]
            ends[key] = max(ends.get(key, 0), member.offset_data + member.size)
    path.write_bytes(data[:size])
    prefix = 0
    for key in sorted(ends):  # keys s000006.. are in tar order
        if ends[key] > size:
            break
        prefix += 1
    return prefix


def header_cut(root: Path) -> int:
    """A byte offset inside the header of shard 1's 5th sample's first member."""
    with tarfile.open(root / "train" / SHARD) as tar:
        members = tar.getmembers()
    return members[8].offset + 200


@pytest.mark.parametrize("cut", [0.5, 0.15, 0.62, "header"])
def test_truncated_shard_gives_its_readable_prefix(tmp_path: Path, caplog, cut) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    prefix = cut_shard(tmp_path, header_cut(tmp_path) if cut == "header" else cut)
    assert 0 < prefix < 10
    with caplog.at_level(logging.WARNING, logger="rtrain.data"):
        loader = loader_for(tmp_path, "skip")
        labels = labels_of(loader)
    assert sorted(labels) == list(range(6 + prefix)) + list(range(16, 23))
    assert len(loader) == 6  # 23 samples in batches of 4: the plan never changes
    lost = 10 - prefix
    assert loader.stats == {"skipped_samples": lost, "bad_samples": 0, "skipped_shards": 1}
    assert loader.skipped_by_shard == {SHARD: lost}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"{SHARD}: damaged from sample {prefix} of 10" in warnings[0]
    assert f"python -m data_prep.verify {tmp_path / 'train'}" in warnings[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_under_raise_is_one_line_naming_shard_offset_and_verify(tmp_path: Path, workers) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    prefix = cut_shard(tmp_path, 0.5)
    with pytest.raises(ShardError) as raised:
        labels_of(loader_for(tmp_path, "raise", num_workers=workers))
    message = str(raised.value)
    assert "\n" not in message and "Caught" not in message  # not DataLoader's worker re-raise
    assert message.startswith(f"shard {tmp_path / 'train' / SHARD}: damaged from sample {prefix} of 10: ")
    assert message.endswith(f"check the shards with: python -m data_prep.verify {tmp_path / 'train'}")


def test_truncated_shard_with_verify_sha256_is_left_out_whole(tmp_path: Path) -> None:
    """data.verify_sha256 promises that only verified bytes are used: a prefix cannot be verified against
    the whole shard's sha256, so none of it is used."""
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    cut_shard(tmp_path, 0.5)
    loader = loader_for(tmp_path, "skip", verify_sha256=True)
    assert sorted(labels_of(loader)) == list(range(6)) + list(range(16, 23))
    assert loader.skipped_by_shard == {SHARD: 10}
    with pytest.raises(ShardError, match=rf"{SHARD}: \d+ bytes, manifest says \d+ \(truncated; data.verify_sha256"):
        labels_of(loader_for(tmp_path, "raise", verify_sha256=True))


def test_longer_shard_than_the_manifest_is_left_out_whole(tmp_path: Path) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    path = tmp_path / "train" / SHARD
    path.write_bytes(path.read_bytes() + b"\0" * 1024)  # still a valid tar; not the bytes the manifest names
    loader = loader_for(tmp_path, "skip")
    assert sorted(labels_of(loader)) == list(range(6)) + list(range(16, 23))
    assert loader.skipped_by_shard == {SHARD: 10}


def test_truncated_shard_keeps_resume_exact(tmp_path: Path) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    cut_shard(tmp_path, 0.5)
    straight = loader_for(tmp_path, "skip", train=True)
    expected = [labels.tolist() for _, labels in straight]
    first = loader_for(tmp_path, "skip", train=True)
    head = [labels.tolist() for _, (_, labels) in zip(range(3), first)]
    saved = first.state_dict()
    assert saved["skipped_by_shard"] == first.skipped_by_shard
    resumed = loader_for(tmp_path, "skip", train=True)
    resumed.load_state_dict(saved)
    assert head + [labels.tolist() for _, labels in resumed] == expected
    assert resumed.stats == straight.stats and resumed.skipped_by_shard == straight.skipped_by_shard


def test_state_without_per_shard_counts_still_loads(tmp_path: Path) -> None:
    """Loader states saved before per-shard counts existed resume unchanged (the key is optional)."""
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    first = loader_for(tmp_path, "skip", train=True)
    next(iter(first))
    saved = first.state_dict()
    del saved["skipped_by_shard"]
    resumed = loader_for(tmp_path, "skip", train=True)
    resumed.load_state_dict(saved)
    assert resumed.skipped_by_shard == {} and resumed.state_dict()["batches_done"] == 1
