"""The sample ledger: which samples each training batch held, for auditing exactly-once consumption.

With `data.sample_ledger: true` every rank appends JSON lines to `<run dir>/ledger/rank-{r:05d}.jsonl`:
- a *start* line whenever its loader starts handing out batches (an epoch from the top, or the rest of one
  after a resume): `{"t", "rank", "start": {"epoch", "segment", "batch", "history"}}`;
- a *batch* line per batch handed to training: `{"t", "rank", "epoch", "segment", "batch", "ids"}`, ids being
  the samples' indices in the split's manifest order (skipped samples left out).
A segment is the part of an epoch run at one layout (world size, batch size, ...): resuming on another world
size starts a new one, and `history` says where each earlier segment stopped. All ranks step in lockstep, so
(epoch, segment, batch) is the same step on every rank.

`read_ledger(folder)` replays the lines: a start line discards its own rank's batches recorded past that
position (trained after the checkpoint the run resumed from), batches of ranks outside the new world size
recorded before it, and, by `history`, batches past the end of an earlier segment; what remains is what the
finished run trained on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

BatchKey = tuple[int, int, int, int]  # (epoch, segment, batch, rank)


def ledger_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / "ledger" / f"rank-{rank:05d}.jsonl"


class SampleLedger:
    """Appends a rank's lines, flushed one by one (a killed process loses at most the line in flight)."""

    def __init__(self, path: str | os.PathLike, rank: int) -> None:
        self.path = Path(path)
        self.rank = rank
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, entry: dict) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps({"t": time.time(), "rank": self.rank, **entry}) + "\n")

    def start(self, epoch: int, segment: int, batch: int, history: list[list[int]], world_size: int) -> None:
        self._append({"start": {"epoch": epoch, "segment": segment, "batch": batch, "history": history,
                                "world_size": world_size}})

    def record(self, epoch: int, segment: int, batch: int, ids: list[int]) -> None:
        self._append({"epoch": epoch, "segment": segment, "batch": batch, "ids": ids})


def _file_lines(path: Path) -> list[dict]:
    entries = []
    with open(path) as file:
        for number, line in enumerate(file, start=1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise ValueError(f"{path}: line {number} is not JSON") from None
                # else: the line a killed process was writing
    return entries


def _past(key: BatchKey, start: dict) -> bool:
    """Is batch `key` at or past the position a run (re)started from?"""
    epoch, segment, batch, _ = key
    if epoch != start["epoch"]:
        return epoch > start["epoch"]
    return segment > start["segment"] or (segment == start["segment"] and batch >= start["batch"])


def _past_segment_end(key: BatchKey, start: dict) -> bool:
    epoch, segment, batch, _ = key
    return epoch == start["epoch"] and segment < start["segment"] and batch >= start["history"][segment][-1]


def read_ledger(folder: str | os.PathLike) -> dict[BatchKey, list[int]]:
    """(epoch, segment, batch, rank) -> sample ids of every batch the finished run trained on."""
    batches: dict[BatchKey, tuple[float, list[int]]] = {}
    starts: list[dict] = []
    for path in sorted(Path(folder).glob("rank-*.jsonl")):
        for entry in _file_lines(path):  # one rank's lines, in the order it wrote them
            if "start" in entry:
                starts.append({**entry["start"], "t": entry["t"]})
                for key in [k for k in batches if k[3] == entry["rank"] and _past(k, entry["start"])]:
                    del batches[key]
            else:
                key = (entry["epoch"], entry["segment"], entry["batch"], entry["rank"])
                batches[key] = (entry["t"], entry["ids"])
    for start in starts:  # across ranks
        for key, (t, _) in list(batches.items()):
            gone_rank = key[3] >= start["world_size"] and t < start["t"] and _past(key, start)
            if gone_rank or _past_segment_end(key, start):
                del batches[key]
    return {key: ids for key, (_, ids) in sorted(batches.items())}


def epoch_samples(batches: dict[BatchKey, list[int]], epoch: int) -> list[int]:
    """Every sample id trained on in `epoch`, over all ranks and segments (duplicates kept, to be checked)."""
    return [i for (e, _, _, _), ids in sorted(batches.items()) if e == epoch for i in ids]
