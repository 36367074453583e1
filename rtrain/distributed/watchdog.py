"""The stall watchdog: a rank that stops making progress (SIGSTOPped, stuck in a loader, a collective, a
checkpoint write) ends the run on every rank within dist.stall_timeout_s plus a poll interval.

Every rank records progress in memory (`beat(phase, step)`: waiting for data, in the step, saving, evaluating,
...) and a daemon thread of its own writes it to `<run dir>/heartbeats/<attempt>/rank-R.json` every
timeout/20 (at most 5 s): the time of its last progress, not of the write, so a rank whose main thread is
stuck ages even while its thread runs, and a stopped process (whose thread stops too) ages as well. The threads
of the first and the last rank read every rank's file; when one is older than the timeout, a watcher writes one
line naming the stalled rank(s), host, pid, phase and step to `<run dir>/heartbeats/STALLED` (the first writer
wins) and ends its own process with EXIT_STALLED. The launchers turn that into the run's one line and a retryable exit; the ranks that were
waiting in a collective on the stalled one are ended by the launcher (local) or by Ray with the worker group.

A rank stuck in a collective because a peer stalled also stops progressing, but only after that peer did:
the oldest heartbeat is the cause, and it is named first. The attempt folder (a token rank 0 broadcasts at
start) keeps a restarted run from reading the heartbeats of the attempt before it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from rtrain._process import EXIT_STALLED, HEAD_LOST_NOTE, HEARTBEATS_DIR, STALLED_NOTE, write_stall_note


@dataclass(frozen=True)
class Heartbeat:
    rank: int
    host: str
    pid: int
    phase: str
    step: int
    progress_at: float  # time.time() of the last progress

    def describe(self, now: float) -> str:
        return (f"rank {self.rank} on {self.host} (pid {self.pid}) made no progress for {now - self.progress_at:.0f} s, "
                f"last {self.phase} at step {self.step}")


def _attempt_token() -> str:
    """One token per start of the run, the same on every rank (rank 0's, broadcast)."""
    token = [uuid.uuid4().hex[:12]]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


class StallWatchdog:
    """One per rank; `start()` after the process group exists (a collective), `close()` at the end."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout_s: float):
        self.root = run_dir / HEARTBEATS_DIR
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        # A write every poll by every rank, reads by two: on a shared filesystem at 256 ranks and the default
        # 600 s timeout that is ~50 small writes and 2 x 256 reads per 5 s.
        self.poll_s = min(max(timeout_s / 20, 0.05), 5.0)
        # Two watchers, so a stalled one (its thread stops with it when SIGSTOPped) is seen by the other.
        self.watches = rank in (0, world_size - 1)
        self._beat = Heartbeat(rank, socket.gethostname(), os.getpid(), "starting", 0, time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.folder: Path | None = None
        self.attempt = ""
        # Called by the watcher that ends the run, with the stalled heartbeats, before it exits (the run's
        # suspects, rtrain.data.suspects); errors in it never keep the run from ending.
        self.on_stall: Callable[[list[Heartbeat]], None] | None = None

    def start(self) -> StallWatchdog:
        self.attempt = _attempt_token()  # also without a timeout: the attempt names this start of the run
        self.folder = self.root / self.attempt
        if self.rank == 0:  # a loader's stall note (data.loader_timeout_s) needs clearing without a timeout too
            self._clear_earlier_attempts()
        if self.timeout_s <= 0:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self.beat("starting", 0)
        self._write()
        self._thread = threading.Thread(target=self._watch, name="rtrain-stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, phase: str, step: int) -> None:
        """Progress: called by the training loop at every change of what it does (cheap: memory only)."""
        self._beat = Heartbeat(self.rank, self._beat.host, self._beat.pid, phase, step, time.time())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> StallWatchdog:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _clear_earlier_attempts(self) -> None:
        for old in self.root.glob("*"):
            if old.is_dir() and old != self.folder:
                shutil.rmtree(old, ignore_errors=True)
        for note in (STALLED_NOTE, HEAD_LOST_NOTE):
            (self.root / note).unlink(missing_ok=True)

    def _write(self) -> None:
        assert self.folder is not None
        path = self.folder / f"rank-{self.rank:05d}.json"
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        temp.write_text(json.dumps(self._beat.__dict__))
        os.replace(temp, path)

    def _read_all(self) -> list[Heartbeat]:
        assert self.folder is not None
        beats = []
        for path in self.folder.glob("rank-*.json"):
            try:
                beats.append(Heartbeat(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # being replaced, or damaged: the next poll reads it again
        return beats

    def _watch(self) -> None:
        started = time.time()
        while not self._stop.wait(self.poll_s):
            try:
                self._write()
                beats = self._read_all() if self.watches else []
            except OSError:
                continue  # a shared filesystem's hiccup is not a stall: the next poll tries again
            if not self.watches:
                continue
            now = time.time()
            stalled = sorted((b for b in beats if now - b.progress_at > self.timeout_s), key=lambda b: b.progress_at)
            seen = {b.rank for b in beats}
            silent = [r for r in range(self.world_size) if r not in seen] if now - started > self.timeout_s else []
            if stalled or silent:
                self._end_run(stalled, silent, now)

    def _end_run(self, stalled: list[Heartbeat], silent: list[int], now: float) -> None:
        parts = [b.describe(now) for b in stalled]
        parts += [f"rank {r} wrote no heartbeat in {self.timeout_s:g} s" for r in silent]
        line = f"{'; '.join(parts)} (dist.stall_timeout_s={self.timeout_s:g}); the run was stopped on every rank"
        first = write_stall_note(self.root.parent, line)  # False: another rank said it first
        if first and self.on_stall is not None:
            try:
                self.on_stall(stalled)
            except Exception as exc:  # noqa: BLE001 - ending the run comes first
                print(f"rtrain: rank {self.rank}: could not record what the stalled rank was on: {exc}", flush=True)
        print(f"rtrain: rank {self.rank}: {line}", flush=True)
        os._exit(EXIT_STALLED)
