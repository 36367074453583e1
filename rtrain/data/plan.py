"""Epoch plans: which sample every (rank, worker) slot reads, in which order, in which batch.

Everything here is a pure function of the manifest's shard counts, the seed, the epoch and the layout
(world size, per-rank batch size, slots per rank, shuffle buffer), so every rank and every worker process
computes the same plan without talking to the others, and a resumed run recomputes it exactly.

Samples are named by a canonical id: the shard's index in the manifest plus the sample's position in that
shard (ids are `offsets[shard] + position`). An epoch reads shards in a seeded order (train) or in manifest
order (eval); the concatenation is the epoch's *pool*. A segment of an epoch (the whole epoch, unless the
layout changed at a resume) splits its pool into contiguous ranges: one per rank, sized so every rank has the
same number of batches, then one per slot (DataLoader worker) inside the rank. Contiguous ranges keep reads
sequential (each slot opens about pool/slots worth of shards) while balancing by sample count, not by shard.
Within a slot a shuffle buffer of fixed size permutes the reading order (train); its permutation is computed
up front so that the position after any number of batches is known without reading a byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Tags keep the RNG streams for shard order and shuffle buffers independent of each other.
_SHARD_ORDER_TAG = 1
_SHUFFLE_TAG = 2


@dataclass(frozen=True)
class Layout:
    """How one segment of an epoch is split: ranks x slots, batch size, shuffle buffer."""

    world_size: int
    batch_size: int
    slots_per_rank: int
    shuffle_buffer: int
    train: bool

    def as_list(self) -> list[int]:
        return [self.world_size, self.batch_size, self.slots_per_rank, self.shuffle_buffer]


@dataclass(frozen=True)
class SlotPlan:
    """One slot's share of a segment: pool positions in reading order and in emission order."""

    rank: int
    slot: int
    read_order: np.ndarray  # positions in the segment pool, ascending (= reading order)
    emission: np.ndarray  # the same positions as the shuffle buffer emits them
    batch_sizes: list[int]  # this slot's batches, i.e. the rank's batches slot, slot+K, slot+2K, ...


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([seed % (1 << 63), *words])


def shard_offsets(counts: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])


