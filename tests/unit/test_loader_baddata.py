"""Bad data at train time: corrupt samples, truncated / missing / tampered shards, under skip and raise."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from test_loader_fixtures import photo_jpeg, small_cfg, write_split

from rtrain.data import SampleError, ShardError, build_loader
from rtrain.data.format import ShardEntry, sha256_file, shard_name

COUNTS = [6, 5, 7]  # 18 samples; shard 1 holds ids 6..10


def all_labels(loader) -> list[int]:
    return [i for _, labels in loader for i in labels.tolist()]


def loader_for(root: Path, policy: str, train: bool = False, **overrides):
    cfg = small_cfg(root, on_bad_sample=policy, **overrides)
    return build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=0, train=train)


def test_corrupt_sample_is_skipped_and_counted(tmp_path: Path) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True, payloads={7: b"\xff\xd8 not really a jpeg"})
    loader = loader_for(tmp_path, "skip")
    sizes = [len(labels) for _, labels in loader]
    assert sizes == [4, 3, 4, 3, 3]  # eval: 18 samples in batches of 4,4,4,3,3; id 7 shortens the 2nd
    assert loader.stats == {"skipped_samples": 1, "bad_samples": 1, "skipped_shards": 0}
    assert 7 not in all_labels(loader_for(tmp_path, "skip"))


def test_corrupt_sample_raises_naming_shard_and_key(tmp_path: Path) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True, payloads={7: b"garbage"})
    with pytest.raises(SampleError, match=r"train-000001\.tar: sample 's000007'"):
        all_labels(loader_for(tmp_path, "raise"))


def test_corrupt_sample_raises_from_a_worker_process(tmp_path: Path) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True, payloads={3: b"garbage"})
    with pytest.raises(SampleError, match="s000003"):
        all_labels(loader_for(tmp_path, "raise", num_workers=2))


def test_bad_label_is_a_bad_sample(tmp_path: Path) -> None:
    write_split(tmp_path, "train", [3], label_is_id=True)
    path = tmp_path / "train" / shard_name("train", 0)
    with tarfile.open(path, "w") as tar:
        for index, cls in enumerate([b"0", b"x1", b"2"]):
            for ext, payload in (("cls", cls), ("jpg", photo_jpeg(index, 40, 30))):
                info = tarfile.TarInfo(f"s{index:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    _rewrite_manifest_entry(tmp_path, 0)
    with pytest.raises(SampleError, match="s000001.*bad cls"):
        build_loader(small_cfg(tmp_path, on_bad_sample="raise"), "train", rank=0, world_size=1, batch_size=3,
                     seed=0, train=False).__iter__().__next__()


def _rewrite_manifest_entry(root: Path, index: int) -> None:
    from rtrain.data.format import Manifest

    manifest_path = root / "train" / "manifest.json"
    manifest = Manifest.load(manifest_path)
    path = root / "train" / manifest.shards[index].name
    manifest.shards[index] = ShardEntry(path.name, manifest.shards[index].count, path.stat().st_size,
                                        sha256_file(path))
    manifest_path.write_text(manifest.to_json())


def truncate(root: Path, index: int, keep_fraction: float = 0.5) -> Path:
    path = root / "train" / shard_name("train", index)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_bad_shard_raises_naming_it(tmp_path: Path, damage: str) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    if damage == "truncated":
        truncate(tmp_path, 1)
    else:
        (tmp_path / "train" / shard_name("train", 1)).unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar"):
        all_labels(loader_for(tmp_path, "raise"))


def test_missing_shard_is_skipped_and_counted(tmp_path: Path) -> None:
    """(A truncated shard gives its readable prefix: test_loader_truncated.py.)"""
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    (tmp_path / "train" / shard_name("train", 1)).unlink()
    loader = loader_for(tmp_path, "skip")
    labels = all_labels(loader)
    assert sorted(labels) == [i for i in range(18) if not 6 <= i <= 10]
    assert len(loader) == 5  # the batch count never changes: every rank still steps in lockstep
    assert loader.stats == {"skipped_samples": 5, "bad_samples": 0, "skipped_shards": 1}
    assert loader.skipped_by_shard == {"train-000001.tar": 5}


def test_truncated_stream_found_by_the_tar_reader(tmp_path: Path) -> None:
    """A shard cut short whose manifest byte count agrees (e.g. written short): found while reading."""
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    truncate(tmp_path, 2, keep_fraction=0.6)
    _rewrite_manifest_entry(tmp_path, 2)
    with pytest.raises(ShardError, match=r"train-000002\.tar"):
        all_labels(loader_for(tmp_path, "raise"))
    loader = loader_for(tmp_path, "skip")
    labels = all_labels(loader)
    assert set(range(11)) <= set(labels) and loader.stats["skipped_shards"] == 1
    assert loader.stats["skipped_samples"] == 18 - len(labels)


def test_sha256_mismatch_is_found_when_asked(tmp_path: Path) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True)
    path = tmp_path / "train" / shard_name("train", 0)
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0xFF  # inside the tar's zero padding: same size, still a valid tar
    path.write_bytes(bytes(data))
    assert len(all_labels(loader_for(tmp_path, "raise"))) == 18  # not checked by default
    with pytest.raises(ShardError, match=r"train-000000\.tar: sha256"):
        all_labels(loader_for(tmp_path, "raise", verify_sha256=True))
    loader = loader_for(tmp_path, "skip", verify_sha256=True)
    assert sorted(all_labels(loader)) == list(range(6, 18)) and loader.stats["skipped_shards"] == 1


def test_skipped_samples_keep_resume_exact(tmp_path: Path) -> None:
    write_split(tmp_path, "train", COUNTS, label_is_id=True, payloads={2: b"bad", 12: b"bad"})
    straight = loader_for(tmp_path, "skip", train=True)
    expected = [labels.tolist() for _, labels in straight]
    first = loader_for(tmp_path, "skip", train=True)
    head = [labels.tolist() for _, (_, labels) in zip(range(2), first)]
    resumed = loader_for(tmp_path, "skip", train=True)
    resumed.load_state_dict(first.state_dict())
    assert head + [labels.tolist() for _, labels in resumed] == expected
    assert resumed.stats == straight.stats
