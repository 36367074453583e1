"""The loader's resumable position: plain ints, strings and lists (safe for torch.load(weights_only=True)).

All ranks step in lockstep (every rank yields the same number of batches per epoch), so one rank's
`batches_done` fixes every slot's position; the state of any rank is therefore enough to resume all of them,
with the same world size or a different one. `slot_consumed` spells out, per rank and slot, how many samples
of its share were already handed out (informative, and re-derived and checked on load).

`history` lists the earlier segments of the current epoch: a segment ends when a run resumes mid-epoch with a
different layout (world size, per-rank batch size, workers per rank or shuffle buffer). Each entry is
[world_size, batch_size, slots_per_rank, shuffle_buffer, batches_done].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rtrain.data.plan import Layout

STATE_VERSION = 1
STAT_KEYS = ("skipped_samples", "bad_samples", "skipped_shards")


@dataclass
class LoaderState:
    split: str
    train: bool
    seed: int
    epoch: int
    num_samples: int  # samples in the split's manifest: a resume against another data set is refused
    layout: Layout
    batches_done: int = 0
    history: list[list[int]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))
    skipped_by_shard: dict[str, int] = field(default_factory=dict)  # manifest shard name -> samples skipped

    def add_skips(self, counts: dict[str, int], by_shard: dict[str, int]) -> None:
        for key, value in counts.items():
            self.stats[key] = self.stats.get(key, 0) + int(value)
        for name, value in by_shard.items():
            self.skipped_by_shard[name] = self.skipped_by_shard.get(name, 0) + int(value)

    def history_layouts(self) -> list[tuple[Layout, int]]:
        return [(Layout(w, b, k, buf, self.train), done) for w, b, k, buf, done in self.history]

    def to_dict(self, slot_consumed: list[list[int]]) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "train": self.train,
            "seed": self.seed,
            "epoch": self.epoch,
            "split_samples": self.num_samples,
            "world_size": self.layout.world_size,
            "batch_size": self.layout.batch_size,
            "slots_per_rank": self.layout.slots_per_rank,
            "shuffle_buffer": self.layout.shuffle_buffer,
            "batches_done": self.batches_done,
            "slot_consumed": [list(map(int, row)) for row in slot_consumed],
            "history": [list(map(int, entry)) for entry in self.history],
            "stats": {k: int(v) for k, v in self.stats.items()},
            "skipped_by_shard": {k: int(v) for k, v in sorted(self.skipped_by_shard.items())},
        }


def _field(raw: dict[str, Any], key: str, kind: type) -> Any:
    if key not in raw:
        raise ValueError(f"loader state: missing key {key!r}")
    value = raw[key]
    if kind is int and hasattr(value, "item"):  # a tensor or numpy scalar that went through a checkpoint
        value = value.item()
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"loader state: {key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def parse_state(raw: dict[str, Any]) -> LoaderState:
    """Validate a state dict (any version mismatch or malformed key is an error naming the key)."""
    if not isinstance(raw, dict):
        raise TypeError(f"loader state: expected a dict, got {type(raw).__name__}")
    version = _field(raw, "version", int)
    if version != STATE_VERSION:
        raise ValueError(f"loader state: version {version}, this loader reads version {STATE_VERSION}")
    train = _field(raw, "train", bool)
    layout = Layout(_field(raw, "world_size", int), _field(raw, "batch_size", int),
                    _field(raw, "slots_per_rank", int), _field(raw, "shuffle_buffer", int), train)
    history = _field(raw, "history", list)
    if any(not isinstance(e, list) or len(e) != 5 for e in history):
        raise ValueError("loader state: 'history' entries must be [world, batch, slots, buffer, done]")
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats.update({str(k): int(v) for k, v in _field(raw, "stats", dict).items()})
    by_shard = {str(k): int(v) for k, v in raw.get("skipped_by_shard", {}).items()}  # optional: added later
    return LoaderState(
        split=_field(raw, "split", str), train=train, seed=_field(raw, "seed", int),
        epoch=_field(raw, "epoch", int), num_samples=_field(raw, "split_samples", int), layout=layout,
        batches_done=_field(raw, "batches_done", int), history=[[int(x) for x in e] for e in history],
        stats=stats, skipped_by_shard=by_shard,
    )
