"""Shard-writing helpers for the loader tests (also imported by tests/distributed and tests/integration).

Shards follow rtrain.data.format: `{key}.jpg` + `{key}.cls` members and a manifest.json. With
`label_is_id=True` every sample's label is its global index, so a test can keep a ledger of exactly which
samples a loader yielded.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from rtrain.config import DataConfig
from rtrain.data.format import Manifest, ShardEntry, encode_cls, sha256_file, shard_name


def photo_pixels(seed: int, width: int, height: int, cell: int = 8, noise: float = 10.0) -> np.ndarray:
    """Smooth color blobs `cell` px apart plus grain: compresses and decodes like a photo, unlike noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    return np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)


def photo_jpeg(seed: int, width: int, height: int, quality: int = 90, cell: int = 8, noise: float = 10.0,
               **save: object) -> bytes:
    pixels = photo_pixels(seed, width, height, cell, noise)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality, **save)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_split(root: Path, split: str, counts: list[int], *, num_classes: int = 4, size: tuple[int, int] = (40, 30),
                label_is_id: bool = False, payloads: dict[int, bytes] | None = None) -> Manifest:
    """Shards of `counts[i]` samples each under root/split, plus the manifest; returns the manifest."""
    directory = root / split
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(counts)
    classes = total if label_is_id else num_classes
    entries, index = [], 0
    for shard_index, count in enumerate(counts):
        path = directory / shard_name(split, shard_index)
        with tarfile.open(path, "w") as tar:
            for _ in range(count):
                key = f"s{index:06d}"
                label = index if label_is_id else index % num_classes
                jpg = (payloads or {}).get(index) or photo_jpeg(index, *size)
                _add(tar, f"{key}.cls", encode_cls(label))
                _add(tar, f"{key}.jpg", jpg)
                index += 1
        entries.append(ShardEntry(path.name, count, path.stat().st_size, sha256_file(path)))
    manifest = Manifest(split=split, shards=entries, classes={f"c{i:05d}": i for i in range(classes)})
    (directory / "manifest.json").write_text(manifest.to_json())
    return manifest


def small_cfg(source: Path | str, **overrides: object) -> DataConfig:
    """A DataConfig for tiny images: 16 px crops, in-process loading unless told otherwise."""
    values = {"source": str(source), "num_workers": 0, "shuffle_buffer": 6, "image_size": 16, "eval_resize": 18,
              "pin_memory": False}
    values.update(overrides)
    return DataConfig(**values)


def test_write_split_matches_manifest(tmp_path: Path) -> None:
    manifest = write_split(tmp_path, "train", [3, 2])
    assert manifest.num_samples == 5
    loaded = Manifest.load(tmp_path / "train" / "manifest.json")
    assert [s.count for s in loaded.shards] == [3, 2]
    with tarfile.open(tmp_path / "train" / loaded.shards[1].name) as tar:
        assert tar.getnames() == ["s000003.cls", "s000003.jpg", "s000004.cls", "s000004.jpg"]
