"""The sample ledger: which samples each training batch held, for auditing exactly-once consumption.

With `data.sample_ledger: true` every rank appends one JSON line per batch it hands to training to
`<run dir>/ledger/rank-{r:05d}.jsonl`: `{"attempt", "epoch", "batch", "ids"}`, where ids are the samples'
indices in the split's manifest order (skipped samples left out). A restarted run appends to the same file;
a batch written again by a later attempt (after a resume from an earlier checkpoint) replaces the earlier
record when read, so `read_ledger` gives what the finished run trained on.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def ledger_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / "ledger" / f"rank-{rank:05d}.jsonl"


class SampleLedger:
    """Appends a rank's batches, one flushed line each (a killed process loses at most the line in flight)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.attempt = uuid.uuid4().hex[:12]

    def record(self, epoch: int, batch: int, ids: list[int]) -> None:
        line = json.dumps({"attempt": self.attempt, "epoch": epoch, "batch": batch, "ids": ids})
        with open(self.path, "a") as file:
            file.write(line + "\n")


def read_ledger(path: str | os.PathLike) -> dict[tuple[int, int], list[int]]:
    """(epoch, batch) -> ids, the last record of each batch winning; a torn last line is ignored."""
    batches: dict[tuple[int, int], list[int]] = {}
    with open(path) as file:
        for number, line in enumerate(file, start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise ValueError(f"{path}: line {number} is not JSON") from None
                continue  # the line a killed process was writing
            batches[(entry["epoch"], entry["batch"])] = entry["ids"]
    return batches
