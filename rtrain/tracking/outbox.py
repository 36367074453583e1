"""What the tracker could not send: a JSON-lines file in the run directory, sent in order when the server answers.

Training never waits for a tracking server that is gone (README, "When the tracking server goes away"): the
tracker appends each record it could not deliver here and sends the backlog at most every
`tracking.reconnect_every_s`, at the end of the run and when the run is resumed. The file survives the
process, so a run that ends (or is killed) during an outage still delivers every record on its next start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rtrain._io import write_atomically

OUTBOX_NAME = "unsent.jsonl"


class Outbox:
    """Records ({"kind": "metrics" | "tags" | "artifact", "run_id": ..., ...}) waiting for the server."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        # A line cut short by a kill mid-write is the only one that may not parse: it was never complete.
        return [json.loads(line) for line in lines if line.strip() and line.rstrip().endswith("}")]

    def __len__(self) -> int:
        return len(self.records())

    def pending_steps(self, run_id: str) -> dict[str, int]:
        """Per metric key, the highest step waiting here for run_id (they count as logged)."""
        steps: dict[str, int] = {}
        for record in self.records():
            if record.get("kind") == "metrics" and record.get("run_id") == run_id:
                for key in record["metrics"]:
                    steps[key] = max(steps.get(key, -1), int(record["step"]))
        return steps

    def flush(self, send: Callable[[dict[str, Any]], None]) -> int:
        """Send every record in order; on the first failure keep it and the rest, and re-raise."""
        records = self.records()
        for i, record in enumerate(records):
            try:
                send(record)
            except BaseException:
                self._rewrite(records[i:])
                raise
        if records:
            self.path.unlink(missing_ok=True)
        return len(records)

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        write_atomically(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
