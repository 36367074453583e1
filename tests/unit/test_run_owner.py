"""rtrain.launch.owner: one live launch per run directory; a dead owner's lock is free at once (the kernel
releases it, SIGKILL included) and the next launch says whom it takes over from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtrain.launch.owner import OWNER_NAME, RunInUse, RunLock

REPO = Path(__file__).resolve().parents[2]
HOLD = ("import sys, time; from rtrain.launch.owner import RunLock\n"
        "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)\n")


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_owner_is_refused_at_once_naming_the_first(tmp_path: Path) -> None:
    holder = _holder(tmp_path / "run")
    try:
        began = time.monotonic()
        with pytest.raises(RunInUse) as refused:
            RunLock(tmp_path / "run").acquire()
        assert time.monotonic() - began < 1
        message = str(refused.value)
        assert message.startswith(f"run directory {tmp_path / 'run'} is in use by another launch (host ")
        assert f"pid {holder.pid}, since " in message and f"kill -TERM {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()


def test_a_sigkilled_owner_is_taken_over_and_a_clean_one_leaves_nothing(tmp_path: Path) -> None:
    holder = _holder(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path / "run") as lock:
        assert lock.took_over_from is not None and f"pid {holder.pid}" in lock.took_over_from
        owner = json.loads((tmp_path / "run" / OWNER_NAME).read_text())
        assert owner["pid"] == os.getpid() and set(owner) == {"host", "pid", "since"}  # no command line
    assert not (tmp_path / "run" / OWNER_NAME).exists()
    with RunLock(tmp_path / "run") as lock:
        assert lock.took_over_from is None


def test_a_hostile_owner_file_never_hangs_or_crashes_the_launch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / OWNER_NAME)  # a blocking open would wait forever
    with RunLock(run) as lock:
        assert lock.took_over_from is None
    for planted in ('{"since": NaN, "host": "h"}', '{"since": 1e300, "pid": "\\u001b[31m"}', "[1, 2]", "[" * 5000):
        (run / OWNER_NAME).write_text(planted)
        with RunLock(run) as lock:  # taken over; whatever it says is printable or "?"
            assert lock.took_over_from is None or lock.took_over_from.isprintable()
