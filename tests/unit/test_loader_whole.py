"""Whole val images for multi-scale testing (rtrain.data.whole) and build_eval_loader's three inputs, on real
shards written by the loader tests' helper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_loader_fixtures import photo_jpeg, small_cfg, write_split

from rtrain.data import SampleError, WholeImageLoader, build_eval_loader
from rtrain.data.decode import decode_scaled, probe


@pytest.fixture
def val_root(tmp_path: Path) -> Path:
    write_split(tmp_path, "val", [4, 3], num_classes=5, label_is_id=False)
    return tmp_path


def test_whole_images_come_uncropped_in_canonical_order(val_root: Path) -> None:
    loader = WholeImageLoader(small_cfg(val_root), "val", rank=0, world_size=1, batch_size=3, min_shorter_side=30)
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [3, 3, 1] and len(loader) == 3
    assert torch.cat([labels for _, labels in batches]).tolist() == [0, 1, 2, 3, 4, 0, 1]
    for images, _ in batches:
        assert all(image.shape == (3, 30, 40) and image.dtype == torch.uint8 for image in images)
    first = torch.from_numpy(decode_scaled(probe(photo_jpeg(0, 40, 30)), 1)).permute(2, 0, 1)
    assert torch.equal(batches[0][0][0], first)


def test_ranks_share_the_split_each_sample_once(val_root: Path) -> None:
    seen = []
    for rank in range(3):
        loader = WholeImageLoader(small_cfg(val_root), "val", rank=rank, world_size=3, batch_size=2,
                                  min_shorter_side=8)
        seen += [(i, label) for _, labels in loader for i, label in enumerate(labels.tolist())]
        assert len(loader) == len(list(loader))
    assert sorted(label for _, label in seen) == sorted([0, 1, 2, 3, 4, 0, 1])


def test_large_images_are_decoded_at_a_reduced_scale_down_to_the_largest_test_scale(tmp_path: Path) -> None:
    write_split(tmp_path, "val", [2], num_classes=2, size=(200, 160))
    loader = WholeImageLoader(small_cfg(tmp_path), "val", rank=0, world_size=1, batch_size=2, min_shorter_side=40)
    [(images, _)] = list(loader)
    assert [tuple(image.shape) for image in images] == [(3, 40, 50)] * 2  # 1/4 scale: 160 / 4 = 40 >= 40
    loader = WholeImageLoader(small_cfg(tmp_path), "val", rank=0, world_size=1, batch_size=2, min_shorter_side=41)
    assert [tuple(image.shape) for image in next(iter(loader))[0]] == [(3, 80, 100)] * 2


def test_bad_samples_are_skipped_and_counted_or_raise(tmp_path: Path) -> None:
    write_split(tmp_path, "val", [3], num_classes=2, payloads={1: b"not a jpeg"})
    loader = WholeImageLoader(small_cfg(tmp_path), "val", rank=0, world_size=1, batch_size=4, min_shorter_side=8)
    assert [labels.tolist() for _, labels in loader] == [[0, 0]]
    assert loader.stats == {"skipped_samples": 1, "bad_samples": 1, "skipped_shards": 0}
    strict = WholeImageLoader(small_cfg(tmp_path, on_bad_sample="raise"), "val", rank=0, world_size=1,
                              batch_size=4, min_shorter_side=8)
    with pytest.raises(SampleError, match="val-000000.tar: sample 's000001'"):
        list(strict)


def test_eval_loader_per_mode(val_root: Path) -> None:
    cfg = small_cfg(val_root)  # image_size 16, eval_resize 18
    shapes = {}
    for mode in ("center", "ten_crop", "multi_scale"):
        loader = build_eval_loader(cfg, "val", mode=mode, rank=0, world_size=1, batch_size=7, seed=0, scales=[8, 30])
        images, labels = next(iter(loader))
        shapes[mode] = {tuple(image.shape) for image in images}
        assert len(labels) == 7
    assert shapes == {"center": {(3, 16, 16)}, "ten_crop": {(3, 18, 18)}, "multi_scale": {(3, 30, 40)}}
    with pytest.raises(ValueError, match="multi_scale evaluation needs its scales"):
        build_eval_loader(cfg, "val", mode="multi_scale", rank=0, world_size=1, batch_size=7, seed=0)
    # A CIFAR-transform recipe whose eval_resize does not fit its 16-px input: the 10-crop square is 16 x 256/224.
    cifar = small_cfg(val_root, eval_transform="cifar", eval_resize=256)
    images, _ = next(iter(build_eval_loader(cifar, "val", mode="ten_crop", rank=0, world_size=1, batch_size=7,
                                            seed=0)))
    assert {tuple(image.shape) for image in images} == {(3, 18, 18)}
