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
