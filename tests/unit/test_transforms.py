"""Augmentation geometry: torchvision-equivalent boxes, per-sample determinism, the paper's options."""

from __future__ import annotations

import math
import random

import pytest

from rtrain.config import DataConfig
from rtrain.data.transforms import (
    center_box,
    lighting_offset,
    make_view,
    rrc_box,
    sample_rng,
    scale_jitter_box,
)


def test_sample_rng_depends_only_on_seed_epoch_key() -> None:
    draw = lambda *args: sample_rng(*args).random()
    assert draw(1, 2, "n01_3") == draw(1, 2, "n01_3")
    assert len({draw(1, 2, "n01_3"), draw(1, 3, "n01_3"), draw(2, 2, "n01_3"), draw(1, 2, "n01_4")}) == 4


def test_rrc_box_respects_scale_and_ratio() -> None:
    rng = random.Random(0)
    for _ in range(500):
        width, height = rng.randint(100, 800), rng.randint(100, 800)
        left, top, right, bottom = rrc_box(rng, width, height, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        # rounding to whole pixels moves area and ratio a little off the sampled values
        assert 0.08 * 0.95 <= w * h / (width * height) <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_rrc_falls_back_to_a_center_crop_for_extreme_shapes() -> None:
    # 1000 x 10: no sampled box fits the ratio range, torchvision falls back to the central crop
    assert rrc_box(random.Random(0), 1000, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == (493, 0, 506, 10)  # w = round(10 * 4/3)


def test_center_box_equals_resize_then_center_crop() -> None:
    # 500x375 -> shorter side 256 -> 341x256; center 224 crop starts at (58.5 -> 59?, 16): in source px 328 wide
    left, top, right, bottom = center_box(500, 375, 256, 224)
    assert (right - left, bottom - top) == (328, 328)
    assert abs((left + right) / 2 - 250) <= 1 and abs((top + bottom) / 2 - 187.5) <= 1


def test_scale_jitter_box_covers_the_paper_range() -> None:
    rng = random.Random(0)
    sides = []
    for _ in range(300):
        left, top, right, bottom = scale_jitter_box(rng, 500, 375, 256, 480, 224)
        assert 0 <= left and right <= 500 and 0 <= top and bottom <= 375 and right - left == bottom - top
        sides.append(right - left)
    # a 224 crop of the image resized to shorter side S covers 224 * 375 / S source px: 175 (S=480) .. 328 (S=256)
    assert 174 <= min(sides) < 185 and 320 < max(sides) <= 329


@pytest.mark.parametrize("augment", ["rrc", "scale", "cifar", "none"])
def test_views_are_deterministic_per_sample_and_vary_by_epoch(augment: str) -> None:
    size = 32 if augment == "cifar" else 224
    cfg = DataConfig(augment=augment, image_size=size, pca_lighting=0.1)
    width, height = (32, 32) if augment == "cifar" else (500, 375)
    view = lambda epoch, key: make_view(cfg, True, 0, epoch, key, width, height)
    assert view(0, "a") == view(0, "a")
    assert view(0, "a").out_size == (size, size)
    varied = {view(epoch, "a") for epoch in range(8)}
    assert len(varied) == (1 if augment == "none" else 8)


def test_cifar_crop_is_pad4_then_32() -> None:
    cfg = DataConfig(augment="cifar", image_size=32)
    offsets = set()
    for epoch in range(200):
        left, top, right, bottom = make_view(cfg, True, 0, epoch, "k", 32, 32).box
        assert (right - left, bottom - top) == (32, 32) and -4 <= left <= 4 and -4 <= top <= 4
        offsets.add((left, top))
    assert len(offsets) > 40


def test_cifar_crop_of_an_image_smaller_than_the_crop_starts_at_the_padding() -> None:
    cfg = DataConfig(augment="cifar", image_size=64)
    for epoch in range(20):
        left, top, right, bottom = make_view(cfg, True, 0, epoch, "k", 40, 100).box
        assert left == -4 and (right - left, bottom - top) == (64, 64) and -4 <= top <= 100 + 4 - 64


def test_eval_views_are_fixed() -> None:
    cfg = DataConfig(eval_transform="cifar", image_size=32)
    assert make_view(cfg, False, 0, 5, "k", 32, 32).box == (0, 0, 32, 32)
    cfg = DataConfig()
    view = make_view(cfg, False, 0, 5, "k", 500, 375)
    assert not view.flip and view.lighting is None and view.box == center_box(500, 375, 256, 224)


def test_pca_lighting_scale() -> None:
    rng = random.Random(0)
    offsets = [lighting_offset(rng, 0.1) for _ in range(2000)]
    # the first principal component dominates: std of alpha * eigval * |eigvec| * 255 ~ 0.1*0.2175*0.57*255
    red = [o[0] for o in offsets]
    std = math.sqrt(sum(r * r for r in red) / len(red))
    assert 2.5 < std < 3.9
