"""`rtrain status RUN_DIR [--watch]`: one screen for an operator, read-only, from any host that sees the run
directory: state (running / preempted / failed / finished / stopped without a word), step and ETA, the
attempts and how each ended, goodput and its losses, the newest checkpoint, the slowest rank of the last
window, and the MLflow run with the command that opens it.

Sources: the ranks' structured logs (`<run dir>/logs/rank-N.jsonl`, rtrain.tracking.events) and the stall
watchdog's heartbeats (`<run dir>/heartbeats/<attempt>/rank-R.json`, rewritten every few seconds by a live
rank: their age says whether the attempt is alive). Nothing is written, no checkpoint file is read.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtrain.tracking.events import LOGS_DIR, read_events
from rtrain.tracking.goodput import LOSSES, Attempt, attempts_of, summarize
from rtrain.tracking.stragglers import breakdown, dominated, own_seconds

HEARTBEATS = "heartbeats"
ALIVE_S = 15.0  # a live rank's watchdog thread rewrites its heartbeat every 5 s at most


class StatusError(RuntimeError):
    """Not a run directory, or one without logs; the message names it."""


@dataclass
class RankWindow:
    rank: int
    host: str
    step: int
    seconds: float
    data_wait_s: float
    step_s: float
    collective_s: float = 0.0
    steps: int = 1


@dataclass
class Status:
    run_dir: Path
    state: str
    detail: str
    step: int
    total_steps: int | None
    steps_per_s: float | None
    attempts: list[Attempt]
    goodput: dict[str, float]
    checkpoint: str | None
    slowest: RankWindow | None
    mlflow: dict[str, Any] = field(default_factory=dict)
    straggler: dict[str, Any] | None = None  # the current attempt's newest straggler warning


def read_status(run_dir: str | os.PathLike, now: float | None = None) -> Status:
    run_dir = Path(run_dir)
    logs = run_dir / LOGS_DIR
    if not logs.is_dir():
        raise StatusError(f"{run_dir}: no {LOGS_DIR}/ folder: not the run directory of a run started by this "
                          "rtrain (run.output_root/run.name)")
    records = read_events(logs / "rank-0.jsonl")
    attempts = attempts_of(records)
    if not attempts:
        raise StatusError(f"{logs / 'rank-0.jsonl'}: no records yet (a run starting: try again in a moment)")
    now = time.time() if now is None else now
    current = attempts[-1]
    start = next((r for r in reversed(records) if r.get("event") == "start"), {})
    total = start.get("total_steps") if isinstance(start.get("total_steps"), int) else None
    state, detail = _state(run_dir, current, now)
    running = state == "running"
    return Status(run_dir, state, detail, current.step, total, _rate(records, current.token), attempts,
                  summarize(records, now=now if running else None), _newest_checkpoint(records),
                  _slowest(logs), start.get("mlflow") if isinstance(start.get("mlflow"), dict) else {},
                  next((r for r in reversed(records) if r.get("event") == "straggler"
                        and r.get("attempt") == current.token), None))


def _state(run_dir: Path, current: Attempt, now: float) -> tuple[str, str]:
    if current.reason == "finished":
        return "finished", f"at {_iso(current.last)}"
    if current.reason == "preempted":
        return "preempted", f"by {current.signal or 'a stop signal'} at {_iso(current.last)}: rerun the same command"
    if current.reason == "failed":
        return "failed", f"at {_iso(current.last)}: {(current.error or 'see the console')[:300]}"
    beats = _heartbeats(run_dir / HEARTBEATS / current.token)
    fresh = [beat for beat in beats if _alive(beat, now)]
    if fresh:
        oldest = min(fresh, key=lambda beat: beat["progress_at"])
        return "running", (f"{len(fresh)} rank(s) alive; least recent progress: rank {oldest['rank']} "
                           f"{now - oldest['progress_at']:.0f} s ago ({oldest['phase']}, step {oldest['step']})")
    if not beats and now - current.last < ALIVE_S:  # no watchdog (dist.stall_timeout_s=0): the log's age
        return "running", f"last record {now - current.last:.0f} s ago"
    return "stopped", (f"no end record and no live rank: killed or lost (last record {_iso(current.last)}); "
                       "rerun the same command to resume")


def _alive(beat: dict[str, Any], now: float) -> bool:
    """A rank of this host: its process exists; of another host: its heartbeat was rewritten lately."""
    if beat.get("host") == socket.gethostname() and isinstance(beat.get("pid"), int) and beat["pid"] > 0:
        try:
            os.kill(beat["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: it exists
            pass
        try:  # a killed rank nobody reaped yet (a zombie) is not alive
            if Path(f"/proc/{beat['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
        except (OSError, IndexError):
            pass
    return now - beat["written"] < ALIVE_S


def _heartbeats(folder: Path) -> list[dict[str, Any]]:
    beats = []
    for path in sorted(folder.glob("rank-*.json"))[:4096]:
        try:
            beat = json.loads(path.read_text()[:10_000])
            beat["written"] = path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if isinstance(beat, dict) and isinstance(beat.get("progress_at"), (int, float)):
            beats.append(beat)
    return beats


def _rate(records: list[dict[str, Any]], token: str) -> float | None:
    """Steps per second of wall time over the attempt's last ten windows (waits, saves and evals included)."""
    windows = [r for r in records if r.get("event") == "window" and r.get("attempt") == token
               and isinstance(r.get("step"), int)][-11:]
    if len(windows) < 2 or windows[-1]["time"] <= windows[0]["time"]:
        return None
    return (windows[-1]["step"] - windows[0]["step"]) / (windows[-1]["time"] - windows[0]["time"])


