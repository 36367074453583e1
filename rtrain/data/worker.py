"""One rank's batches for the rest of an epoch, produced by DataLoader worker processes.

Worker process w of a rank serves slot (batches_done + w) mod K, so the DataLoader's round robin over its
workers hands the rank's batches back in plan order: item t is rank batch batches_done + t. Every worker
yields the same number of items (the ones with fewer batches left pad with empty items at the end), which
keeps the round robin, and therefore the batch order, independent of timing.

A slot reads its shards in order and keeps the raw bytes of samples it has read but not yet emitted (at most
the shuffle buffer's worth, as in a streaming shuffle buffer), and emits them in the plan's shuffled order;
each is decoded only when it is emitted. Samples the slot already emitted before a resume are never read.

Bad data (rtrain.data.shardread finds where a shard's bytes end): under `data.on_bad_sample: skip` each
skipped sample is counted, per shard too, and the first damaged sample of a shard is logged naming the shard
and the position it fails from; the samples before it are used. Under `raise` the error travels to the
rank's main process as data (a `Tally` with `failure`) and is raised there with its own one-line message:
through DataLoader's own re-raise it would become "Caught ShardError in DataLoader worker process 0" plus a
traceback.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from rtrain._errors import ExpectedError
from rtrain._process import die_with_parent
from rtrain.data.batchpool import BatchPool, PooledBatch, shared_uint8
from rtrain.data.decode import DecodeError, PixelBuffer, probe, render
from rtrain.data.format import SampleKeys, ShardEntry, decode_label
from rtrain.data.plan import SegmentGeometry, slot_batches_done, slot_plan
from rtrain.data.shardread import RawSample, ShardDamage, damage_from_error, read_positions
from rtrain.data.sources import ShardError, ShardSource
from rtrain.data.suspects import NONE, Quarantine, ReadingMarks
from rtrain.data.state import STAT_KEYS
from rtrain.data.transforms import TransformConfig, make_view

log = logging.getLogger("rtrain.data")


class SampleError(ExpectedError, ValueError):
    """A sample cannot be used (undecodable image, missing field, bad label); names shard and key."""


class LoaderStall(ExpectedError, RuntimeError):
    """A rank's loader worker processes delivered nothing for data.loader_timeout_s; names rank and shards."""


