"""Goodput across a run's attempts, from rank 0's structured log (rtrain.tracking.events).

goodput = seconds in productive training steps / wall seconds since the run's first record. What was not
productive, in seconds (`lost/...`):
- restart: from an attempt's last record to the next attempt's first (the run was down);
- startup: from an attempt's first record to its first step (set-up, resume: loading a checkpoint);
- recomputed: the step time an attempt spent on steps that the next attempt ran again (they came after the
  checkpoint it resumed from);
- data_wait: steps waiting for the loader; checkpoint_blocking: what saves held the loop up; eval.
The rest of the wall time (`lost/unaccounted`) is what no record measures: logging windows' own collectives,
epoch boundaries (the loader's next epoch), the end of the run (final weights to MLflow), and a killed
attempt's last seconds after its last record.

`summarize(events)` works on a whole log (`rtrain status`); `GoodputMeter` keeps the figures of a live
attempt in O(1) per record on top of the earlier attempts' summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

LOSSES = ("restart", "startup", "recomputed", "data_wait", "checkpoint_blocking", "eval")


@dataclass
class Attempt:
    token: str
    first: float  # its first record
    last: float  # its last record
    started: float | None = None  # its first step was after this ("start": set-up and resume done)
    resumed_step: int = 0
    step: int = 0  # the newest step it recorded
    reason: str = "killed"  # finished / preempted / failed / killed (it left no end record)
    signal: str | None = None
    error: str | None = None
    hosts: set[str] = field(default_factory=set)
    windows: list[tuple[int, int, float]] = field(default_factory=list)  # (step, steps, step seconds)
    step_time: float = 0.0  # the windows' step seconds, summed
    data_wait: float = 0.0
    checkpoint_blocking: float = 0.0
    eval: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {"start": self.first, "end": self.last, "reason": self.reason, "signal": self.signal,
                "hosts": sorted(self.hosts), "steps": [self.resumed_step, self.step]}


def attempts_of(events: list[dict[str, Any]]) -> list[Attempt]:
    """The attempts of one rank's log, oldest first (records grouped by their attempt token)."""
    attempts: dict[str, Attempt] = {}
    for record in events:
        token, now = str(record.get("attempt")), float(record["time"])
        attempt = attempts.get(token)
        if attempt is None:
            attempt = attempts[token] = Attempt(token, now, now)
        observe(attempt, record)
    return sorted(attempts.values(), key=lambda a: a.first)


def observe(attempt: Attempt, record: dict[str, Any]) -> None:
    now, event = float(record["time"]), record.get("event")
    attempt.last = max(attempt.last, now)
    if isinstance(record.get("host"), str):
        attempt.hosts.add(record["host"])
    if isinstance(record.get("hosts"), list):  # the job's, from the start record
        attempt.hosts.update(str(host) for host in record["hosts"])
    if isinstance(record.get("step"), int):
        attempt.step = max(attempt.step, record["step"])
    if event == "start":
        attempt.started, attempt.resumed_step = now, _int(record.get("step"))
        attempt.step = max(attempt.step, attempt.resumed_step)
    elif event == "window":
        attempt.windows.append((_int(record.get("step")), max(1, _int(record.get("steps"))),
                                _num(record.get("step_s"))))
        attempt.step_time += attempt.windows[-1][2]
        attempt.data_wait += _num(record.get("data_wait_s"))
    elif event == "checkpoint":
        attempt.checkpoint_blocking += _num(record.get("blocked_s"))
    elif event == "eval":
        attempt.eval += _num(record.get("seconds"))
    elif event == "end":
        attempt.reason = str(record.get("reason") or "failed")
        attempt.signal, attempt.error = record.get("signal"), record.get("error")


