"""Process lifetime shared by the launchers, the ranks and the loader's worker processes: a child that must not
outlive its parent; how a rank ended by the stall watchdog (rtrain.distributed.watchdog) exits and where it
leaves its line. Standard library only: every layer of rtrain may import this."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

EXIT_STALLED = 76  # retryable, as EXIT_PREEMPTED (75): rerun the same command to resume
HEARTBEATS_DIR = "heartbeats"
STALLED_NOTE = "STALLED"
HEAD_LOST_NOTE = "HEAD_LOST"  # rank 0's word, after a lost Ray head, on how it left the MLflow run


def read_stall_note(run_dir: Path, name: str = STALLED_NOTE) -> str | None:
    """The line the stall watchdog left when it ended a run, if it did (or another note of the run's end)."""
    try:
        return (Path(run_dir) / HEARTBEATS_DIR / name).read_text().strip() or None
    except OSError:
        return None


def write_stall_note(run_dir: Path, line: str, name: str = STALLED_NOTE) -> bool:
    """Leave the line a stalled run ends with (the launchers read it: exit EXIT_STALLED, retryable); True for
    the first writer, False when another rank said it first or it cannot be written."""
    try:
        folder = Path(run_dir) / HEARTBEATS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o644)
    except OSError:
        return False
    with os.fdopen(fd, "w") as note:
        note.write(line + "\n")
    return True


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies, however the parent dies (Linux PR_SET_PDEATHSIG); exit at once
    when the parent is already gone. The signal follows the parent's thread that started this process: call it
    in children started by a thread that lives as long as the parent (the main thread)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the line above took effect
        os._exit(1)
