"""rtrain.data.suspects: marks survive the process that wrote them, records are evidence only when whole, and
only what two different attempts recorded is quarantined."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from rtrain.data.suspects import (
    SUSPECTS_FILE,
    CrashGuard,
    ReadingMarks,
    Suspect,
    marks_path,
    quarantine_of,
    record,
    suspect_from_marks,
)

NAMES = ["a.tar", "b.tar", "c.tar"]
OFFSETS = np.array([0, 10, 25])


def test_marks_written_by_a_killed_process_are_read_by_another(tmp_path: Path) -> None:
    path = marks_path(tmp_path / "attempt", 3)
    ReadingMarks(path, slots=2, create=True)
    code = ("import os, sys; from pathlib import Path; from rtrain.data.suspects import ReadingMarks\n"
            f"m = ReadingMarks(Path({str(path)!r}), 2)\n"
            "m.awaiting(1); m.reading(1, 1); m.decoding(1, 17); m.reading(0, 2)\n"
            "os.kill(os.getpid(), 9)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2])
    assert done.returncode == -9
    marks = ReadingMarks.attach(path)
    assert marks.slots == 2 and marks.on() == (1, 17) and marks.on(0) == (2, -1)
    assert suspect_from_marks(marks, NAMES, OFFSETS) == Suspect("b.tar", 7)  # the sample being decoded
    assert suspect_from_marks(marks, NAMES, OFFSETS, 0) == Suspect("c.tar", None)  # the shard being read
    marks.idle(1)
    assert suspect_from_marks(marks, NAMES, OFFSETS) is None


def test_a_guard_records_what_a_stalled_rank_was_on(tmp_path: Path) -> None:
    guard = CrashGuard(tmp_path, tmp_path / "heartbeats" / "x1", "x1", 0)
    marks = ReadingMarks(marks_path(guard.folder, 1), slots=1, create=True)
    marks.awaiting(0)
    marks.reading(0, 0)
    assert guard.record_stalled(1, NAMES, OFFSETS, "stalled") == Suspect("a.tar", None)
    assert guard.record_stalled(5, NAMES, OFFSETS, "stalled") is None  # no marks of that rank
    [line] = (tmp_path / SUSPECTS_FILE).read_text().splitlines()
    assert json.loads(line) == {"attempt": "x1", "rank": 1, "shard": "a.tar", "sample": None, "why": "stalled"}


def test_only_what_two_attempts_recorded_is_quarantined(tmp_path: Path) -> None:
    record(tmp_path, "a1", 0, Suspect("a.tar", None), "stall")
    record(tmp_path, "a1", 1, Suspect("a.tar", None), "stall")  # the same attempt twice: one attempt
    record(tmp_path, "a1", 0, Suspect("b.tar", 3), "worker died")
    assert not quarantine_of(tmp_path)
    record(tmp_path, "a2", 0, Suspect("b.tar", 3), "worker died")
    record(tmp_path, "a2", 0, Suspect("b.tar", 4), "worker died")
    found = quarantine_of(tmp_path)
    assert found.shards == frozenset() and found.samples == {("b.tar", 3)}
    assert found.names() == ["shard b.tar sample #3"]


def test_a_damaged_or_hostile_suspects_file_is_not_evidence(tmp_path: Path) -> None:
    lines = ['{"attempt": "a1", "shard": "a.tar", "sample": null}', '{"attempt": "a2", "shard": "a.tar", "sampl',
             "[1, 2]", '{"attempt": 7, "shard": "a.tar"}', '{"attempt": "a3", "shard": "a.tar", "sample": -4}',
             '{"attempt": "a4", "shard": "a.tar", "sample": true}', "\x00\xff garbage"]
    (tmp_path / SUSPECTS_FILE).write_text("\n".join(lines) + "\n")
    assert not quarantine_of(tmp_path)
    (tmp_path / SUSPECTS_FILE).unlink()
    os.mkfifo(tmp_path / SUSPECTS_FILE)  # a FIFO would block a plain open: never read
    assert not quarantine_of(tmp_path)
    assert not quarantine_of(None)


def test_a_huge_suspects_file_is_read_from_its_end_only(tmp_path: Path) -> None:
    with open(tmp_path / SUSPECTS_FILE, "w") as f:
        f.write(("x" * 1000 + "\n") * 6000)  # 6 MB of junk first
    record(tmp_path, "a1", 0, Suspect("c.tar", None), "stall")
    record(tmp_path, "a2", 0, Suspect("c.tar", None), "stall")
    assert quarantine_of(tmp_path).shards == {"c.tar"}


def test_a_planted_suspects_file_never_hangs_or_crashes(tmp_path: Path) -> None:
    import pytest

    os.mkfifo(tmp_path / SUSPECTS_FILE)
    with pytest.raises(OSError):  # at once (ENXIO: no reader), never blocked on the FIFO
        record(tmp_path, "a1", 0, Suspect("a.tar", None), "stall")
    (tmp_path / SUSPECTS_FILE).unlink()
    (tmp_path / SUSPECTS_FILE).mkdir()
    assert not quarantine_of(tmp_path)
    (tmp_path / SUSPECTS_FILE).rmdir()
    (tmp_path / SUSPECTS_FILE).write_text("[" * 3000 + "\n")
    record(tmp_path, "a1", 0, Suspect("zzz.tar", None), "stall")
    record(tmp_path, "a2", 0, Suspect("zzz.tar", None), "stall")
    record(tmp_path, "a1", 0, Suspect("a.tar", 99), "died")
    record(tmp_path, "a2", 0, Suspect("a.tar", 99), "died")
    assert quarantine_of(tmp_path).shards == {"zzz.tar"}
    assert not quarantine_of(tmp_path, counts={"a.tar": 10})  # names and positions the manifest does not have
