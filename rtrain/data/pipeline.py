"""ShardLoader: a split's shards -> this rank's uint8 batches, deterministic and exactly resumable.

Reads tars with the standard library rather than webdataset's pipeline: webdataset 1.0 has no resumable
state, and exact resume needs to know, before reading, which sample lands in which batch (plan.py), which is
simplest with a reader that owns the order. The format is plain WebDataset (`{key}.jpg`, `{key}.cls`, or the
image/label keys the manifest names).

Contract (the engine relies on it):
- `len(loader)` is the number of batches of the current epoch and is the same on every rank; iterating
  yields the rest of the current epoch (all of it after `set_epoch`, the remainder after `load_state_dict`).
- batches are (images uint8 N,3,H,W in channels_last memory, labels int64 N); a sample skipped
  under `on_bad_sample: skip` makes its batch one shorter, it never shifts later batches.
- `state_dict()` covers exactly the batches handed to the caller (not those prefetched by workers).
- `stats` counts skipped samples, `skipped_by_shard` the same per shard; both are part of the state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from rtrain.data.batchpool import BatchPool, PooledBatch
from rtrain.data.cache import ShardCache
from rtrain.data.ledger import SampleLedger
from rtrain.data.plan import (
    Layout,
    SegmentGeometry,
    epoch_pool,
    next_pool,
    shard_offsets,
    slot_batches_done,
)
from rtrain.data.sources import ShardSource
from rtrain.data.state import LoaderState, parse_state
from rtrain.data.suspects import (
    CrashGuard,
    Quarantine,
    ReadingMarks,
    marks_path,
    quarantine_of,
    record,
    suspect_from_marks,
)
from rtrain.data.worker import EpochTask, LoaderStall, RankBatches

log = logging.getLogger("rtrain.data")


class ShardLoader:
    def __init__(self, cfg: Any, split: str, *, rank: int, world_size: int, batch_size: int, seed: int,
                 train: bool, ledger: str | Path | None = None, guard: CrashGuard | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"loader: rank {rank} is not in a world of size {world_size}")
        if batch_size < 1:
            raise ValueError(f"loader: batch_size must be positive, got {batch_size}")
        self.cfg, self.split, self.rank, self.train = cfg, split, rank, train
        self.seed = int(seed)
        self.source = ShardSource(cfg.source, split, cfg.storage_options, cfg.allowed_shard_roots,
                                  cache=ShardCache.from_config(cfg))
        self.manifest = self.source.read_manifest()
        counts = [entry.count for entry in self.manifest.shards]
        self._offsets = shard_offsets(counts)
        self.layout = Layout(world_size, batch_size, max(1, cfg.num_workers), cfg.shuffle_buffer, train)
        self._state = LoaderState(split, train, self.seed, 0, self.manifest.num_samples, self.layout)
        self._pool_key: tuple | None = None
        self._pool = np.zeros(0, dtype=np.int64)
        self._held_ahead = 0
        self.ledger = SampleLedger(ledger, rank) if ledger is not None else None  # see rtrain.data.ledger
        # No crash loop (rtrain.data.suspects): what stalled or killed a rank in two attempts is left out.
        self.guard = guard
        self.quarantine = (quarantine_of(guard.run_dir, counts={e.name: e.count for e in self.manifest.shards})
                           if guard is not None else Quarantine())
        self.marks = (ReadingMarks(marks_path(guard.folder, rank), self.layout.slots_per_rank, create=True)
                      if guard is not None else None)
        if self.quarantine and rank == 0:
            log.warning("quarantined for this run (stalled or killed a rank in two attempts; %s): %s",
                        "see suspects.jsonl in the run directory", ", ".join(self.quarantine.names()))
        if self.manifest.num_samples == 0 or self._geometry().batches_per_rank == 0:
            raise ValueError(
                f"{self.source.location}: split {split!r} has {self.manifest.num_samples} samples, fewer than "
                f"one batch per rank ({world_size} ranks x {batch_size})")

    # ---- what the engine reads -------------------------------------------------------------------------
    @property
    def classes(self) -> dict[str, int]:
        return dict(self.manifest.classes)

    @property
    def epoch(self) -> int:
        return self._state.epoch

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._state.stats)

    @property
    def skipped_by_shard(self) -> dict[str, int]:
        """Samples skipped under `data.on_bad_sample: skip`, per shard (manifest name), on this rank."""
        return dict(sorted(self._state.skipped_by_shard.items()))

    def __len__(self) -> int:
        return sum(done for _, done in self._state.history_layouts()) + self._geometry().batches_per_rank

    @property
    def batches_remaining(self) -> int:
        return self._geometry().batches_per_rank - self._state.batches_done

    @property
    def num_samples(self) -> int:
        """Samples the current epoch covers over all ranks (train drops the last partial global batch)."""
        size, earlier = self.manifest.num_samples, 0
        for layout, done in self._state.history_layouts():
            geometry = SegmentGeometry.of(size, layout)
            consumed = sum(sum(sizes[:done]) for sizes in geometry.rank_sizes)
            earlier += consumed
            size = geometry.samples_covered - consumed
        return earlier + self._geometry().samples_covered

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; setting the current epoch again keeps the position."""
        if epoch != self._state.epoch:
            self._state.epoch = int(epoch)
            self._state.batches_done = 0
            self._state.history = []

    def __iter__(self) -> EpochIterator:
        return EpochIterator(self)

    # ---- resumable state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self._state
        done = state.batches_done - self._held_ahead
        geometry = self._geometry()
        slots = self.layout.slots_per_rank
        consumed = [
            [sum(sizes[slot::slots][:slot_batches_done(done, slot, slots)]) for slot in range(slots)]
            for sizes in geometry.rank_sizes
        ]
        snapshot = LoaderState(state.split, state.train, state.seed, state.epoch, state.num_samples,
                               state.layout, done, state.history, state.stats, state.skipped_by_shard)
        return snapshot.to_dict(consumed)

    def load_state_dict(self, raw: dict[str, Any]) -> None:
        saved = parse_state(raw)
        where = f"loader state for split {self.split!r}"
        if saved.split != self.split or saved.train != self.train:
            raise ValueError(f"{where}: state is for split {saved.split!r} (train={saved.train})")
        if saved.num_samples != self.manifest.num_samples:
            raise ValueError(f"{where}: state covers {saved.num_samples} samples, the manifest at "
                             f"{self.source.location} lists {self.manifest.num_samples}")
        if saved.seed != self.seed:
            raise ValueError(f"{where}: seed {saved.seed} differs from this run's seed {self.seed}")
        self._check_consumed(saved, raw["slot_consumed"])
        history, done = saved.history, saved.batches_done
        if saved.layout != self.layout and done > 0:
            history, done = history + [saved.layout.as_list() + [done]], 0
        self._state = LoaderState(self.split, self.train, self.seed, saved.epoch, saved.num_samples,
                                  self.layout, done, history, dict(saved.stats), dict(saved.skipped_by_shard))
        self._held_ahead = 0

    def _check_consumed(self, saved: LoaderState, slot_consumed: Any) -> None:
        probe = LoaderState(saved.split, saved.train, saved.seed, saved.epoch, saved.num_samples,
                            saved.layout, saved.batches_done, saved.history)
        geometry = SegmentGeometry.of(len(self._pool_for(probe)), saved.layout)
        if saved.batches_done > geometry.batches_per_rank:
            raise ValueError(f"loader state: batches_done {saved.batches_done} exceeds the "
                             f"{geometry.batches_per_rank} batches of its epoch plan")
        k = saved.layout.slots_per_rank
        expected = [[sum(sizes[s::k][:slot_batches_done(saved.batches_done, s, k)]) for s in range(k)]
                    for sizes in geometry.rank_sizes]
        if [list(map(int, row)) for row in slot_consumed] != expected:
            raise ValueError("loader state: slot_consumed does not match the epoch plan (other data or seed?)")

    # ---- plan --------------------------------------------------------------------------------------------
    def _counts(self) -> list[int]:
        return [entry.count for entry in self.manifest.shards]

    def _pool_for(self, state: LoaderState) -> np.ndarray:
        """The current segment's pool: the epoch's samples minus what earlier segments consumed."""
        key = (state.epoch, tuple(map(tuple, state.history)))
        if key != self._pool_key:
            pool = epoch_pool(self._counts(), self.seed, state.epoch, self.train)
            for segment, (layout, done) in enumerate(state.history_layouts()):
                pool = next_pool(pool, layout, done, seed=self.seed, epoch=state.epoch, segment=segment)
            self._pool_key, self._pool = key, pool
        return self._pool

    def _geometry(self) -> SegmentGeometry:
        return SegmentGeometry.of(len(self._pool_for(self._state)), self.layout)

    def _task(self) -> EpochTask:
        cfg = self.cfg
        return EpochTask(
            source=self.source, shards=list(self.manifest.shards), offsets=self._offsets,
            pool=self._pool_for(self._state), geometry=self._geometry(), rank=self.rank, seed=self.seed,
            epoch=self.epoch, segment=len(self._state.history), batches_done=self._state.batches_done,
            transform=cfg, classes=dict(self.manifest.classes), keys=self.manifest.keys,
            skip_bad=cfg.on_bad_sample == "skip", verify_sha256=cfg.verify_sha256,
            marks=self.marks, quarantine=self.quarantine,
        )