def summarize(events: list[dict[str, Any]], next_resumed_step: int | None = None,
              now: float | None = None) -> dict[str, float]:
    """goodput and its losses over every attempt in `events`; `next_resumed_step`: where an attempt that is
    not in `events` resumed (its predecessor's later steps were recomputed); `now`: the wall clock's end."""
    attempts = attempts_of(events)
    if not attempts:
        return {}
    productive, lost = 0.0, dict.fromkeys(LOSSES, 0.0)
    for index, attempt in enumerate(attempts):
        redo = attempts[index + 1].resumed_step if index + 1 < len(attempts) else next_resumed_step
        if index > 0:
            lost["restart"] += max(0.0, attempt.first - attempts[index - 1].last)
        if attempt.started is not None:
            lost["startup"] += attempt.started - attempt.first
        for step, steps, seconds in attempt.windows:
            again = 0.0 if redo is None else min(1.0, max(0.0, (step - redo) / steps))
            lost["recomputed"] += again * seconds
            productive += (1.0 - again) * seconds
        lost["data_wait"] += attempt.data_wait
        lost["checkpoint_blocking"] += attempt.checkpoint_blocking
        lost["eval"] += attempt.eval
    end = attempts[-1].last if now is None else now
    return figures(productive, lost, end - attempts[0].first)


def figures(productive: float, lost: dict[str, float], wall: float) -> dict[str, float]:
    wall = max(wall, 1e-9)
    return {"goodput": productive / wall, "goodput/productive_s": productive, "goodput/wall_s": wall,
            **{f"lost/{name}": seconds for name, seconds in lost.items()},
            "lost/unaccounted": wall - productive - sum(lost.values())}


class GoodputMeter:
    """Rank 0's live figures: the earlier attempts' records (read from its log before this attempt wrote)
    summarized once this attempt says where it resumed, plus this attempt's running sums."""

    def __init__(self, earlier: list[dict[str, Any]]) -> None:
        self.earlier = earlier
        self.attempts = attempts_of(earlier)  # the earlier ones, for their tags
        self.base: dict[str, float] | None = None
        self.current: Attempt | None = None
        self.first_ever = min((float(r["time"]) for r in earlier), default=None)

    def observe(self, record: dict[str, Any]) -> None:
        now = float(record["time"])
        if self.current is None:
            self.current = Attempt(str(record.get("attempt")), now, now)
            self.first_ever = self.first_ever if self.first_ever is not None else now
        observe(self.current, record)
        if record.get("event") == "start" and self.base is None:
            self.base = summarize(self.earlier, next_resumed_step=self.current.resumed_step)
            self.earlier = []  # summarized: not kept

    def figures(self) -> dict[str, float]:
        current = self.current
        if current is None or self.first_ever is None:
            return {}
        base = self.base or {}
        lost = {name: base.get(f"lost/{name}", 0.0) for name in LOSSES}
        if base:
            lost["restart"] += max(0.0, current.first - (self.first_ever + base["goodput/wall_s"]))
        if current.started is not None:
            lost["startup"] += current.started - current.first
        lost["data_wait"] += current.data_wait
        lost["checkpoint_blocking"] += current.checkpoint_blocking
        lost["eval"] += current.eval
        productive = base.get("goodput/productive_s", 0.0) + current.step_time
        return figures(productive, lost, current.last - self.first_ever)


def attempt_tags(attempts: list[Attempt], current: Attempt | None = None,
                 state: str = "running") -> dict[str, str]:
    """`rtrain.attempt.N` (1 = the first start of the run): how each attempt went, in one line."""
    tags = {}
    for number, attempt in enumerate(attempts, 1):
        how = attempt.reason + (f" by {attempt.signal}" if attempt.signal else "")
        tags[f"rtrain.attempt.{number}"] = (f"{how}; {_iso(attempt.first)} to {_iso(attempt.last)}; steps "
                                            f"{attempt.resumed_step}-{attempt.step}; hosts "
                                            f"{','.join(sorted(attempt.hosts))}")[:5000]
    if current is not None:
        until = "" if state == "running" else f" to {_iso(current.last)}"
        tags[f"rtrain.attempt.{len(attempts) + 1}"] = (
            f"{state}; {_iso(current.first)}{until}; steps {current.resumed_step}-{current.step}; hosts "
            f"{','.join(sorted(current.hosts))}")[:5000]
    return tags


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
