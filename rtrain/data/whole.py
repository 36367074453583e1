"""Whole val images, uncropped, for the paper's fully-convolutional multi-scale testing.

Whole images differ in size, so they cannot share one tensor: a batch is (list of uint8 (3, H, W) tensors,
int64 labels). Samples come in the split's canonical order (shard by shard, as the eval ShardLoader reads
them); sample i belongs to rank i mod world_size, so the ranks together see every sample once. Decoding is the
loader's reduced-scale JPEG decode (decode.py): an image is decoded at the smallest 1/d scale whose shorter
side still reaches `min_shorter_side` (the largest test scale), so a large photo is not decoded at full size
only to be shrunk. An evaluation pass starts from the beginning each time: there is no resume state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from rtrain.data.cache import ShardCache
from rtrain.data.decode import FAST_DENOMINATORS, DecodeError, SourceImage, decode_scaled, probe
from rtrain.data.format import ShardEntry, decode_label
from rtrain.data.shardread import RawSample, ShardDamage, damage_from_error, read_positions
from rtrain.data.sources import ShardError, ShardSource
from rtrain.data.state import STAT_KEYS
from rtrain.data.worker import SampleError


def whole_image_denominator(source: SourceImage, min_shorter_side: int) -> int:
    """Largest d in 8, 4, 2, 1 whose 1/d decode keeps the shorter side at least `min_shorter_side`."""
    for denominator in FAST_DENOMINATORS:
        if math.ceil(min(source.width, source.height) / denominator) >= min_shorter_side:
            return denominator
    return 1


class WholeImageLoader:
    """One rank's share of a split as batches of whole images (see the module docstring)."""

    def __init__(self, cfg: Any, split: str, *, rank: int, world_size: int, batch_size: int,
                 min_shorter_side: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"whole-image loader: rank {rank} is not in a world of size {world_size}")
        if batch_size < 1:
            raise ValueError(f"whole-image loader: batch_size must be positive, got {batch_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size, self.min_shorter_side = batch_size, min_shorter_side
        self.source = ShardSource(cfg.source, split, getattr(cfg, "storage_options", None),
                                  getattr(cfg, "allowed_shard_roots", ()), cache=ShardCache.from_config(cfg))
        self.manifest = self.source.read_manifest()
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._damaged_shards: set[str] = set()

    @property
    def classes(self) -> dict[str, int]:
        return dict(self.manifest.classes)

    @property
    def num_samples(self) -> int:
        """Samples of the whole split (all ranks)."""
        return self.manifest.num_samples

    def __len__(self) -> int:
        mine = len(range(self.rank, self.manifest.num_samples, self.world_size))
        return -(-mine // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Every pass reads the whole split from its start (the engine's loader interface)."""

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        images: list[torch.Tensor] = []
        labels: list[int] = []
        for image, label in self._samples():
            images.append(image)
            labels.append(label)
            if len(images) == self.batch_size:
                yield images, torch.tensor(labels, dtype=torch.int64)
                images, labels = [], []
        if images:
            yield images, torch.tensor(labels, dtype=torch.int64)

    def _samples(self) -> Iterator[tuple[torch.Tensor, int]]:
        first = 0
        for entry in self.manifest.shards:
            positions = {p for p in range(entry.count) if (first + p) % self.world_size == self.rank}
            first += entry.count
            if positions:
                for item in self._read_shard(entry, positions):
                    prepared = self._prepare(item)
                    if prepared is not None:
                        yield prepared

    def _read_shard(self, entry: ShardEntry, positions: set[int]) -> Iterator[RawSample | ShardDamage]:
        """The wanted samples of one shard; a wanted sample that never arrives comes as ShardDamage."""
        location = self.source.shard_location(entry.name)
        delivered: set[int] = set()
        try:
            with self.source.open_shard(entry, self.cfg.verify_sha256) as tar:
                for position, item in read_positions(tar, location, positions, entry.count,
                                                     self.manifest.keys.fields):
                    delivered.add(position)
                    yield item
        except ShardError as exc:
            missing = sorted(positions - delivered)
            for _ in missing:
                yield damage_from_error(location, exc, missing[0], entry.count)

    def _prepare(self, item: RawSample | ShardDamage) -> tuple[torch.Tensor, int] | None:
        """(image, label), or None for a sample skipped under `data.on_bad_sample: skip` (counted)."""
        try:
            if isinstance(item, ShardDamage):
                raise ShardError(item.message)
            return self._decode(item)
        except (ShardError, SampleError) as exc:
            if self.cfg.on_bad_sample != "skip":
                raise
            if isinstance(exc, ShardError) and item.shard not in self._damaged_shards:
                self._damaged_shards.add(item.shard)
                self.stats["skipped_shards"] += 1
            if isinstance(exc, SampleError):
                self.stats["bad_samples"] += 1
            self.stats["skipped_samples"] += 1
            return None

    def _decode(self, sample: RawSample) -> tuple[torch.Tensor, int]:
        where = f"shard {sample.shard}: sample {sample.key!r}"
        keys = self.manifest.keys
        missing = [f for f in keys.fields if f not in sample.fields]
        if missing:
            raise SampleError(f"{where}: missing field(s) {missing}")
        try:
            label = decode_label(sample.fields[keys.label], keys, self.manifest.classes)
            source = probe(sample.fields[keys.image], self.cfg.max_image_pixels)
            pixels = decode_scaled(source, whole_image_denominator(source, self.min_shorter_side))
        except (UnicodeDecodeError, ValueError, DecodeError) as exc:
            raise SampleError(f"{where}: {exc}") from exc
        if not 0 <= label < max(self.manifest.num_classes, 1):
            raise SampleError(f"{where}: label {label} outside 0..{self.manifest.num_classes - 1}")
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), label