def _as_produced(item: Any) -> Any:
    """DataLoader's collate_fn for ready-made batches: the default (default_convert) would turn the labels
    array back into a tensor in the worker, i.e. into a new shared-memory segment per batch."""
    return item


class EpochIterator:
    """Iterates the rest of the loader's current epoch; counts batches as they are handed out."""

    def __init__(self, loader: ShardLoader):
        self.loader = loader
        loader._held_ahead = 0
        task = self.task = loader._task()
        if loader.ledger is not None:
            state = loader._state
            loader.ledger.start(state.epoch, len(state.history), state.batches_done, state.history,
                                loader.layout.world_size)
        self._items: Iterator = iter(())
        self._pool: BatchPool | None = None
        cfg = loader.cfg
        self._pin = bool(cfg.pin_memory and torch.cuda.is_available())
        if task.batches_left > 0:
            if cfg.num_workers > 0:  # batches cross a process boundary: reuse their shared memory
                self._pool = BatchPool(cfg.num_workers, max(task.geometry.rank_sizes[task.rank]),
                                       cfg.image_size)
            self._items = iter(DataLoader(
                RankBatches(task, self._pool), batch_size=None, collate_fn=_as_produced,
                num_workers=cfg.num_workers, pin_memory=self._pin, persistent_workers=False,
                timeout=cfg.loader_timeout_s if cfg.num_workers > 0 else 0,
            ))

    def __iter__(self) -> EpochIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.loader._state
        while True:
            images, labels, ids, tally = self._next_item()
            state.add_skips(tally.counts, tally.by_shard)
            if tally.failure is not None:  # on_bad_sample: raise, from a worker (see rtrain.data.worker)
                raise tally.failure
            if isinstance(images, PooledBatch):
                images = self._pool.take(images, self._pin)
            if images is not None:
                labels = torch.from_numpy(labels)
                if self._pin:
                    labels = labels.pin_memory()
                if self.loader.ledger is not None:
                    self.loader.ledger.record(state.epoch, len(state.history), state.batches_done, ids)
                state.batches_done += 1
                return images, labels

    def _next_item(self) -> tuple:
        marks, slots = self.loader.marks, self.loader.layout.slots_per_rank
        awaited = self.loader._state.batches_done % slots  # rank batch b comes from slot b mod K
        if marks is not None:
            marks.awaiting(awaited)
        try:
            return next(self._items)
        except RuntimeError as exc:
            task, cfg = self.task, self.loader.cfg
            if str(exc).startswith("DataLoader timed out after"):
                suspect = self._record([awaited], f"no batch in {cfg.loader_timeout_s:g} s (data.loader_timeout_s)")
                self._stop_stuck_workers()
                more = " ..." if len(task.shards) > 4 else ""
                where = (f"on {suspect[0].describe()}" if suspect else
                         "shards " + ", ".join(e.name for e in task.shards[:4]) + more)
                raise LoaderStall(
                    f"rank {task.rank}: no batch from its {cfg.num_workers} loader worker process(es) in "
                    f"{cfg.loader_timeout_s:g} s (data.loader_timeout_s): a worker is stuck reading or decoding; "
                    f"epoch {task.epoch}, rank batch {self.loader._state.batches_done}, {where}") from None
            # A worker process that died (killed by a signal, crashed in a decoder) is evidence against what it
            # was on; an exception a worker raised and DataLoader re-raises ("Caught ... in DataLoader worker") is
            # not: the worker lives, and its error says what went wrong.
            if str(exc).startswith("DataLoader worker") and "Caught" not in str(exc):
                workers = getattr(self._items, "_workers", [])
                dead = [w for w, proc in enumerate(workers) if not proc.is_alive()]
                self._record([(task.batches_done + w) % slots for w in dead], " ".join(str(exc).split())[:200])
            raise

    def _stop_stuck_workers(self) -> None:
        """Kill the rank's loader workers, then let DataLoader shut down: with a worker stuck in a read, its own
        shutdown waits 5 s per worker before terminating it."""
        items = self._items
        workers = getattr(items, "_workers", [])
        if getattr(items, "_worker_pids_set", False):  # else its SIGCHLD handler reports the kill as a crash
            from torch.utils.data._utils import signal_handling

            signal_handling._remove_worker_pids(id(items))
            items._worker_pids_set = False
        for proc in workers:
            if proc.is_alive():
                proc.kill()
        for proc in workers:
            proc.join(timeout=5)
        shutdown = getattr(items, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _record(self, slots: list[int], why: str) -> list:
        """Write down what the given slots were on (rtrain.data.suspects); the suspects found."""
        loader = self.loader
        if loader.guard is None or loader.marks is None:
            return []
        names = [e.name for e in self.task.shards]
        found = [s for s in (suspect_from_marks(loader.marks, names, self.task.offsets, slot) for slot in slots)
                 if s is not None]
        for suspect in found:
            try:
                record(loader.guard.run_dir, loader.guard.attempt, loader.rank, suspect, why)
            except OSError as exc:
                log.warning("could not record %s in the run directory: %s", suspect.describe(), exc)
        return found

    def hold_ahead(self, batches: int) -> None:
        """A prefetcher holds `batches` already taken from this iterator but not yet given to the caller."""
        self.loader._held_ahead = batches
