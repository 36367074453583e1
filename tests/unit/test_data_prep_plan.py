"""The shard plan is a pure function of (files, seed, size) and mixes classes (data_prep.plan)."""

import pytest

from data_prep.plan import ShardSize, SourceFile, file_key, plan_shards, shard_fingerprint
from data_prep.quirks import ImageOptions


def _files(classes=4, per_class=50, size=1000):
    return [SourceFile(f"n{c:08d}_{i}", f"train/n{c:08d}/n{c:08d}_{i}.JPEG", c, size + i)
            for c in range(classes) for i in range(per_class)]


def test_plan_ignores_listing_order_and_depends_on_seed():
    files = _files()
    plan = plan_shards(files, seed=7, size=ShardSize(20))
    assert plan_shards(list(reversed(files)), seed=7, size=ShardSize(20)) == plan
    assert plan_shards(files, seed=8, size=ShardSize(20)) != plan


def test_every_shard_mixes_classes_and_no_file_is_lost():
    files = _files()
    plan = plan_shards(files, seed=0, size=ShardSize(20))
    assert [len(shard) for shard in plan] == [20] * 10
    assert sorted(f.key for shard in plan for f in shard) == sorted(f.key for f in files)
    assert all(len({f.cls for f in shard}) >= 3 for shard in plan)


def test_sharding_by_bytes_uses_source_sizes():
    files = _files(classes=2, per_class=10, size=100)
    plan = plan_shards(files, seed=0, size=ShardSize(samples=None, bytes=450))
    assert all(sum(f.size for f in shard) <= 450 for shard in plan)
    assert sum(len(shard) for shard in plan) == 20
    oversized = plan_shards(files[:2], seed=0, size=ShardSize(samples=None, bytes=10))
    assert [len(shard) for shard in oversized] == [1, 1]  # a file larger than the limit gets its own shard


def test_fingerprint_changes_with_content_and_options():
    shard = tuple(_files(classes=1, per_class=3))
    base = shard_fingerprint(shard, ImageOptions())
    assert shard_fingerprint(shard, ImageOptions()) == base
    assert shard_fingerprint(shard[:2], ImageOptions()) != base
    assert shard_fingerprint(shard, ImageOptions(max_side=500)) != base


def test_shard_size_is_validated():
    with pytest.raises(ValueError):
        ShardSize(samples=None, bytes=None)
    with pytest.raises(ValueError):
        ShardSize(samples=0)


def test_keys_have_no_dots():
    assert file_key("n01440764_10026.JPEG") == "n01440764_10026"
    assert file_key("a.b.jpeg") == "a_b"