def epoch_pool(counts: list[int], seed: int, epoch: int, shuffle_shards: bool) -> np.ndarray:
    """Canonical sample ids of the whole split in this epoch's reading order."""
    offsets = shard_offsets(counts)
    order = np.arange(len(counts))
    if shuffle_shards:
        order = _rng(seed, _SHARD_ORDER_TAG, epoch).permutation(len(counts))
    pieces = [np.arange(offsets[s], offsets[s + 1], dtype=np.int64) for s in order]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def rank_batch_sizes(pool_size: int, layout: Layout) -> list[list[int]]:
    """Per rank, the sizes of its batches; every rank gets the same number of batches.

    Train drops the pool's tail that does not fill a global batch. Eval keeps every sample: rank sample counts
    differ by at most one and each rank spreads its samples evenly over the common number of batches, so no
    sample is padded or counted twice (a batch is empty only if a rank has fewer samples than batches).
    """
    world, batch = layout.world_size, layout.batch_size
    if layout.train:
        batches = pool_size // (world * batch)
        return [[batch] * batches for _ in range(world)]
    per_rank = [pool_size // world + (r < pool_size % world) for r in range(world)]
    batches = math.ceil(max(per_rank) / batch) if pool_size else 0
    return [[n // batches + (j < n % batches) for j in range(batches)] if batches else [] for n in per_rank]


def slot_batch_sizes(rank_sizes: list[int], slot: int, slots_per_rank: int) -> list[int]:
    return rank_sizes[slot::slots_per_rank]


def slot_ranges(pool_size: int, layout: Layout) -> list[list[tuple[int, int]]]:
    """[rank][slot] -> (start, end) positions in the pool; contiguous and in (rank, slot) order."""
    ranges, start = [], 0
    for sizes in rank_batch_sizes(pool_size, layout):
        per_slot = []
        for slot in range(layout.slots_per_rank):
            count = sum(slot_batch_sizes(sizes, slot, layout.slots_per_rank))
            per_slot.append((start, start + count))
            start += count
        ranges.append(per_slot)
    return ranges


def buffered_shuffle(items: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a fill-then-swap shuffle buffer emits `items` in (webdataset's algorithm).

    Once the buffer holds `buffer_size` items, each new item replaces a uniformly drawn one, which is
    emitted; the rest is emitted in random order at the end. At most `buffer_size` items are ever held.
    """
    n = len(items)
    if n <= 1 or buffer_size <= 1:
        return items.copy()
    size = min(buffer_size, n)
    buffer = items[:size].tolist()
    picks = rng.integers(0, size, n - size).tolist()
    out = []
    for incoming, pick in zip(items[size:].tolist(), picks):
        out.append(buffer[pick])
        buffer[pick] = incoming
    tail = rng.permutation(len(buffer))
    out.extend(buffer[i] for i in tail)
    return np.asarray(out, dtype=items.dtype)


@dataclass(frozen=True)
class SegmentGeometry:
    """A segment's batch sizes and slot ranges, computed once and shared by all its slot plans."""

    pool_size: int
    layout: Layout
    rank_sizes: list[list[int]]
    ranges: list[list[tuple[int, int]]]

    @classmethod
    def of(cls, pool_size: int, layout: Layout) -> SegmentGeometry:
        return cls(pool_size, layout, rank_batch_sizes(pool_size, layout), slot_ranges(pool_size, layout))

    @property
    def batches_per_rank(self) -> int:
        return len(self.rank_sizes[0])

    @property
    def samples_covered(self) -> int:
        return sum(sum(sizes) for sizes in self.rank_sizes)


def slot_plan(geometry: SegmentGeometry, rank: int, slot: int, *, seed: int, epoch: int,
              segment: int) -> SlotPlan:
    layout = geometry.layout
    start, end = geometry.ranges[rank][slot]
    read_order = np.arange(start, end, dtype=np.int64)
    emission = read_order
    if layout.train:
        rng = _rng(seed, _SHUFFLE_TAG, epoch, segment, rank, slot)
        emission = buffered_shuffle(read_order, layout.shuffle_buffer, rng)
    sizes = slot_batch_sizes(geometry.rank_sizes[rank], slot, layout.slots_per_rank)
    return SlotPlan(rank, slot, read_order, emission, sizes)


def slot_batches_done(rank_batches_done: int, slot: int, slots_per_rank: int) -> int:
    """How many of a slot's batches are among the rank's first `rank_batches_done` batches."""
    return max(0, -(-(rank_batches_done - slot) // slots_per_rank))


def slot_samples_consumed(plan: SlotPlan, rank_batches_done: int, slots_per_rank: int) -> int:
    return sum(plan.batch_sizes[:slot_batches_done(rank_batches_done, plan.slot, slots_per_rank)])


def next_pool(pool: np.ndarray, layout: Layout, rank_batches_done: int, *, seed: int, epoch: int,
              segment: int) -> np.ndarray:
    """The samples a segment assigned but had not yet emitted after `rank_batches_done` batches per rank.

    This is what a resumed epoch with a different layout still has to cover; the result keeps the pool's
    reading order so the new segment's slots still read shards sequentially.
    """
    keep = np.zeros(len(pool), dtype=bool)
    geometry = SegmentGeometry.of(len(pool), layout)
    for rank in range(layout.world_size):
        for slot in range(layout.slots_per_rank):
            plan = slot_plan(geometry, rank, slot, seed=seed, epoch=epoch, segment=segment)
            consumed = slot_samples_consumed(plan, rank_batches_done, layout.slots_per_rank)
            keep[plan.emission[consumed:]] = True
    return pool[keep]
