"""Epoch plans: shard order, balanced per-rank batches, shuffle buffer, re-planning after a layout change."""

from __future__ import annotations

import numpy as np
import pytest

from rtrain.data.plan import (
    Layout,
    SegmentGeometry,
    buffered_shuffle,
    epoch_pool,
    next_pool,
    rank_batch_sizes,
    slot_batches_done,
    slot_plan,
    slot_samples_consumed,
)

UNEQUAL = [5, 17, 3, 9, 1, 12]  # 47 samples in deliberately unequal shards


def test_shard_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a = epoch_pool(UNEQUAL, seed=3, epoch=0, shuffle_shards=True)
    assert np.array_equal(a, epoch_pool(UNEQUAL, seed=3, epoch=0, shuffle_shards=True))
    assert not np.array_equal(a, epoch_pool(UNEQUAL, seed=3, epoch=1, shuffle_shards=True))
    assert not np.array_equal(a, epoch_pool(UNEQUAL, seed=4, epoch=0, shuffle_shards=True))
    assert sorted(a.tolist()) == list(range(sum(UNEQUAL)))
    assert np.array_equal(epoch_pool(UNEQUAL, 3, 0, shuffle_shards=False), np.arange(sum(UNEQUAL)))


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 3), (3, 5), (4, 2), (5, 1)])
def test_train_ranks_get_equal_full_batches(world: int, batch: int) -> None:
    sizes = rank_batch_sizes(47, Layout(world, batch, 2, 8, train=True))
    assert len({len(s) for s in sizes}) == 1
    assert len(sizes[0]) == 47 // (world * batch)
    assert all(size == batch for rank in sizes for size in rank)


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 3), (3, 5), (4, 2), (5, 1), (7, 8)])
def test_eval_ranks_get_equal_batch_counts_covering_every_sample_once(world: int, batch: int) -> None:
    sizes = rank_batch_sizes(47, Layout(world, batch, 2, 8, train=False))
    assert len({len(s) for s in sizes}) == 1
    assert sum(map(sum, sizes)) == 47
    assert all(size <= batch for rank in sizes for size in rank)
    # A batch is empty only where a rank has fewer samples than the common batch count (e.g. 9 for 10).
    assert all(min(rank) > 0 for rank in sizes if sum(rank) >= len(rank))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("slots", [1, 2, 3])
def test_slots_partition_the_pool(train: bool, slots: int) -> None:
    layout = Layout(3, 2, slots, 4, train)
    geometry = SegmentGeometry.of(47, layout)
    seen = []
    for rank in range(3):
        for slot in range(slots):
            plan = slot_plan(geometry, rank, slot, seed=0, epoch=0, segment=0)
            assert sorted(plan.emission.tolist()) == plan.read_order.tolist()
            assert sum(plan.batch_sizes) == len(plan.read_order)
            seen.extend(plan.read_order.tolist())
    assert sorted(seen) == list(range(geometry.samples_covered))
    assert geometry.samples_covered == (47 // 6) * 6 if train else 47


def test_shuffle_buffer_is_a_bounded_permutation() -> None:
    items = np.arange(200)
    out = buffered_shuffle(items, 16, np.random.default_rng(0))
    assert sorted(out.tolist()) == items.tolist()
    assert not np.array_equal(out, items)
    # The t-th emitted item has been read by then: it is among the first t + buffer items.
    assert all(item < t + 16 for t, item in enumerate(out.tolist()))
    assert np.array_equal(out, buffered_shuffle(items, 16, np.random.default_rng(0)))


def test_slot_progress_follows_round_robin() -> None:
    # rank batches 0..6 over 3 slots: slot 0 has 0, 3, 6; slot 1 has 1, 4; slot 2 has 2, 5.
    assert [slot_batches_done(7, s, 3) for s in range(3)] == [3, 2, 2]
    assert [slot_batches_done(1, s, 3) for s in range(3)] == [1, 0, 0]
    assert [slot_batches_done(0, s, 3) for s in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("train", [True, False])
def test_next_pool_is_exactly_what_was_assigned_and_not_consumed(train: bool) -> None:
    layout = Layout(2, 3, 2, 5, train)
    pool = epoch_pool(UNEQUAL, seed=1, epoch=2, shuffle_shards=train)
    geometry = SegmentGeometry.of(len(pool), layout)
    consumed, assigned = set(), set()
    for rank in range(2):
        for slot in range(2):
            plan = slot_plan(geometry, rank, slot, seed=1, epoch=2, segment=0)
            used = slot_samples_consumed(plan, 3, 2)
            consumed.update(pool[plan.emission[:used]].tolist())
            assigned.update(pool[plan.read_order].tolist())
    rest = next_pool(pool, layout, 3, seed=1, epoch=2, segment=0)
    assert len(consumed) == 2 * 3 * 3
    assert set(rest.tolist()) == assigned - consumed
    assert len(rest) == len(set(rest.tolist()))
    order = {cid: i for i, cid in enumerate(pool.tolist())}
    assert [order[c] for c in rest.tolist()] == sorted(order[c] for c in rest.tolist())