@dataclass
class Tally:
    """What a slot reports with each item: skip counts (STAT_KEYS), samples skipped per shard (manifest
    name), and under `on_bad_sample: raise` the error that ended the slot."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))
    by_shard: dict[str, int] = field(default_factory=dict)
    failure: Exception | None = None


def check_hint(source: ShardSource) -> str:
    """What to run to find every bad shard of a split at once."""
    if source.remote:
        return f"re-check the shards with: python -m data_prep.index {source.shard_root} --out DIR"
    return f"check the shards with: python -m data_prep.verify {source.location}"


@dataclass(frozen=True)
class EpochTask:
    """Everything a worker needs to produce its share of the rest of one segment of an epoch."""

    source: ShardSource
    shards: list[ShardEntry]
    offsets: np.ndarray  # canonical id of each shard's first sample
    pool: np.ndarray  # canonical ids of the segment's samples in reading order
    geometry: SegmentGeometry
    rank: int
    seed: int
    epoch: int
    segment: int
    batches_done: int  # rank batches already yielded in this segment
    transform: TransformConfig
    classes: dict[str, int]  # class name -> index, for labels given by name
    keys: SampleKeys
    skip_bad: bool
    verify_sha256: bool
    marks: ReadingMarks | None = None  # what each slot is on (rtrain.data.suspects)
    quarantine: Quarantine = field(default_factory=Quarantine)

    @property
    def batches_left(self) -> int:
        return self.geometry.batches_per_rank - self.batches_done


def _batch_memory(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor for a batch; in a DataLoader worker process it lives in shared memory from the start,
    so handing it over sends a file descriptor instead of copying it into a new shared segment (used when the
    rank's BatchPool has no free buffer)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    return shared_uint8(math.prod(shape)).view(shape)


class BatchAssembler:
    """Fills fixed-size uint8 (N, 3, H, W) batches stored channels_last (NHWC): the decoder's resize writes
    each image straight into its slot, and that layout is the one it writes fastest (decode.resize_into). A
    bad sample leaves the batch one shorter. With a `claim` (a BatchPool's, in a worker) a batch goes into a
    pooled buffer when one is free."""

    def __init__(self, sizes: list[int], image_size: int,
                 claim: Callable[[], tuple[int, torch.Tensor] | None] | None = None):
        self.sizes = list(sizes)
        self.image_size = image_size
        self.claim = claim
        self._start_next()

    def _start_next(self) -> None:
        size = self.sizes[0] if self.sizes else 0
        claimed = self.claim() if self.claim is not None and size else None
        self.slot: int | None = None
        if claimed is not None:
            self.slot, pooled = claimed
            self.images = pooled[:size]
        else:
            side = self.image_size
            self.images = _batch_memory((size, side, side, 3)).permute(0, 3, 1, 2)  # NHWC seen as NCHW
        self.labels: list[int] = []
        self.ids: list[int] = []
        self.slots_used = 0

    def next_image(self) -> torch.Tensor:
        """The (3, H, W) slot the next sample's image is written into."""
        return self.images[len(self.labels)]

    def add(self, label: int | None, sample_id: int) -> None:
        """Count the image written into `next_image()` as the batch's next; None marks a skipped sample (its
        slot is written again by the next one)."""
        if label is not None:
            self.labels.append(label)
            self.ids.append(sample_id)
        self.slots_used += 1

    @property
    def full(self) -> bool:
        return bool(self.sizes) and self.slots_used >= self.sizes[0]

    def take(self) -> tuple[torch.Tensor | PooledBatch, np.ndarray, list[int]]:
        """(images, labels, sample ids). Labels travel as an int64 array: pickled inline, where a tensor would
        be moved to a new shared-memory segment and its file descriptor passed, batch after batch."""
        images = self.images[: len(self.labels)] if self.slot is None else PooledBatch(self.slot, len(self.labels))
        labels = np.array(self.labels, dtype=np.int64)
        ids = self.ids
        self.sizes.pop(0)
        self._start_next()
        return images, labels, ids


class RankBatches(IterableDataset):
    """Iterable over (images, labels, sample ids, Tally) items; (None, None, None, tally) pads the end. With a
    pool, images may come as a PooledBatch that the main process resolves with `pool.take`."""

    def __init__(self, task: EpochTask, pool: BatchPool | None = None):
        super().__init__()
        self.task = task
        self.pool = pool
        self.rank_pid = os.getpid()  # the rank's process, which starts the worker processes

    def __iter__(self) -> Iterator[tuple[Any, Any, Any, Tally]]:
        info = get_worker_info()
        if info is not None:  # a worker process dies with its rank, even while busy in a decode
            die_with_parent(self.rank_pid)
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        task = self.task
        slots = task.geometry.layout.slots_per_rank
        if workers != slots:
            raise RuntimeError(f"loader: {workers} worker processes for {slots} slots per rank")
        items = -(-task.batches_left // slots)
        produced = 0
        claim = (lambda: self.pool.claim(worker)) if self.pool is not None and info is not None else None
        reader = SlotReader(task, (task.batches_done + worker) % slots, claim)
        try:
            for produced, item in enumerate(reader.batches(), start=1):
                yield item
        except (ShardError, SampleError) as exc:  # on_bad_sample: raise; the main process raises it
            tally = reader.take_tally()
            tally.failure = exc
            yield None, None, None, tally
            return
        for _ in range(items - produced):
            yield None, None, None, reader.take_tally()


class SlotReader:
    """Reads one slot's remaining samples and turns them into its remaining batches."""

    def __init__(self, task: EpochTask, slot: int,
                 claim: Callable[[], tuple[int, torch.Tensor] | None] | None = None):
        self.task = task
        self.slot = slot
        self.shard_index: int | None = None  # the shard being read (for the marks)
        self.claim = claim
        self.plan = slot_plan(task.geometry, task.rank, slot, seed=task.seed, epoch=task.epoch,
                              segment=task.segment)
        done = slot_batches_done(task.batches_done, slot, task.geometry.layout.slots_per_rank)
        self.batch_sizes = self.plan.batch_sizes[done:]
        consumed = sum(self.plan.batch_sizes[:done])
        self.emission = task.pool[self.plan.emission[consumed:]]
        self.tally = Tally()
        self.damaged_shards: set[str] = set()
        self.pixels = PixelBuffer()

    def take_tally(self) -> Tally:
        tally, self.tally = self.tally, Tally()
        return tally

    def batches(self) -> Iterator[tuple[torch.Tensor | PooledBatch, np.ndarray, list[int], Tally]]:
        task = self.task
        assembler = BatchAssembler(self.batch_sizes, task.transform.image_size, self.claim)
        marks, slot = task.marks, self.slot
        items = self._samples_in_emission_order()
        while True:
            if marks is not None:
                marks.decoding(slot, NONE)  # reading (the shard _read_shard marked) until a sample comes out
            try:
                sample_id, item = next(items)
            except StopIteration:
                break
            if marks is not None:
                marks.decoding(slot, int(sample_id))
            label = self._prepare(sample_id, item, assembler.next_image())
            assembler.add(label, int(sample_id))
            if assembler.full:
                images, labels, ids = assembler.take()
                if marks is not None:  # idle while the batch waits to be taken: nothing read, nothing decoded
                    marks.idle(slot)
                yield images, labels, ids, self.take_tally()
                if marks is not None and self.shard_index is not None:
                    marks.reading(slot, self.shard_index)
        if marks is not None:
            marks.idle(slot)

    def _read_runs(self) -> Iterator[tuple[int, list[int]]]:
        """(shard index, wanted positions) in reading order, for shards holding remaining samples."""
        read_ids = self.task.pool[self.plan.read_order]
        wanted = read_ids[np.isin(read_ids, self.emission)]
        shard_of = np.searchsorted(self.task.offsets, wanted, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        for ids, shards in zip(np.split(wanted, cuts), np.split(shard_of, cuts)):
            if len(ids):
                yield int(shards[0]), (ids - self.task.offsets[shards[0]]).tolist()

    def _samples_in_emission_order(self) -> Iterator[tuple[int, RawSample | ShardDamage]]:
        order = self.emission.tolist()
        held: dict[int, RawSample | ShardDamage] = {}
        cursor = 0
        for shard_index, positions in self._read_runs():
            first = int(self.task.offsets[shard_index])
            for position, item in self._read_shard(shard_index, positions):
                held[first + position] = item
                while cursor < len(order) and order[cursor] in held:
                    yield order[cursor], held.pop(order[cursor])
                    cursor += 1
        if cursor != len(order):
            raise RuntimeError(f"loader: slot plan left {len(order) - cursor} samples unread (bug)")

    def _read_shard(self, shard_index: int,
                    positions: list[int]) -> Iterator[tuple[int, RawSample | ShardDamage]]:
        entry = self.task.shards[shard_index]
        if entry.name in self.task.quarantine.shards:  # not opened: _prepare counts its samples as skipped
            for position in positions:
                yield position, ShardDamage(entry.name, 0, entry.count, "quarantined for this run")
            return
        self.shard_index = shard_index
        if self.task.marks is not None:
            self.task.marks.reading(self.slot, shard_index)
        location = self.task.source.shard_location(entry.name)
        try:
            with self.task.source.open_shard(entry, self.task.verify_sha256) as tar:
                yield from read_positions(tar, location, set(positions), entry.count, self.task.keys.fields)
        except ShardError as exc:  # opening failed: no sample of it is used
            damage = damage_from_error(location, exc, 0, entry.count)
            for position in positions:
                yield position, damage

    def _prepare(self, sample_id: int, item: RawSample | ShardDamage, out: torch.Tensor) -> int | None:
        """The label, with the image written into `out`; None for a sample skipped under the `skip` policy."""
        if self.task.quarantine and self._quarantined(sample_id):
            return None
        try:
            if isinstance(item, ShardDamage):
                raise ShardError(item.message)
            return self._decode(item, out)
        except (ShardError, SampleError) as exc:
            if not self.task.skip_bad:
                raise type(exc)(f"{exc} (data.on_bad_sample=raise); {check_hint(self.task.source)}") from None
            self._count_skip(sample_id, item, exc)
            return None

    def _quarantined(self, sample_id: int) -> bool:
        """Left out of this run (rtrain.data.suspects), whatever data.on_bad_sample says; counted as skipped."""
        index = int(np.searchsorted(self.task.offsets, sample_id, side="right")) - 1
        shard = self.task.shards[index].name
        quarantine = self.task.quarantine
        position = int(sample_id - self.task.offsets[index])
        if shard not in quarantine.shards and (shard, position) not in quarantine.samples:
            return False
        self.tally.by_shard[shard] = self.tally.by_shard.get(shard, 0) + 1
        self.tally.counts["skipped_samples"] += 1
        if shard in quarantine.shards:
            if shard not in self.damaged_shards:
                self.damaged_shards.add(shard)
                self.tally.counts["skipped_shards"] += 1
        else:
            self.tally.counts["bad_samples"] += 1
        return True

    def _count_skip(self, sample_id: int, item: RawSample | ShardDamage, exc: Exception) -> None:
        counts = self.tally.counts
        shard = self.task.shards[int(np.searchsorted(self.task.offsets, sample_id, side="right")) - 1].name
        self.tally.by_shard[shard] = self.tally.by_shard.get(shard, 0) + 1
        counts["skipped_samples"] += 1
        if isinstance(item, ShardDamage):
            if item.shard not in self.damaged_shards:  # once per shard and slot, at its first lost sample
                self.damaged_shards.add(item.shard)
                counts["skipped_shards"] += 1
                log.warning("%s; %s (data.on_bad_sample=skip); %s", item.message,
                            "skipping the rest of it" if item.offset else "skipped", check_hint(self.task.source))
        else:
            counts["bad_samples"] += 1
            log.warning("%s; skipped (data.on_bad_sample=skip)", exc)

    def _decode(self, sample: RawSample, out: torch.Tensor) -> int:
        task = self.task
        where = f"shard {sample.shard}: sample {sample.key!r}"
        keys = task.keys
        missing = [f for f in keys.fields if f not in sample.fields]
        if missing:
            raise SampleError(f"{where}: missing field(s) {missing}")
        try:
            label = decode_label(sample.fields[keys.label], keys, task.classes)
        except ValueError as exc:
            raise SampleError(f"{where}: bad {keys.label} field: {exc}") from exc
        num_classes = max(len(task.classes), 1)
        if not 0 <= label < num_classes:
            raise SampleError(f"{where}: label {label} outside 0..{num_classes - 1} (key {keys.label})")
        try:
            source = probe(sample.fields[keys.image], task.transform.max_image_pixels)
            view = make_view(task.transform, task.geometry.layout.train, task.seed, task.epoch, sample.key,
                             source.width, source.height)
            render(source, view, self.pixels, out)
            return label
        except DecodeError as exc:
            raise SampleError(f"{where}: {keys.image}: {exc}") from exc
