"""Preemption: a signal anywhere in a job -> every rank stops at the same step -> a verified checkpoint ->
the MLflow run closed as KILLED -> a documented exit code.

How a stop request travels:
- to the launcher (SIGTERM, SIGUSR1 from a scheduler; SIGINT from Ctrl-C): it writes the run's stop-request
  file, which every rank checks at each step boundary (both launchers; on several nodes the run directory is
  on storage every node sees, as checkpoints require anyway);
- to a rank itself (SLURM signalling every task, `kill` of a worker): the rank's own handler.
The ranks then agree with one collective whether anyone asked (rtrain.distributed.agree), so all of them stop after
the same step and the checkpoint is never torn.

Exit codes of `python -m rtrain.launch`: 0 done, 1 failed, 2 bad recipe, EXIT_PREEMPTED (75, EX_TEMPFAIL:
"try again": rerun the same command to resume) after SIGTERM/SIGUSR1, EXIT_INTERRUPTED (130) after SIGINT,
EXIT_STALLED (76, rtrain._process: retryable too) when the stall watchdog ended the run.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
STOP_REQUEST_NAME = ".stop-request"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

log = logging.getLogger("rtrain.launch.signals")


def stop_request_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / STOP_REQUEST_NAME


def exit_code_for(signal_name: str | None) -> int:
    return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


class LauncherSignals:
    """In the launcher: the first stop signal writes the stop request and starts the grace period; later
    ones only say that the stop is under way (they must not tear a checkpoint being written)."""

    def __init__(self, run_dir: str | os.PathLike, grace_s: float) -> None:
        self.request = stop_request_path(run_dir)
        self.grace_s = grace_s
        self.received: str | None = None
        self.deadline = float("inf")
        self.request.unlink(missing_ok=True)  # a stale request from an earlier stop must not stop this run

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"rtrain: {name} received; already stopping after {self.received}, the checkpoint is being "
                  "written", file=sys.stderr, flush=True)
            return
        self.received = name
        self.deadline = time.monotonic() + self.grace_s
        self.request.parent.mkdir(parents=True, exist_ok=True)
        # Whole or absent, never empty: a rank that saw an empty file took the stop for a SIGTERM (seen once
        # under load: Ctrl-C reported as "stopped by SIGTERM", exit 75 instead of 130).
        temp = self.request.with_name(f"{self.request.name}.{os.getpid()}")
        temp.write_text(f"{name}\n")
        os.replace(temp, self.request)
        print(f"rtrain: {name} received: every rank stops after its current step and checkpoints "
              f"(grace {self.grace_s:g} s)", file=sys.stderr, flush=True)

    @property
    def grace_expired(self) -> bool:
        return time.monotonic() > self.deadline

    @contextmanager
    def installed(self) -> Iterator[LauncherSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.request.unlink(missing_ok=True)


class RankStopWatch:
    """In a rank: `requested()` is True once any rank saw a stop signal or the stop-request file; every rank
    calls it after every step and all get the same answer (a collective)."""

    def __init__(self, run_dir: str | os.PathLike, agreement) -> None:
        self.request = stop_request_path(run_dir)
        self.agreement = agreement
        self.signal_name: str | None = None
        if threading.current_thread() is threading.main_thread():  # Ray Train runs workers in a thread
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: stopping after this step", self.signal_name)

    def requested(self) -> bool:
        if self.signal_name is None and self.request.exists():
            try:
                self.signal_name = self.request.read_text().strip() or "SIGTERM"
            except OSError:
                self.signal_name = "SIGTERM"
        return self.agreement.any(self.signal_name is not None)
