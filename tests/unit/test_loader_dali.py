"""The DALI backend's recipe validation and its clear refusal where DALI or a GPU is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rtrain.config import DataConfig
from rtrain.data import build_loader
from rtrain.data.dali import _labels_from_ascii, check_dali_recipe


def dali_cfg(**overrides: object) -> DataConfig:
    values = {"backend": "dali", "source": "/data/imagenet-shards", "on_bad_sample": "raise"}
    values.update(overrides)
    return DataConfig(**values)


def test_a_supported_recipe_has_no_problems() -> None:
    assert check_dali_recipe(dali_cfg()) == []
    assert check_dali_recipe(dali_cfg(augment="none", channels_last=True)) == []


@pytest.mark.parametrize("overrides,key", [
    ({"source": "https://bucket.example/shards"}, "data.source"),
    ({"augment": "scale"}, "data.augment"),
    ({"augment": "cifar"}, "data.augment"),
    ({"pca_lighting": 0.1}, "data.pca_lighting"),
    ({"eval_transform": "cifar"}, "data.eval_transform"),
    ({"on_bad_sample": "skip"}, "data.on_bad_sample"),
    ({"verify_sha256": True}, "data.verify_sha256"),
])
def test_unsupported_options_are_named(overrides: dict, key: str) -> None:
    problems = check_dali_recipe(dali_cfg(**overrides))
    assert len(problems) == 1 and problems[0].startswith(key)


def test_build_refuses_bad_recipe_before_looking_for_dali(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.backend=dali: data.augment"):
        build_loader(dali_cfg(augment="scale"), "train", rank=0, world_size=1, batch_size=2, seed=0, train=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_build_without_gpu_says_so() -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        build_loader(dali_cfg(), "train", rank=0, world_size=1, batch_size=2, seed=0, train=True)


def test_ascii_label_rows_parse() -> None:
    rows = torch.tensor([[ord("7"), 0, 0], [ord("4"), ord("2"), 0], [ord("9"), ord("9"), ord("9")]],
                        dtype=torch.uint8)
    assert _labels_from_ascii(rows).tolist() == [7, 42, 999]


def test_dali_needs_shards_whose_headers_were_checked_against_the_pixel_budget(tmp_path: Path) -> None:
    """DALI decodes on the GPU with nothing rtrain can put in front of it: the split's manifest must attest
    that data_prep read every header against a budget within data.max_image_pixels (what data_prep writes)."""
    from test_loader_fixtures import write_split

    from rtrain.data.dali import dali_pixel_problem
    from rtrain.data.format import Manifest

    manifest = write_split(tmp_path, "train", [3])  # shards written by hand: nobody checked their headers
    problem = dali_pixel_problem(manifest, dali_cfg(), "/data/train")
    assert problem.startswith("data.backend=dali: /data/train: nothing says its images were checked") \
        and "data.max_image_pixels 89,478,485" in problem
    manifest.checked_pixels = 10**9
    assert "checked against 1,000,000,000 pixels, over data.max_image_pixels (89,478,485)" in \
        dali_pixel_problem(manifest, dali_cfg(), "/data/train")
    manifest.checked_pixels = 89_478_485
    assert dali_pixel_problem(manifest, dali_cfg(), "/data/train") is None
    assert Manifest.from_dict(__import__("json").loads(manifest.to_json())).checked_pixels == 89_478_485
    with pytest.raises(ValueError, match="checked_pixels must be a positive integer"):
        Manifest.from_dict({**__import__("json").loads(manifest.to_json()), "checked_pixels": "lots"})
