"""Real WebDataset shards written by webdataset's own writers, for data_prep.index and loader tests.

Sample i is a 24x20 gray image of level `level(i)` with label i (so a test can check that every sample
arrives once, with its own label, and that image and label belong together).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from rtrain.data import build_loader


def level(index: int) -> int:
    return 10 + 6 * index


def image_bytes(index: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 20), (level(index),) * 3).save(out, fmt)
    return out.getvalue()


def write_with_shardwriter(folder: Path, count: int, per_shard: int) -> list[Path]:
    """webdataset.ShardWriter shards: `jpg` bytes + `cls` int (the layout of most public mirrors)."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "part-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for index in range(count):
            sink.write({"__key__": f"k{index:06d}", "jpg": image_bytes(index, "JPEG"), "cls": index})
    return sorted(folder.glob("*.tar"))


def write_with_tarwriter(path: Path, ids: range, style: str, broken: dict[int, str] | None = None) -> Path:
    """webdataset.TarWriter shards with other key names: style `png_json` (png + json {"label": i}) or
    `jpeg_clstxt` (jpeg + cls.txt). `broken` maps a sample id to `corrupt` or `no_label`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_key, label_key = ("png", "json") if style == "png_json" else ("jpeg", "cls.txt")
    with wds.TarWriter(str(path)) as sink:
        for index in ids:
            image = image_bytes(index, "PNG" if image_key == "png" else "JPEG")
            label = {"label": index, "source": "test"} if label_key == "json" else str(index)
            sample = {"__key__": f"{style}{index:05d}", image_key: image, label_key: label}
            fault = (broken or {}).get(index)
            if fault == "corrupt":
                sample[image_key] = image[: len(image) // 2]
            elif fault == "no_label":
                del sample[label_key]
            sink.write(sample)
    return path


def read_epoch(cfg, split: str = "train", train: bool = False,
               batch_size: int = 4) -> tuple[list[int], list[float]]:
    """(labels, mean pixel level per image) of one whole epoch through the train loader."""
    loader = build_loader(cfg, split, rank=0, world_size=1, batch_size=batch_size, seed=3, train=train)
    labels, levels = [], []
    for images, batch_labels in loader:
        labels.extend(batch_labels.tolist())
        levels.extend(images.to(torch.float32).mean(dim=(1, 2, 3)).tolist())
    return labels, levels


def assert_labels_match_images(labels: list[int], levels: list[float]) -> None:
    expected = np.array([level(label) for label in labels], dtype=np.float64)
    assert np.all(np.abs(np.asarray(levels) - expected) <= 3), list(zip(labels, levels))
