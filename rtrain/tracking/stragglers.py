"""Who holds the run back. Every log window the loop gathers each rank's data wait, step seconds and
collective wait (rtrain.distributed.waits) in one all_gather; rank 0 turns the table into MLflow metrics
and names a rank that stays slow.

A rank's own time per step is its data wait plus its steps minus what it waited for its peers in collectives:
in lockstep data parallelism every rank's window lasts as long, and the fast ranks spend the difference
blocked in a collective, so step seconds alone would make every rank look alike. Metrics: `step_time/p50`
and `step_time/max` (own seconds per step over ranks) and `step_time/slowest_rank`. A rank whose own time
stays more than `fraction` above the median of the other ranks for `windows` windows in a row is named in a
warning (once per such stretch) with its host and what dominated: data wait, compute or collective wait.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rtrain.tracking.stragglers")
PARTS = ("data wait", "compute", "collective wait")


def breakdown(row: dict[str, Any]) -> dict[str, float]:
    """Seconds per step of a window's row (data_wait_s, step_s, collective_s, steps), by part."""
    steps = max(1, int(row.get("steps") or 1))
    data = max(0.0, float(row.get("data_wait_s") or 0.0))
    collective = max(0.0, float(row.get("collective_s") or 0.0))
    compute = max(0.0, float(row.get("step_s") or 0.0) - collective)
    return {"data wait": data / steps, "compute": compute / steps, "collective wait": collective / steps}


def own_seconds(row: dict[str, Any]) -> float:
    """What the rank itself needed per step: its data wait and compute, not its wait for the others."""
    parts = breakdown(row)
    return parts["data wait"] + parts["compute"]


def dominated(row: dict[str, Any]) -> str:
    parts = breakdown(row)
    return max(PARTS, key=lambda part: parts[part])


class StragglerWatch:
    """Rank 0's view of the gathered table; `observe` is the loop's `rank_times` (its metrics are logged with
    the window's)."""

    def __init__(self, hosts: list[str], fraction: float, windows: int,
                 on_straggler: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.hosts, self.fraction, self.windows = hosts, fraction, windows
        self.on_straggler = on_straggler
        self.streaks: dict[int, int] = {}

    def observe(self, step: int, table: list[dict[str, Any]]) -> dict[str, float]:
        own = [own_seconds(row) for row in table]
        slowest = max(range(len(own)), key=own.__getitem__)
        metrics = {"step_time/p50": statistics.median(own), "step_time/max": own[slowest],
                   "step_time/slowest_rank": float(table[slowest].get("rank", slowest))}
        for index, row in enumerate(table):
            others = own[:index] + own[index + 1:]
            if not others:
                continue
            median = statistics.median(others)
            over = median > 0 and own[index] > median * (1 + self.fraction)
            rank = int(row.get("rank", index))
            self.streaks[rank] = self.streaks.get(rank, 0) + 1 if over else 0
            if self.streaks[rank] == self.windows:
                self._warn(step, rank, row, own[index], median)
        return metrics

    def _warn(self, step: int, rank: int, row: dict[str, Any], seconds: float, median: float) -> None:
        host = self.hosts[rank] if 0 <= rank < len(self.hosts) else "?"
        parts, what = breakdown(row), dominated(row)
        log.warning("rank %d on %s is a straggler: %.3f s per step for %d windows up to step %d, %.0f%% above "
                    "the other ranks' median %.3f s; %s dominated (data wait %.3f, compute %.3f, collective wait "
                    "%.3f s per step)", rank, host, seconds, self.windows, step, 100 * (seconds / median - 1),
                    median, what, parts["data wait"], parts["compute"], parts["collective wait"])
        if self.on_straggler is not None:
            self.on_straggler({"step": step, "straggler": rank, "straggler_host": host, "seconds_per_step": seconds,
                               "median_s": median, "dominated": what, "windows": self.windows})