def _newest_checkpoint(records: list[dict[str, Any]]) -> str | None:
    saved = [r for r in records if r.get("event") == "checkpoint" and isinstance(r.get("step"), int)]
    return f"step {saved[-1]['step']} at {_iso(saved[-1]['time'])}" if saved else None


def _slowest(logs: Path) -> RankWindow | None:
    """Of every rank's newest window, the one whose rank needed longest itself (rtrain.tracking.stragglers:
    data wait and compute, not its wait for the others)."""
    windows = []
    for path in sorted(logs.glob("rank-*.jsonl"))[:4096]:
        last = next((r for r in reversed(read_events(path, max_bytes=1 << 20)) if r.get("event") == "window"),
                    None)
        if last is not None:
            windows.append(RankWindow(int(last.get("rank", -1)), str(last.get("host", "?")), int(last.get("step", 0)),
                                      float(last.get("seconds") or 0), float(last.get("data_wait_s") or 0),
                                      float(last.get("step_s") or 0), float(last.get("collective_s") or 0),
                                      max(1, int(last.get("steps") or 1))))
    return max(windows, key=lambda w: own_seconds(vars(w)), default=None)


def render(status: Status) -> str:
    lines = [f"run         {status.run_dir}", f"state       {status.state}: {status.detail}"]
    if status.total_steps:
        done = f"step        {status.step}/{status.total_steps} ({100 * status.step // status.total_steps}%)"
        if status.state == "running" and status.steps_per_s:
            done += (f", {status.steps_per_s:.2f} steps/s, ETA "
                     f"{_clock((status.total_steps - status.step) / status.steps_per_s)}")
        lines.append(done)
    for number, attempt in enumerate(status.attempts, 1):
        how = "running" if status.state == "running" and attempt is status.attempts[-1] else attempt.reason
        how += f" by {attempt.signal}" if attempt.signal else ""
        lines.append(f"{'attempts' if number == 1 else '':<12}{number}  {how:<22} {_iso(attempt.first)} to "
                     f"{_iso(attempt.last)}  steps {attempt.resumed_step}-{attempt.step}  hosts "
                     f"{','.join(sorted(attempt.hosts))}")
    figures = status.goodput
    if figures:
        lost = ", ".join(f"{name.replace('_', ' ')} {_span(figures[f'lost/{name}'])}" for name in LOSSES)
        lines.append(f"goodput     {figures['goodput']:.3f} of {_span(figures['goodput/wall_s'])} wall")
        lines.append(f"lost        {lost}; unaccounted {_span(figures['lost/unaccounted'])}")
    lines.append(f"checkpoint  {status.checkpoint or 'none yet'}")
    if status.slowest is not None:
        slow, row = status.slowest, vars(status.slowest)
        parts = breakdown(row)
        lines.append(f"slowest     rank {slow.rank} on {slow.host} at step {slow.step}: {own_seconds(row):.3f} s "
                     f"per step of its own (data wait {parts['data wait']:.3f}, compute {parts['compute']:.3f}; "
                     f"collective wait {parts['collective wait']:.3f}; {dominated(row)} dominated)")
    if status.mlflow.get("run_id"):
        uri = status.mlflow.get("uri", "")
        lines.append(f"mlflow      run {status.mlflow['run_id']} (experiment {status.mlflow.get('experiment')!r}) at "
                     f"{uri}: mlflow ui --backend-store-uri {uri}")
    if status.straggler is not None:
        found = status.straggler
        lines.append(f"straggler   rank {found.get('straggler')} on {str(found.get('straggler_host'))[:100]} named at "
                     f"step {found.get('step')}: {_number(found.get('seconds_per_step'))} s per step against the "
                     f"others' {_number(found.get('median_s'))} s ({str(found.get('dominated'))[:40]} dominated)")
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + "Z"


def _span(seconds: float) -> str:
    return f"{seconds:.1f} s" if math.isfinite(seconds) and abs(seconds) < 60 else _clock(seconds)


def _clock(seconds: float) -> str:
    seconds = 0 if not math.isfinite(seconds) else max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
